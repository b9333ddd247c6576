"""Exact denoisers of isotropic Gaussian mixtures: the built-in model whose ideal is known.

For ``p0 = sum_k w_k N(mu_k, s_k^2 I)`` the noisy marginal at level sigma is ``sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)``
and the optimal denoiser is the posterior mean
``D(x, sigma) = sum_k r_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)]`` with responsibilities ``r_k``.
"""
import math

import torch


class GaussianMixture:
    """A mixture in ``dim`` dimensions; ``means [K, dim]``, ``stds [K]`` (or a scalar), ``weights [K]``.

    Calling it is the exact k-diffusion denoiser ``D(x, sigma)`` for ``x`` of shape ``[B, dim]`` (or
    ``[B, *shape]`` with ``prod(shape) == dim``). Components of weight 0 are allowed (a "missing mode").
    """

    def __init__(self, means, stds, weights):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f'means must be [K, dim], got shape {tuple(means.shape)}')
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError(f'weights must be {k} non-negative numbers with a positive sum, got {weights.tolist()}')
        if (stds <= 0).any():
            raise ValueError(f'stds must be positive, got {stds.tolist()}')
        keep = weights > 0
        self.means, self.stds = means[keep], stds[keep]
        self.weights = weights[keep] / weights[keep].sum()
        self.dim = means.shape[1]

    def __call__(self, x, sigma, **extra_args):
        if extra_args:
            raise TypeError(f'GaussianMixture takes no extra args, got {sorted(extra_args)}')
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f'x has {flat.shape[1]} features per sample; this mixture has dim {self.dim}')
        var = self.stds ** 2 + sigma.to(torch.float64).reshape(-1, 1) ** 2                     # [B, K]
        sq = ((flat[:, None, :] - self.means[None]) ** 2).sum(-1)                              # [B, K]
        logp = self.weights.log() - 0.5 * sq / var - 0.5 * self.dim * var.log()
        resp = torch.softmax(logp, dim=1)
        shrink = self.stds ** 2 / var                                                          # [B, K]
        post = self.means[None] + shrink[..., None] * (flat[:, None, :] - self.means[None])   # [B, K, dim]
        return (resp[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    def sample(self, n, generator=None):
        """``n`` exact samples of the clean distribution, float64 ``[n, dim]``."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[idx] + self.stds[idx, None] * noise

    def log_prob(self, x, sigma=0.):
        """Log density of the mixture noised to level ``sigma``, at ``x [B, dim]``."""
        var = self.stds ** 2 + float(sigma) ** 2
        sq = ((x.to(torch.float64)[:, None, :] - self.means[None]) ** 2).sum(-1)
        logp = self.weights.log() - 0.5 * sq / var - 0.5 * self.dim * (var.log() + math.log(2 * math.pi))
        return torch.logsumexp(logp, dim=1)


def four_modes(weights, std=0.5):
    """The paper's 2-D setting: modes at (+-4, +-4), ordered (-4,-4), (-4,4), (4,-4), (4,4)."""
    means = [[-4., -4.], [-4., 4.], [4., -4.], [4., 4.]]
    return GaussianMixture(means, std, weights)


def energy_distance(x, y):
    """Unbiased squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (0 iff same distribution)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))
    yy = torch.cdist(y, y).sum() / (len(y) * (len(y) - 1))
    return float(2 * xy - xx - yy)


def sliced_wasserstein(x, y, projections=64, generator=None):
    """Sliced 2-Wasserstein distance over random unit directions (equal sample counts)."""
    if len(x) != len(y):
        raise ValueError(f'sliced_wasserstein needs equal sample counts, got {len(x)} and {len(y)}')
    x, y = x.to(torch.float64), y.to(torch.float64)
    dirs = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())


def mode_stats(samples, means):
    """Per-mode weights (nearest-mode assignment) and the distance of each mode's sample mean from its centre."""
    means = torch.as_tensor(means, dtype=torch.float64)
    samples = samples.to(torch.float64)
    nearest = torch.cdist(samples, means).argmin(1)
    weights, errors = [], []
    for k in range(len(means)):
        members = samples[nearest == k]
        weights.append(len(members) / len(samples))
        errors.append(float((members.mean(0) - means[k]).norm()) if len(members) else float('nan'))
    return weights, errors
