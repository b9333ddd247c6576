"""Weak-to-Strong Diffusion (W2SD) samplers on k-diffusion.

``sample_w2sd_X`` for each k-diffusion sampler X (and the hosts' DPM fast, HeunPP2, IPNDM, IPNDM_V, DEIS and
res_multistep), with the W2SD options as keyword-only arguments; ``reflect`` is
the operator on its own. Pairs, relatives and diagnostics live in the submodules ``pairs``, ``guidance`` and
``diagnostics``; model adapters in ``adapters``; ``generate`` runs diffusers pipelines.
"""
from .nfe import CallCounter
from .reflect import Reflection, reflect, reflected_steps
from .sampling import (SAMPLERS, sample_w2sd_deis, sample_w2sd_dpm_2, sample_w2sd_dpm_2_ancestral,
                       sample_w2sd_dpm_fast, sample_w2sd_dpmpp_2m, sample_w2sd_dpmpp_2m_sde,
                       sample_w2sd_dpmpp_2s_ancestral, sample_w2sd_dpmpp_3m_sde, sample_w2sd_dpmpp_sde,
                       sample_w2sd_euler, sample_w2sd_euler_ancestral, sample_w2sd_heun, sample_w2sd_heunpp2,
                       sample_w2sd_ipndm, sample_w2sd_ipndm_v, sample_w2sd_lms, sample_w2sd_res_multistep,
                       with_reflection)

__version__ = '0.1.0'

__all__ = [
    'CallCounter', 'Reflection', 'SAMPLERS', 'reflect', 'reflected_steps', 'with_reflection',
    'sample_w2sd_deis', 'sample_w2sd_dpm_2', 'sample_w2sd_dpm_2_ancestral', 'sample_w2sd_dpm_fast',
    'sample_w2sd_dpmpp_2m', 'sample_w2sd_dpmpp_2m_sde', 'sample_w2sd_dpmpp_2s_ancestral', 'sample_w2sd_dpmpp_3m_sde',
    'sample_w2sd_dpmpp_sde', 'sample_w2sd_euler', 'sample_w2sd_euler_ancestral', 'sample_w2sd_heun',
    'sample_w2sd_heunpp2', 'sample_w2sd_ipndm', 'sample_w2sd_ipndm_v', 'sample_w2sd_lms', 'sample_w2sd_res_multistep',
]
