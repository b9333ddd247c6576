"""Benchmarks of the W2SD samplers: Gaussian mixtures with a known ideal, small denoisers trained on digits,
and overhead (wall time per NFE, UNet passes, LoRA memory). Entry point: ``w2sd bench`` (:mod:`.cli`).

Needs the ``bench`` extra (matplotlib, scikit-learn/scipy); the package itself imports neither.
"""
