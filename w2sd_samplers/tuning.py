"""What the benchmarks and ``w2sd eval`` share to compare methods at matched compute: reflected-step counts, the
largest step count within an NFE budget (counted, not derived from a formula) and the rule that picks a setting."""
import torch


def reflected(steps, lam_frac):
    """The paper's lambda for a fraction of the T - 1 reflectable steps (1.0 = all but the last)."""
    return round(lam_frac * (steps - 1))


def stand_in(x, sigma, **extra_args):
    """A denoiser that runs no model: a method's NFE is the calls it makes on this one (wrapped in a
    :class:`~w2sd_samplers.nfe.CallCounter`), without sampling."""
    return torch.zeros_like(x)


def largest_steps(nfe, budget, candidates):
    """The largest step count of ``candidates`` whose ``nfe(steps)`` (counted on :func:`stand_in` denoisers) is
    at most ``budget``; None when none fits. ``nfe`` returns None for a step count the method cannot run at.

    Each candidate is counted, largest first: NFE need not grow with the step count (a Restart interval snaps
    to the schedule's levels, a guidance interval holds a varying number of them)."""
    for steps in sorted(candidates, reverse=True):
        count = nfe(steps)
        if count is not None and count <= budget:
            return steps
    return None


def select(candidates, score):
    """The candidate with the lowest ``score(candidate)``; a tie goes to the first in ``candidates`` (list them
    in a fixed order, e.g. the benchmarks' protocol's written order) and a NaN score never wins, so the choice
    depends on neither hash seeds nor dict or set order."""
    candidates = list(candidates)
    if not candidates:
        raise ValueError('select needs at least one candidate')
    scores = [score(c) for c in candidates]
    return candidates[min(range(len(candidates)), key=lambda i: (scores[i] != scores[i],
                                                                 0. if scores[i] != scores[i] else scores[i], i))]
