"""Pair builders: turn one or two denoisers into the three roles a W2SD sampler takes.

A W2SD step uses a **main** denoiser (the regular step), and a reflection **strong** and **weak** leg (paper
App. B). Every builder returns a :class:`Roles`, so sampling is one line::

    r = pairs.guidance(unet_denoiser, cond, uncond)            # Z-Sampling's pair: CFG 5.5 vs CFG 0
    x = sample_w2sd_euler(r.main, x, sigmas, extra_args=r.extra_args, **r.w2sd())

Conditional builders take ``cond`` / ``uncond`` as extra-args dicts of the inner denoiser and run every leg through
classifier-free guidance (:class:`SharedCFG`, one batched forward for both branches; a leg at scale exactly 1 skips
the unconditional branch, at 0 the conditional one). Without ``uncond`` there is no CFG and the scales must be
left unset. Default scales are the paper's (its App. B and Tables 2-3): main step CFG 5.5, reflection legs CFG 1.0
for weight, LoRA and prompt pairs, 0.5 for pipeline pairs, 1.5 everywhere for DiT-MoE.
"""
import dataclasses
from typing import Any, Callable, Optional

import torch

from .cfg import CFGDenoiser, cat_conds
from .reflect import finite_number, resolve_extra_args


@dataclasses.dataclass(frozen=True)
class Roles:
    """The denoisers and extra args of one W2SD setup.

    ``strong=None`` means the main denoiser with the main extra args. ``strong_extra_args`` / ``weak_extra_args``
    are dicts, or functions of the main extra args; ``None`` means the main ones. ``options`` are default W2SD
    options for this pair (e.g. ``lam``); ``w2sd(**overrides)`` gives the sampler keyword arguments.
    """
    main: Callable
    weak: Callable
    strong: Optional[Callable] = None
    extra_args: dict = dataclasses.field(default_factory=dict)
    strong_extra_args: Any = None
    weak_extra_args: Any = None
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for role in ('main', 'weak', 'strong'):
            d = getattr(self, role)
            if not (callable(d) or (role == 'strong' and d is None)):
                raise TypeError(f'Roles.{role} must be a k-diffusion denoiser D(x, sigma, **extra_args), '
                                f'got {type(d).__name__}')
        if not isinstance(self.extra_args, dict):
            raise TypeError(f'Roles.extra_args must be a dict, got {type(self.extra_args).__name__}')
        for role in ('strong', 'weak'):
            ea = getattr(self, f'{role}_extra_args')
            if ea is not None and not (callable(ea) or isinstance(ea, dict)):
                raise TypeError(f'Roles.{role}_extra_args must be a dict, a function of the main extra args, '
                                f'or None (the main ones), got {type(ea).__name__}')

    def w2sd(self, **options):
        """Keyword arguments for ``sample_w2sd_*``: the reflection roles, this pair's options, then ``options``."""
        roles = dict(strong=self.strong, strong_extra_args=self.strong_extra_args, weak=self.weak,
                     weak_extra_args=self.weak_extra_args)
        clash = sorted(roles.keys() & options.keys())
        if clash:
            raise ValueError(f'w2sd() sets the roles itself; build another Roles to change {clash}')
        return {**roles, **self.options, **options}

    def leg(self, role, extra_args=None):
        """``(denoiser, extra_args)`` of ``role`` ('main', 'strong' or 'weak') given the main extra args."""
        if role not in ('main', 'strong', 'weak'):
            raise ValueError(f"role must be 'main', 'strong' or 'weak', got {role!r}")
        ea = self.extra_args if extra_args is None else extra_args
        if role == 'main':
            return self.main, ea
        denoiser, spec = getattr(self, role), getattr(self, f'{role}_extra_args')
        return self.main if denoiser is None else denoiser, ea if spec is None else resolve_extra_args(spec, ea)

    @property
    def strong_is_main(self):
        """True when the strong leg is the main denoiser with the main extra args (shared calls are possible)."""
        return self.strong is None or (self.strong is self.main and self.strong_extra_args is None)


