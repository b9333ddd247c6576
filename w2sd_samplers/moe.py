"""Expert routing flips for mixture-of-experts denoisers: the top-k experts (strong) vs the bottom-k (weak).

The paper's MoE pair (DiT-MoE-S, top-2 of 8 experts vs the 2 "least optimal" of 8) is one network run twice with
different routing. A gate computes logits = linear(h, weight, bias), scores = a monotone function of the logits
(softmax for DiT-MoE and Mixtral), and picks the top-k scores. Negating the logits reverses the order of the scores,
so the same top-k code then picks exactly the k lowest-scored experts; that is the flip used here. A hook on each
gate negates, for the rows routed to the bottom, the gate's input (gates without a bias: ``linear(-h, W) =
-linear(h, W)``) or, for an ``nn.Linear`` gate, its output (the logits, bias included). Weights are never touched.

The routing is part of the call, not of the model: the hooks read it from a context variable local to the calling
thread or asyncio task (see :mod:`w2sd_samplers.lora`), so threads sharing the model never see each other's
routing and nothing needs restoring. It may be given per batch row (legs batched into one forward); the gate then
sees its rows as contiguous blocks of the leading dimension (``[B * tokens, dim]`` for DiT-MoE and Mixtral).

The routed experts are then weighted by the flipped distribution's probabilities (the softmax of the negated
logits), which keeps the routed branch at about its usual magnitude instead of the tiny raw probabilities of the
worst experts. Gates whose scores are not a monotone function of one linear map (e.g. a bias added after the
score for selection only, as in DeepSeek-V3) are not flipped correctly by this; name their logit Linear instead.
"""
import contextvars

import torch

from .lora import Scope, call_in_context

MODES = ('top', 'bottom')
K_ATTRIBUTES = ('top_k', 'num_experts_per_tok')
# {ExpertRouting: mode or per-row modes} of the current call.
_MODES = contextvars.ContextVar('w2sd_moe_modes', default={})


