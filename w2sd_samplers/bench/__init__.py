"""Benchmarks of the W2SD samplers: Gaussian mixtures with a known ideal, small denoisers trained on digits,
and overhead (wall time per NFE, UNet passes, LoRA memory). Entry point: ``w2sd bench``
(:mod:`w2sd_samplers.commands.bench`).

Needs the ``bench`` extra (matplotlib, scipy; the overhead suite also diffusers and peft); the package itself
imports none of them.
"""