class SharedCFG(CFGDenoiser):
    """Classifier-free guidance over one network whose legs can share a forward.

    A leg's extra args are ``cond``, ``uncond`` (None: no CFG), ``cond_scale``, optionally ``variant`` (the leg's
    choice of network variant, a LoRA scale or an MoE routing, applied per call by ``variants.run``) and shared
    extra args, passed unbatched to every call. ``joint(x, sigma, legs)`` evaluates several legs at one point as a
    single forward over their distinct branches (x repeated per branch, the branches' conds concatenated, the
    variant set per row): the anchored reflection's two legs and difference guidance use it. Nothing is kept
    between calls, so one instance serves any number of threads.
    """

    def __init__(self, inner, variants=None):
        super().__init__(inner)
        self.variants = variants

    def __call__(self, x, sigma, **leg):
        return self.joint(x, sigma, [leg])[0]

    def joint(self, x, sigma, legs):
        """The outputs of the legs (extra-args dicts), one batched forward when they share their other args and
        the layout of their conditioning (else one forward per layout: a ControlNet input on some legs only)."""
        branches, plans, shared, layouts = [], [], None, []
        for leg in legs:
            leg = dict(leg)
            cond, uncond = leg.pop('cond'), leg.pop('uncond', None)
            scale, variant = leg.pop('cond_scale', 1.), leg.pop('variant', None)
            if shared is not None and not _same_args(shared, leg):
                return [self.joint(x, sigma, [each])[0] for each in legs]
            shared = leg
            if variant is not None and self.variants is None:
                raise TypeError('a variant was given, but this SharedCFG has no variants (a LoRA or MoE routing)')
            if uncond is None and not (isinstance(scale, (int, float)) and scale == 1):
                raise ValueError(f'cond_scale {scale!r} needs the unconditional extra args (uncond)')
            plain = isinstance(scale, (int, float)) and scale in (0, 1)
            need = [uncond if scale == 0 else cond] if uncond is None or plain else [uncond, cond]
            layouts.append(_layout(need))
            plans.append(([_index(branches, c, variant) for c in need], scale))
        if len(set(layouts)) > 1:
            outs = [None] * len(legs)
            for layout in dict.fromkeys(layouts):
                group = [i for i, each in enumerate(layouts) if each == layout]
                for i, out in zip(group, self.joint(x, sigma, [legs[i] for i in group])):
                    outs[i] = out
            return outs
        rows = len(branches)
        conds = branches[0][0]
        for c, _ in branches[1:]:
            conds = cat_conds(conds, c)
        xs, sigmas = (torch.cat([x] * rows), torch.cat([sigma] * rows)) if rows > 1 else (x, sigma)
        variants = [v for _, v in branches]
        if self.variants is None:
            out = self.inner(xs, sigmas, **conds, **shared)
        else:
            per_row = variants[0] if len(set(variants)) == 1 else [v for v in variants for _ in range(len(x))]
            out = self.variants.run(per_row, self.inner, xs, sigmas, **conds, **shared)
        outs = out.chunk(rows) if rows > 1 else [out]
        return [outs[i[0]] if len(i) == 1 else outs[i[0]] + (outs[i[1]] - outs[i[0]]) * scale for i, scale in plans]


def _index(branches, cond, variant):
    """Index of the branch (cond by identity, variant by value) in ``branches``, appended if new."""
    for i, (c, v) in enumerate(branches):
        if c is cond and v == variant:
            return i
    branches.append((cond, variant))
    return len(branches) - 1


def _layout(conds):
    """What must agree for conds to be concatenated into one batch (``cfg.cat_conds``): dict keys, sequence
    lengths and plain values, recursively; tensors only by being tensors."""
    def layout(c):
        if isinstance(c, torch.Tensor):
            return torch.Tensor
        if isinstance(c, dict):
            return frozenset((k, layout(v)) for k, v in c.items())
        if isinstance(c, (list, tuple)):
            return tuple(layout(v) for v in c)
        try:
            hash(c)
        except TypeError:  # an unhashable plain value batches only with itself
            return id(c)
        return type(c), c
    return frozenset(layout(c) for c in conds)


