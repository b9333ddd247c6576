"""Tolerances for comparing two evaluations of the same computation that differ only in the order of their
floating-point operations, derived from the format's rounding instead of one machine's observed difference.

A batched forward and separate forwards run other BLAS and vectorised kernels, which sum in other orders (and
evaluate tanh or exp in a vector body or a scalar tail); which kernels run depends on the CPU, MKL's code path
(MKL_ENABLE_INSTRUCTIONS) and ATen's CPU capability (ATEN_CPU_CAPABILITY). Where the arithmetic is the same
operations in the same order, the tests compare with ``torch.equal`` instead.
"""
import torch


def gamma(n, dtype=torch.float32):
    """Higham's gamma_n = n u / (1 - n u), u the unit roundoff: a result that passes through n correctly rounded
    operations (a sum of k terms counts k; a transcendental within 2 ulp counts 4) is within gamma_n of exact,
    relative to the magnitudes it combines (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
    Lemma 3.1 and section 3.1)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def reorder_bound(ops, *values, dtype=torch.float32):
    """The largest |a - b| of two evaluations in different orders: each is within gamma(ops) times the magnitudes
    it combines of the exact result, and so within twice that of the other. ``values``: tensors whose largest
    magnitude bounds those (the inputs, the outputs and what lies between)."""
    scale = max(float(v.detach().abs().max()) for v in values)
    return 2 * gamma(ops, dtype) * scale


class LinearMagnitudes:
    """``with LinearMagnitudes(model) as seen:`` collects, for each call of an ``nn.Linear`` in ``model``, the
    magnitudes its sums combine, ``|x| |W|^T + |b|`` (Higham's bound is relative to these, not to the result),
    to pass to :func:`reorder_bound`."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __enter__(self):
        def hook(m, args, out):
            self.seen.append(args[0].detach().abs() @ m.weight.detach().abs().T
                             + (0 if m.bias is None else m.bias.detach().abs()))
        self.handles = [m.register_forward_hook(hook) for m in self.model.modules()
                        if isinstance(m, torch.nn.Linear)]
        return self.seen

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
