"""What the benchmarks and ``w2sd eval`` share to run methods at matched compute: reflected-step counts and the
largest step count within an NFE budget."""


def reflected(steps, lam_frac):
    """The paper's lambda for a fraction of the T - 1 reflectable steps (1.0 = all but the last)."""
    return round(lam_frac * (steps - 1))