def _same_args(a, b):
    return a.keys() == b.keys() and all(a[k] is b[k] or (isinstance(a[k], (int, float, str)) and a[k] == b[k])
                                        for k in a)


def _denoiser(name, d):
    if not callable(d):
        raise TypeError(f'{name} must be a k-diffusion denoiser D(x, sigma, **extra_args), got {type(d).__name__}')
    return d


def _dict(name, value, default=None):
    if value is None and default is not None:
        return default
    if not isinstance(value, dict):
        raise TypeError(f'{name} must be a dict of extra args for the denoiser, got {type(value).__name__}')
    return value


def _scales(uncond, given, paper):
    """CFG scales (main, strong, weak): the paper's where not given; no CFG (and no scales) without uncond."""
    if uncond is None:
        if any(s is not None and s != 1 for s in given):
            raise ValueError('CFG scales need the unconditional extra args: pass uncond=..., or leave '
                             'main_scale/strong_scale/weak_scale unset for a pair without CFG')
        return 1., 1., 1.
    for name, s in zip(('main_scale', 'strong_scale', 'weak_scale'), given):
        if s is not None and not finite_number(s):
            raise ValueError(f'{name} must be a finite number (negative allowed), got {s!r}')
    return tuple(p if s is None else float(s) for s, p in zip(given, paper))


def _roles(main, strong, weak, shared, options=None, variants=None):
    """Roles from three legs ``(denoiser, cond, uncond, scale[, variant])``.

    Each model gets one SharedCFG for all its legs where it needs one: for CFG, for ``variants`` (a LoRA or MoE
    routing), or to batch both reflection legs on one network.
    """
    wrapped = {}
    one_network = strong[0] is weak[0]

    def leg(denoiser, cond, uncond, scale, variant=None):
        if uncond is None and variants is None and not one_network:
            return denoiser, {**cond, **shared}
        cfg = wrapped.setdefault(id(denoiser), SharedCFG(denoiser, variants))
        ea = {'cond': cond, 'uncond': uncond, 'cond_scale': scale, **shared}
        return cfg, ea if variant is None else {**ea, 'variant': variant}

    (m, m_ea), (s, s_ea), (w, w_ea) = leg(*main), leg(*strong), leg(*weak)
    same = all(a is b for a, b in zip(main[:3], strong[:3])) and main[3:] == strong[3:]
    return Roles(main=m, extra_args=m_ea, strong=None if same else s, strong_extra_args=None if same else s_ea,
                 weak=w, weak_extra_args=w_ea, options=dict(options or {}))


def guidance(model, cond, uncond, *, strong_scale=5.5, weak_scale=0., main_scale=None, shared=None):
    """One conditional denoiser at two CFG scales (Z-Sampling's pair: strong 5.5, weak 0; negative scales allowed).

    ``model(x, sigma, **cond)`` is the conditional denoiser; ``cond`` / ``uncond`` its extra args for each branch;
    ``shared`` extra args go unbatched to every call. The main step runs at ``main_scale`` (default: strong_scale).
    To first order this pair is CFG at ``2 strong_scale - weak_scale`` (since ``D_s + (D_s - D_w)`` is the first-order effect of a reflection).
    """
    _denoiser('model', model)
    cond, uncond = _dict('cond', cond), _dict('uncond', uncond)
    main_scale, strong_scale, weak_scale = _scales(uncond, (main_scale, strong_scale, weak_scale),
                                                   (strong_scale, strong_scale, weak_scale))
    return _roles((model, cond, uncond, main_scale), (model, cond, uncond, strong_scale),
                  (model, cond, uncond, weak_scale), _dict('shared', shared, {}))


