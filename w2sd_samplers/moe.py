"""Expert routing flips for mixture-of-experts denoisers: the top-k experts (strong) vs the bottom-k (weak).

The paper's MoE pair (DiT-MoE-S, top-2 of 8 experts vs the 2 "least optimal" of 8) is one network run twice with
different routing. A gate computes logits = linear(h, weight, bias), scores = a monotone function of the logits
(softmax for DiT-MoE and Mixtral), and picks the top-k scores. Negating the logits reverses the order of the scores,
so the same top-k code then picks exactly the k lowest-scored experts; that is the flip used here. It is done by
giving the gate negated copies of its own ``weight`` and ``bias`` for the duration of a ``mode('bottom')`` block and
putting the original Parameter objects back afterwards: the originals are never written, so the restore is exact.

The routed experts are then weighted by the flipped distribution's probabilities (the softmax of the negated
logits), which keeps the routed branch at about its usual magnitude instead of the tiny raw probabilities of the
worst experts. Gates whose scores are not a monotone function of one linear map (e.g. a bias added after the
score for selection only, as in DeepSeek-V3) are not flipped correctly by this; name their logit Linear instead.
"""
import contextlib
import functools

import torch

MODES = ('top', 'bottom')
K_ATTRIBUTES = ('top_k', 'num_experts_per_tok')


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


class ExpertRouting:
    """Switches every gate of ``model`` between its usual top-k routing and the bottom-k experts.

    ``gates``: None (DiT-MoE/Mixtral-style gates, see :func:`find_gates`), a list of module paths, or a
    predicate ``(name, module) -> bool``. Each gate must own the ``weight`` (and optional ``bias``) of its logit map.
    ``k``: route to this many experts in both modes (set on the gates' and their parents' ``top_k`` /
    ``num_experts_per_tok`` attributes for the duration of a mode); None keeps the model's own k.
    """

    def __init__(self, model, gates=None, *, k=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f'model must be a torch.nn.Module, not {type(model).__name__}')
        modules = dict(model.named_modules())
        if gates is None:
            names = find_gates(model)
        elif callable(gates):
            names = [name for name, module in modules.items() if gates(name, module)]
        elif isinstance(gates, (list, tuple)) and all(isinstance(g, str) for g in gates):
            missing = [g for g in gates if g not in modules]
            if missing:
                raise ValueError(f'gates name no module of the model: {missing}')
            names = list(gates)
        else:
            raise TypeError('gates must be None, a list of module paths, or a predicate (name, module) -> bool')
        if not names:
            raise ValueError('no MoE gate found: name the gate modules with gates=[...] or a predicate')
        no_weight = [n for n in names if not isinstance(getattr(modules[n], 'weight', None), torch.nn.Parameter)]
        if no_weight:
            raise ValueError(f'gates must own the weight Parameter of their logit map; these do not: {no_weight}')
        self.gates = names
        self._gates = [modules[n] for n in names]
        self._k_owners = []
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f'k must be a positive int, got {k!r}')
            for name, gate in zip(names, self._gates):
                parent = modules[name.rpartition('.')[0]]
                owners = [(m, a) for m in (gate, parent) for a in K_ATTRIBUTES if isinstance(getattr(m, a, None), int)]
                if not owners:
                    raise ValueError(f'k was given, but neither gate {name!r} nor its parent has an int attribute '
                                     f'named one of {K_ATTRIBUTES}')
                experts = gate.weight.shape[0]
                if k > experts:
                    raise ValueError(f'k={k} exceeds the {experts} experts of gate {name!r}')
                self._k_owners += owners
        self.k = k
        self._mode = 'top'

    @property
    def current_mode(self):
        return self._mode

    @contextlib.contextmanager
    def mode(self, mode):
        """``with routing.mode('bottom'):`` routes every gate to its bottom-k experts inside the block ('top': the
        usual routing). Parameters and attributes are restored exactly on exit, errors and interrupts included."""
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        undo = []
        previous = self._mode
        try:
            if self.k is not None:
                for owner, attr in self._k_owners:
                    undo.append(functools.partial(setattr, owner, attr, getattr(owner, attr)))
                    setattr(owner, attr, self.k)
            if mode != previous:
                with torch.no_grad():
                    for gate in self._gates:
                        for name in ('weight', 'bias'):
                            p = gate._parameters.get(name)
                            if p is not None:
                                undo.append(functools.partial(gate._parameters.__setitem__, name, p))
                                gate._parameters[name] = torch.nn.Parameter(-p, requires_grad=p.requires_grad)
            self._mode = mode
            yield self
        finally:
            for restore in reversed(undo):
                restore()
            self._mode = previous


def routed(denoiser, routing, mode):
    """A k-diffusion denoiser that runs ``denoiser`` under ``routing.mode(mode)`` for each call."""
    if not isinstance(routing, ExpertRouting):
        raise TypeError(f'routing must be an ExpertRouting, not {type(routing).__name__}')
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')

    def call(x, sigma, **extra_args):
        with routing.mode(mode):
            return denoiser(x, sigma, **extra_args)
    return call
