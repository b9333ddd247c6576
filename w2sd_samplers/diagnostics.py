"""A cheap look at a (strong, weak) pair before sampling with it.

:func:`check_pair` follows a strong-only Euler trajectory down a sigma schedule and reports, at each step that a
reflection could use, how large the weak-to-strong difference is next to the strong step itself:
``gap = ||D_s - D_w|| / ||x - D_s||`` (per sample, averaged). The reflection moves x by about
``(h / sigma) (D_s - D_w)`` and the Euler step by ``(h / sigma) (x - D_s)``, so ``gap`` is the size of the W2SD
correction relative to the step it corrects. It warns (:class:`PairWarning`) about the paper's failure modes (a
weak model that is not a worse version of the strong one) that can be seen without sampling:

- degenerate pair: ``gap`` below ``degenerate_tol`` at every step (identical models, LoRA not applied, equal
  scales): the reflection does nothing but cost 2 NFE per step;
- swapped or opposed roles, with a hint only (a pair alone cannot say which side is better):
  ``ideal=`` a reference denoiser closer to the target (e.g. the exact denoiser of a toy, a much larger model):
  the difference should point along the strong model's error ``D_ideal - D_s``; on average it points against it;
  ``data=`` clean samples of the target: the "strong" denoiser should denoise them better (lower MSE) than the weak
  one at most noise levels; it does not;
- overshoot (with ``ideal``): under the local model ``D_s - D_w = (r - 1)(D_ideal - D_s)`` (a weak bias r times the strong one's) a
  strength-1 reflection helps only for ``1 < r < 3``; for ``r >= 3`` the report suggests ``strength = 1 / (r - 1)``.
"""
import dataclasses
import statistics
import warnings
from typing import List, Optional

import torch

from .pairs import Roles
from .reflect import check_sigmas


class PairWarning(UserWarning):
    """A (strong, weak) pair looks degenerate, swapped or overshooting."""


@dataclasses.dataclass
class PairReport:
    """Per-step numbers of :func:`check_pair` (steps into sigma > 0 only: the ones a reflection can use)."""
    sigmas: List[float]
    gap: List[float]
    alignment: Optional[List[float]] = None  # cos(D_s - D_w, D_ideal - D_s), batch mean
    ratio: Optional[List[float]] = None      # r in D_s - D_w = (r - 1)(D_ideal - D_s), least squares over the batch
    strong_loss: Optional[List[float]] = None  # denoising MSE on data
    weak_loss: Optional[List[float]] = None
    nfe: int = 0
    degenerate_tol: float = 1e-3

    @property
    def informative(self):
        """Indices of the steps whose gap exceeds ``degenerate_tol`` (elsewhere the pair makes no difference)."""
        return [i for i, g in enumerate(self.gap) if g > self.degenerate_tol]

    @property
    def median_ratio(self):
        """Median of ``ratio`` over the informative steps, or None without ``ideal`` or such steps."""
        if self.ratio is None or not self.informative:
            return None
        return statistics.median(self.ratio[i] for i in self.informative)

    @property
    def suggested_strength(self):
        """``1 / (r - 1)`` at the median ratio: the strength the linear bias model calls exact (None if r <= 1)."""
        r = self.median_ratio
        return 1 / (r - 1) if r is not None and r > 1 else None

    def __str__(self):
        cols = [('sigma', self.sigmas), ('gap', self.gap), ('align', self.alignment), ('r', self.ratio),
                ('mse_s', self.strong_loss), ('mse_w', self.weak_loss)]
        cols = [(name, v) for name, v in cols if v is not None]
        lines = ['  '.join(f'{name:>9}' for name, _ in cols)]
        lines += ['  '.join(f'{v[i]:9.4g}' for _, v in cols) for i in range(len(self.sigmas))]
        return '\n'.join(lines + [f'NFE {self.nfe}'])


def _per_sample(t):
    return t.reshape(t.shape[0], -1).to(torch.float64)