def condition(model, cond, weak_cond, uncond=None, *, main_scale=None, strong_scale=None, weak_scale=None,
              shared=None):
    """Two conditionings on one denoiser: ``cond`` (e.g. the LLM-refined prompt) strong, ``weak_cond`` (raw) weak.

    Paper (Table 5): reflection legs at CFG 1.0, main step at CFG 5.5 with the strong condition.
    """
    _denoiser('model', model)
    cond, weak_cond = _dict('cond', cond), _dict('weak_cond', weak_cond)
    uncond = None if uncond is None else _dict('uncond', uncond)
    main_scale, strong_scale, weak_scale = _scales(uncond, (main_scale, strong_scale, weak_scale), (5.5, 1., 1.))
    return _roles((model, cond, uncond, main_scale), (model, cond, uncond, strong_scale),
                  (model, weak_cond, uncond, weak_scale), _dict('shared', shared, {}))


prompt = condition


def weights(strong, weak, cond=None, uncond=None, *, main=None, main_scale=None, strong_scale=None,
            weak_scale=None, shared=None):
    """Two denoisers taking the same extra args, e.g. two checkpoints of one family (DreamShaper vs SD1.5).

    ``main`` (default: ``strong``) takes the regular step. Paper: reflection legs at CFG 1.0, main 5.5 (Tables 1,
    8); weight + guidance together (Table 6) is ``strong_scale=5.5, weak_scale=0.``; video (Table 12) 3.0 vs 1.0.
    """
    _denoiser('strong', strong)
    _denoiser('weak', weak)
    main = strong if main is None else _denoiser('main', main)
    cond = {} if cond is None else _dict('cond', cond)
    uncond = None if uncond is None else _dict('uncond', uncond)
    main_scale, strong_scale, weak_scale = _scales(uncond, (main_scale, strong_scale, weak_scale), (5.5, 1., 1.))
    return _roles((main, cond, uncond, main_scale), (strong, cond, uncond, strong_scale),
                  (weak, cond, uncond, weak_scale), _dict('shared', shared, {}))


def lora(model, switchable_lora, cond=None, uncond=None, *, strong_lora=0.8, weak_lora=-1.5, main_lora=None,
         main_scale=None, strong_scale=None, weak_scale=None, shared=None):
    """One denoiser with a LoRA at two scales (paper: strong 0.8, weak -1.5, main 0.8; CFG 1.0 legs, main 5.5).

    ``switchable_lora`` is a :class:`w2sd_samplers.lora.SwitchableLoRA` on ``model``'s network; ``main_lora``
    defaults to ``strong_lora``. The scale travels with each call (per batch row when legs are batched).
    """
    from . import lora as lora_module  # the LoRA machinery is only needed for this pair

    _denoiser('model', model)
    if not isinstance(switchable_lora, lora_module.SwitchableLoRA):
        raise TypeError(f'switchable_lora must be a SwitchableLoRA, not {type(switchable_lora).__name__}')
    main_lora = strong_lora if main_lora is None else main_lora
    loras = [lora_module.check_scale(name, s) for name, s in
             (('main_lora', main_lora), ('strong_lora', strong_lora), ('weak_lora', weak_lora))]
    cond = {} if cond is None else _dict('cond', cond)
    uncond = None if uncond is None else _dict('uncond', uncond)
    scales = _scales(uncond, (main_scale, strong_scale, weak_scale), (5.5, 1., 1.))
    return _roles(*[(model, cond, uncond, c, s) for c, s in zip(scales, loras)], _dict('shared', shared, {}),
                  variants=switchable_lora)