def find_gates(model):
    """Names of DiT-MoE/Mixtral-style gates: a ``gate`` or ``router`` child of a module that has an ``experts``
    module (a ModuleList, or one module holding fused expert weights as in transformers' Mixtral)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, 'experts', None), torch.nn.Module):
            for child in ('gate', 'router'):
                if isinstance(getattr(module, child, None), torch.nn.Module):
                    names.append(f'{name}.{child}' if name else child)
    return names


def _check_mode(mode):
    modes = mode if isinstance(mode, (list, tuple)) else [mode]
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f'mode must be one of {MODES} (or a list of them, one per batch row), got {mode!r}')
    return mode


def _flip_rows(mode, t):
    """``t`` with the rows routed 'bottom' negated (rows: contiguous blocks of t's leading dimension)."""
    if not isinstance(mode, (list, tuple)):
        return -t if mode == 'bottom' else t
    if t.shape[0] % len(mode):
        raise ValueError(f'per-row routing for {len(mode)} rows does not fit a gate input of batch {t.shape[0]}')
    sign = torch.tensor([-1. if m == 'bottom' else 1. for m in mode], dtype=t.dtype, device=t.device)
    return t * sign.repeat_interleave(t.shape[0] // len(mode)).reshape(-1, *[1] * (t.dim() - 1))


class ExpertRouting:
    """Routes every gate of ``model`` to its usual top-k experts or to the bottom-k, per call.

    ``gates``: None (DiT-MoE/Mixtral-style gates, see :func:`find_gates`), a list of module paths, or a
    predicate ``(name, module) -> bool``. Each gate must own the ``weight`` of its logit map, and a ``bias`` only if
    it is an ``nn.Linear`` (whose output is the logits). A gate reached under several names is flipped once.
    ``k``: route to this many experts in both modes (set on the gates' and their parents' ``top_k`` /
    ``num_experts_per_tok`` attributes for the duration of a call: the one shared change, so with ``k`` one model
    must not run two routings at once); None keeps the model's own k. ``remove()`` detaches the hooks.
    """

    def __init__(self, model, gates=None, *, k=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f'model must be a torch.nn.Module, not {type(model).__name__}')
        modules = dict(model.named_modules(remove_duplicate=False))
        if gates is None:
            names = find_gates(model)
        elif callable(gates):
            names = [name for name, module in model.named_modules() if gates(name, module)]
        elif isinstance(gates, (list, tuple)) and all(isinstance(g, str) for g in gates):
            missing = [g for g in gates if g not in modules]
            if missing:
                raise ValueError(f'gates name no module of the model: {missing}')
            doubled = sorted({g for g in gates if gates.count(g) > 1})
            if doubled:
                raise ValueError(f'gates names the same gate more than once: {doubled}')
            names = list(gates)
        else:
            raise TypeError('gates must be None, a list of module paths, or a predicate (name, module) -> bool')
        if not names:
            raise ValueError('no MoE gate found: name the gate modules with gates=[...] or a predicate')
        no_weight = [n for n in names if not isinstance(getattr(modules[n], 'weight', None), torch.nn.Parameter)]
        if no_weight:
            raise ValueError(f'gates must own the weight Parameter of their logit map; these do not: {no_weight}')
        biased = [n for n in names if getattr(modules[n], 'bias', None) is not None
                  and not isinstance(modules[n], torch.nn.Linear)]
        if biased:
            raise ValueError(f'gates {biased} have a bias but are not nn.Linear: negating their input would not '
                             'negate the bias; name their logit Linear as the gate instead')
        self.gates = names
        self._gates = list({id(modules[n]): modules[n] for n in names}.values())
        self._k_owners = []
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f'k must be a positive int, got {k!r}')
            for name in names:
                gate, parent = modules[name], modules[name.rpartition('.')[0]]
                owners = [(m, a) for m in (gate, parent) for a in K_ATTRIBUTES if isinstance(getattr(m, a, None), int)]
                if not owners:
                    raise ValueError(f'k was given, but neither gate {name!r} nor its parent has an int attribute '
                                     f'named one of {K_ATTRIBUTES}')
                experts = gate.weight.shape[0]
                if k > experts:
                    raise ValueError(f'k={k} exceeds the {experts} experts of gate {name!r}')
                self._k_owners += [o for o in owners if o not in self._k_owners]
        self.k = k
        self._handles = [g.register_forward_hook(self._flip_output) if isinstance(g, torch.nn.Linear)
                         else g.register_forward_pre_hook(self._flip_input) for g in self._gates]

    @property
    def current_mode(self):
        """The routing of this thread/task's calls ('top' outside any ``mode()`` / ``run()``)."""
        return _MODES.get().get(self, 'top')

    def _flip_input(self, gate, args):
        mode = self.current_mode
        return None if mode == 'top' else (_flip_rows(mode, args[0]),) + args[1:]

    def _flip_output(self, gate, args, output):
        mode = self.current_mode
        return None if mode == 'top' else _flip_rows(mode, output)

    def _k(self):
        return [(owner, attr, self.k) for owner, attr in self._k_owners]

    def mode(self, mode):
        """``with routing.mode('bottom'):`` routes every gate to its bottom-k experts inside the block, in this
        thread/task only ('top': the usual routing); modes nest and are back as they were on exit."""
        return Scope((_MODES, self, _check_mode(mode)), self._k(), result=self)

    def run(self, mode, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` routed by ``mode`` ('top', 'bottom', or one per batch row), in a copy of the
        current context: nothing to reset afterwards, whatever interrupts the call."""
        return Scope(attributes=self._k()).call(call_in_context, _MODES, self, _check_mode(mode), fn, *args, **kwargs)

    def remove(self):
        """Detach the gate hooks; the model is then exactly as before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def routed(denoiser, routing, mode):
    """A k-diffusion denoiser that runs ``denoiser`` routed by ``mode`` for each call (thread-safe)."""
    if not isinstance(routing, ExpertRouting):
        raise TypeError(f'routing must be an ExpertRouting, not {type(routing).__name__}')
    _check_mode(mode)

    def call(x, sigma, **extra_args):
        return routing.run(mode, denoiser, x, sigma, **extra_args)
    return call
