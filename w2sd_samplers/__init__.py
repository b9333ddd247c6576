"""Weak-to-Strong Diffusion (W2SD) samplers on k-diffusion."""
from .nfe import CallCounter
from .reflect import Reflection, reflect, reflected_steps
from .sampling import SAMPLERS, with_reflection
from .sampling import *  # noqa: F401,F403  (sample_w2sd_*)

__version__ = '0.1.0'