def moe(model, routing, cond=None, uncond=None, *, main_scale=None, strong_scale=None, weak_scale=None,
        shared=None):
    """One mixture-of-experts denoiser routed to its top-k experts (strong, main) vs its bottom-k (weak).

    ``routing`` is a :class:`w2sd_samplers.moe.ExpertRouting` on ``model``'s network; the routing travels with
    each call (per batch row when legs are batched). Paper (DiT-MoE-S, Table 3): CFG 1.5 for every leg.
    """
    from . import moe as moe_module  # the routing machinery is only needed for this pair

    _denoiser('model', model)
    if not isinstance(routing, moe_module.ExpertRouting):
        raise TypeError(f'routing must be an ExpertRouting, not {type(routing).__name__}')
    cond = {} if cond is None else _dict('cond', cond)
    uncond = None if uncond is None else _dict('uncond', uncond)
    scales = _scales(uncond, (main_scale, strong_scale, weak_scale), (1.5, 1.5, 1.5))
    return _roles(*[(model, cond, uncond, c, m) for c, m in zip(scales, ('top', 'top', 'bottom'))],
                  _dict('shared', shared, {}), variants=routing)


def pipeline(model, extra, cond=None, uncond=None, *, uncond_extra=None, main_scale=None, strong_scale=None,
             weak_scale=None, shared=None):
    """The same denoiser with (strong, main) and without (weak) extra conditioning inputs.

    ``extra`` holds the extra args only the strong leg gets (ControlNet image or residuals, IP-Adapter embeddings),
    batched like ``cond``; ``uncond_extra`` (default ``extra``) is added to ``uncond`` for the strong leg. The weak
    leg is the plain pipeline. Paper (Fig. 10, ControlNet): reflection legs at CFG 0.5, main step 5.5.
    """
    _denoiser('model', model)
    extra = _dict('extra', extra)
    cond = {} if cond is None else _dict('cond', cond)
    uncond = None if uncond is None else _dict('uncond', uncond)
    main_scale, strong_scale, weak_scale = _scales(uncond, (main_scale, strong_scale, weak_scale), (5.5, .5, .5))
    strong_cond = {**cond, **extra}
    strong_uncond = None if uncond is None else {**uncond, **_dict('uncond_extra', uncond_extra, extra)}
    return _roles((model, strong_cond, strong_uncond, main_scale), (model, strong_cond, strong_uncond, strong_scale),
                  (model, cond, uncond, weak_scale), _dict('shared', shared, {}))


def compose(*roles, successive=False):
    """Several pairs at once: merged into one pair (default) or as successive reflections.

    ``successive=True``: on each reflected step, one reflection per pair in the given order (2 NFE per pair),
    then the first pair's main step; each pair's legs keep their own extra args.

    Merged: one pair whose difference is the sum of the given pairs' differences, in one reflection per step.

    Strong leg: the first pair's strong leg. Weak leg: ``D_w1 - sum_{k>1} (D_sk - D_wk)``, so
    ``D_strong - D_weak = sum_k (D_sk - D_wk)`` where both legs meet. Main step: the first pair's. A weak call costs
    ``2K - 1`` denoiser calls for K pairs. Each pair's legs keep their own extra args (resolved against that pair's
    ``extra_args``). For the paper's weight + guidance setting (Table 6) the cheaper product form
    ``weights(strong, weak, cond, uncond, strong_scale=5.5, weak_scale=0.)`` is the same difference telescoped.
    """
    if not roles or not all(isinstance(r, Roles) for r in roles):
        raise TypeError('compose needs one or more Roles (from the pair builders)')
    legs = [(r.leg('strong'), r.leg('weak')) for r in roles]
    first = roles[0]
    if successive:
        then = tuple((s, w, s_ea, w_ea) for (s, s_ea), (w, w_ea) in legs[1:])
        return dataclasses.replace(first, options={**first.options, 'then': then})

    def weak(x, sigma, **_):
        # D_w1 - sum_{k>1} (D_sk - D_wk): the first pair's difference plus the others'.
        w1, w1_ea = legs[0][1]
        out = w1(x, sigma, **w1_ea)
        for (s, s_ea), (w, w_ea) in legs[1:]:
            out = out - (s(x, sigma, **s_ea) - w(x, sigma, **w_ea))
        return out

    return Roles(main=first.main, extra_args=first.extra_args, strong=first.strong,
                 strong_extra_args=first.strong_extra_args, weak=weak, weak_extra_args={}, options=first.options)
