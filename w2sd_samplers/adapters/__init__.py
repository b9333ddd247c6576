"""Model families as k-diffusion denoisers ``D(x, sigma, **cond)``."""