@torch.no_grad()
def check_pair(roles, x, sigmas, *, ideal=None, data=None, degenerate_tol=1e-3, generator=None):
    """Report and warn about ``roles``' (strong, weak) pair along a strong-only Euler trajectory from ``x``.

    ``x``: the starting noise at ``sigmas[0]`` (e.g. ``torch.randn(shape) * sigmas[0]``), batch-sized like the
    roles' extra args. ``ideal``: a reference denoiser (same extra args as the strong leg). ``data``: clean target
    samples, batch-sized like ``x``; noised with ``generator``. NFE: 2 per step, +1 with ``ideal``, +2 with
    ``data``. Returns a :class:`PairReport`.
    """
    if not isinstance(roles, Roles):
        raise TypeError(f'check_pair needs a pairs.Roles, got {type(roles).__name__}')
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'x must be a torch.Tensor (the starting noise), got {type(x).__name__}')
    check_sigmas(sigmas)
    if ideal is not None and not callable(ideal):
        raise TypeError(f'ideal must be a k-diffusion denoiser, got {type(ideal).__name__}')
    if data is not None and (not isinstance(data, torch.Tensor) or data.shape != x.shape):
        raise ValueError(f'data must be a tensor of clean samples shaped like x {tuple(x.shape)}, got '
                         f'{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}')
    if not (isinstance(degenerate_tol, (int, float)) and degenerate_tol >= 0):
        raise ValueError(f'degenerate_tol must be a number >= 0, got {degenerate_tol!r}')
    (strong, s_ea), (weak, w_ea) = roles.leg('strong'), roles.leg('weak')
    s_in = x.new_ones([x.shape[0]])
    report = PairReport([], [], alignment=None if ideal is None else [], ratio=None if ideal is None else [],
                        strong_loss=None if data is None else [], weak_loss=None if data is None else [],
                        degenerate_tol=degenerate_tol)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if not sigma_next > 0:
            break
        d_s, d_w = strong(x, sigma * s_in, **s_ea), weak(x, sigma * s_in, **w_ea)
        diff, step = _per_sample(d_s - d_w), _per_sample(x - d_s)
        report.sigmas.append(float(sigma))
        report.gap.append(float((diff.norm(dim=1) / step.norm(dim=1).clamp_min(1e-30)).mean()))
        report.nfe += 2
        if ideal is not None:
            err = _per_sample(ideal(x, sigma * s_in, **s_ea) - d_s)
            report.nfe += 1
            cos = (diff * err).sum(1) / (diff.norm(dim=1) * err.norm(dim=1)).clamp_min(1e-30)
            report.alignment.append(float(cos.mean()))
            report.ratio.append(1 + float((diff * err).sum() / (err * err).sum().clamp_min(1e-30)))
        if data is not None:
            noised = data + sigma * torch.randn(data.shape, generator=generator, dtype=data.dtype,
                                                device=data.device)
            for losses, (d, ea) in ((report.strong_loss, (strong, s_ea)), (report.weak_loss, (weak, w_ea))):
                losses.append(float(((d(noised, sigma * s_in, **ea) - data) ** 2).mean()))
            report.nfe += 2
        x = x + (sigma_next - sigma) * (x - d_s) / sigma
    _warn(report)
    return report


def _warn(report):
    live = report.informative
    if not live:
        warnings.warn(f'degenerate pair: the strong and weak denoised estimates differ by at most '
                      f'{max(report.gap, default=0.):.2g} of the strong step (tolerance {report.degenerate_tol:g}); '
                      'W2SD would only add 2 NFE per step. Check that the two roles really differ (LoRA applied, '
                      'different scales or prompts, not the same model twice).', PairWarning, stacklevel=3)
        return
    if report.alignment is not None:
        alignment = statistics.fmean(report.alignment[i] for i in live)
        if alignment < 0:
            against = sum(report.alignment[i] < 0 for i in live)
            warnings.warn(f'the roles look swapped or opposed: D_strong - D_weak points against the ideal '
                          f'correction D_ideal - D_strong (mean cosine {alignment:.2f}, negative at {against} of '
                          f'{len(live)} steps). W2SD would push away from the ideal (the paper\'s "model '
                          'conflict"); swap strong and weak or choose another pair.', PairWarning, stacklevel=3)
        elif report.median_ratio >= 3:
            warnings.warn(f'the weak-to-strong difference is over twice the strong model\'s own error (median '
                          f'r = {report.median_ratio:.2f}); a strength-1 reflection overshoots. Try '
                          f'strength={report.suggested_strength:.2f} or a closer weak model.', PairWarning,
                          stacklevel=3)
    if report.strong_loss is not None:
        differ = [(s, w) for s, w in zip(report.strong_loss, report.weak_loss) if abs(s - w) > 1e-6 * (s + w)]
        worse = sum(s > w for s, w in differ)
        if worse > len(differ) / 2:
            warnings.warn(f'the roles look swapped: the "strong" denoiser denoises the given data worse than the '
                          f'weak one at {worse} of the {len(differ)} noise levels where they differ (a '
                          'negative weak-to-strong gap makes W2SD hurt); swap strong and weak.', PairWarning, stacklevel=3)
