"""What the benchmarks and ``w2sd eval`` share to run methods at matched compute: reflected-step counts and the
largest step count within an NFE budget."""


def reflected(steps, lam_frac):
    """The paper's lambda for a fraction of the T - 1 reflectable steps (1.0 = all but the last)."""
    return round(lam_frac * (steps - 1))


def select(candidates, score):
    """``(best, its score)``: the candidate with the lowest ``score(candidate)`` (lower is better).

    The selection rule of the benchmarks' protocol: ties go to the earliest candidate in ``candidates``, a sequence
    in the protocol's written order, and a NaN score never wins, so the choice depends on neither hash seeds nor
    set or dict order.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError('select needs at least one candidate')
    scores = [score(c) for c in candidates]
    i = min(range(len(candidates)), key=lambda k: (scores[k] != scores[k], 0. if scores[k] != scores[k] else
                                                   scores[k], k))
    return candidates[i], scores[i]
