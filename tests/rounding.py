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


class NetworkMagnitudes:
    """``with NetworkMagnitudes(net) as seen:`` for a network too deep to count its rounding steps by hand: after
    the calls inside, ``seen.ops`` bounds the rounding steps of one call's longest path and ``seen.values`` holds
    the magnitudes they combine, to pass to :func:`reorder_bound`.

    Every module call (containers too) counts the number of elements of one batch row of its first tensor input,
    plus 8: no reduction inside a module runs over more terms than its input row holds (a Linear over
    in_features, a convolution over in_channels x kernel on at least kernel-sized maps, a norm over a group,
    attention over the head dim and the sequence), and 8 covers its transcendentals; summing over all modules as
    if they ran in sequence overcounts the longest path. Norm layers divide by a standard deviation that can
    amplify what went in: the tests compare in float64 and keep the effect they check many orders above the
    bound, so a generous bound still leaves them able to fail."""

    def __init__(self, net):
        self.net, self.ops, self.values, self.calls = net, 0, [], 0

    def __enter__(self):
        def hook(m, args, kwargs, out):
            x = next((a for a in (*args, *kwargs.values())
                      if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel()), None)
            if m is self.net:
                self.calls += 1
            outs = out if isinstance(out, (tuple, list)) else (getattr(out, 'sample', out),)
            self.values += [o.detach().abs().max() for o in outs if isinstance(o, torch.Tensor) and o.numel()]
            if x is None:
                return
            self.ops += x[0].numel() + 8 if x.dim() > 1 else 8
            self.values.append(x.detach().abs().max())
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                w, b = m.weight.detach().abs(), None if m.bias is None else m.bias.detach().abs()
                sums = (torch.nn.functional.linear(x.abs(), w, b) if isinstance(m, torch.nn.Linear)
                        else m._conv_forward(x.abs(), w, b))
                self.values.append(sums.max())
        self.handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self.net.modules()]
        return self

    @property
    def ops_per_call(self):
        return self.ops / self.calls

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def float64_net_bound(seen, c_out, *outputs):
    """Batched vs separate calls of a float64 network behind an adapter whose sigma math and output are float32
    (adapters.flow, adapters.vp): inputs reach the network through the same per-element float32 operations, so
    the network's float64 reorder bound (``seen``: a :class:`NetworkMagnitudes`) times the largest output scaling
    ``c_out``, plus the output's float32 steps, the cast and ``c_skip x + c_out v`` (3, relative to the largest
    ``|x| + |denoised|`` in ``outputs``)."""
    return (c_out * reorder_bound(seen.ops_per_call, *seen.values, dtype=torch.float64)
            + reorder_bound(3, *outputs))
