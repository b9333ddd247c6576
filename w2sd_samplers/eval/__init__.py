"""``w2sd eval``: paired, matched-NFE evaluation of W2SD and its relatives on a local diffusers pipeline.

:mod:`.methods` runs the library's samplers on a pipeline pair (``generate.pipeline_pair``) within an NFE budget,
:mod:`.scorers` loads image scorers from local paths, :mod:`.store` keeps the resumable results folder,
:mod:`.report` writes the summary. Entry points: ``w2sd eval`` (:mod:`w2sd_samplers.commands.eval`) and
``python -m w2sd_samplers.eval`` (for ``accelerate launch`` / ``torchrun``). Needs the ``eval`` extra.
"""
