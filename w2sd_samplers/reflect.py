"""The W2SD reflection operator and its per-step schedule.

A reflection at noise level sigma over the step sigma -> sigma_next (h = sigma - sigma_next) is, in k-diffusion's
VE coordinates (``x = x0 + sigma * eps``, Euler derivative ``(x - D) / sigma``)::

    x'  = x  + (sigma_next - sigma) * (x  - D_strong(x,  sigma)) / sigma     # strong denoise (DDIM = Euler)
    x~  = x' + (sigma - sigma_next) * (x' - D_weak(x', sw))      / sw        # weak inversion
    x  <- x + strength * (x~ - x)

with ``sw = sigma`` (``weak_sigma="current"``, the paper's Eq. 5 and the official code) or ``sw = sigma_next``
(``"next"``, textbook inversion). To first order it moves x by ``(h / sigma) (D_strong - D_weak)``.
``form="anchored"`` evaluates both legs at ``(x, sigma)``: ``x + (h / sigma_next) (D_strong - D_weak)``, which is
exactly the identity when weak equals strong; its gain h / sigma_next (and the paper form's h / sw with
``weak_sigma="next"``) is capped at 1 / eps of x's dtype (a step to a tiny sigma_next), and on a shared network
(``pairs.SharedCFG``) both legs run as one batched forward.
"""
import math
import numbers

import torch

WEAK_SIGMAS = ('current', 'next')
FORMS = ('paper', 'anchored')
# Far beyond any useful strength (the paper uses 1), and small enough that x + strength * displacement stays finite.
MAX_STRENGTH = 1000.


def resolve_extra_args(spec, main_extra_args, name='an extra-args function'):
    """A role's extra args: ``spec`` itself, or ``spec(main_extra_args)`` when it is a function (``name`` names it
    in the error when it returns something else than a dict)."""
    # A function spec is evaluated per call: hosts (A1111) swap conds inside the live extra_args mid-run.
    if not callable(spec):
        return spec
    extra_args = spec(main_extra_args)
    if not isinstance(extra_args, dict):
        raise TypeError(f'{name} returned {type(extra_args).__name__}: a function given for extra args must return '
                        'a dict of keyword arguments for the denoiser')
    return extra_args


def check_x(x):
    """``x`` after checking that it is a batched tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'x must be a torch.Tensor, got {type(x).__name__}')
    if x.ndim == 0:
        raise ValueError('x must have a batch dimension (shape [B, ...]), got a 0-dim tensor')
    return x


def check_denoiser(role, denoiser):
    """``denoiser`` itself, after checking that it can be a k-diffusion denoiser; errors name the role."""
    if isinstance(denoiser, torch.nn.Module) and type(denoiser).__module__.startswith('diffusers.'):
        raise TypeError(f'the {role} denoiser is a diffusers {type(denoiser).__name__}, not a k-diffusion denoiser '
                        f'D(x, sigma, **extra_args): wrap it first, e.g. w2sd_samplers.adapters.unet_denoiser(unet, '
                        f'pipe.scheduler) (see w2sd_samplers.adapters for the other families)')
    if not callable(denoiser):
        name = 'model' if role == 'main' else role
        raise TypeError(f'{name} (the {role} denoiser) must be a callable k-diffusion denoiser '
                        f'D(x, sigma, **extra_args), got {type(denoiser).__name__}')
    return denoiser


def _check_output(role, out, x):
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f'the {role} denoiser returned {got} for an input of shape {tuple(x.shape)}; '
                         f'a k-diffusion denoiser must return a denoised estimate shaped like x')
    return out


def checked(role, denoiser):
    """``denoiser`` with a check that its output is shaped like its input; errors name the role."""
    def call(x, sigma, **extra_args):
        return _check_output(role, denoiser(x, sigma, **extra_args), x)
    return call


def _call(role, denoiser, x, sigma, extra_args):
    return _check_output(role, denoiser(x, x.new_full([x.shape[0]], sigma), **extra_args), x)


def legs_at(x, sigma, legs, roles):
    """The outputs of several legs ``(denoiser, extra_args)`` at the same ``(x, sigma)``, sigma a ``[B]`` tensor.

    Legs on one denoiser that has a ``joint(x, sigma, [extra_args, ...])`` method (``pairs.SharedCFG``: a LoRA
    scale, MoE routing, prompt or CFG scale per leg) run as one batched forward; the others one call each.
    """
    outs = [None] * len(legs)
    for i, (d, ea) in enumerate(legs):
        if outs[i] is not None:
            continue
        group = [j for j in range(i, len(legs)) if legs[j][0] is d] if hasattr(d, 'joint') else [i]
        if len(group) == 1:
            outs[i] = _check_output(roles[i], d(x, sigma, **ea), x)
            continue
        got = d.joint(x, sigma, [legs[j][1] for j in group])
        for j, out in zip(group, got):
            outs[j] = _check_output(roles[j], out, x)
    return outs


def reflect(x, sigma, sigma_next, strong, weak, strong_extra_args=None, weak_extra_args=None, *,
            strength=1., weak_sigma='current', form='paper', reflections=1, roles=('strong', 'weak')):
    """Reflect ``x`` at ``sigma`` over the step to ``sigma_next > 0``; returns a new tensor.

    ``strong`` and ``weak`` are k-diffusion denoisers ``D(x, sigma[B], **extra_args)``; ``roles`` names them in
    errors.
    """
    check_x(x)
    check_options(strength=strength, weak_sigma=weak_sigma, form=form, reflections=reflections)
    if not float(sigma_next) > 0:
        raise ValueError(f'sigma_next must be > 0 to reflect (got {float(sigma_next)}): '
                         'a reflection into sigma = 0 has no inversion')
    if not float(sigma) > float(sigma_next):
        raise ValueError(f'sigma ({float(sigma)}) must be larger than sigma_next ({float(sigma_next)})')
    ea_s = {} if strong_extra_args is None else strong_extra_args
    ea_w = {} if weak_extra_args is None else weak_extra_args
    for _ in range(reflections):
        x = _reflect_once(x, sigma, sigma_next, strong, weak, ea_s, ea_w, strength, weak_sigma, form, roles)
    return x


def _reflect_once(x, sigma, sigma_next, strong, weak, ea_s, ea_w, strength, weak_sigma, form, roles):
    # Step ratios are formed first (in float64), so that fp16 latents at sigma ~ 700 never hold h * (x - D).
    sigma, sigma_next = float(sigma), float(sigma_next)
    h = sigma - sigma_next
    # Past 1 / eps a gain h / sigma_next amplifies rounding noise as large as D itself: cap it (tiny sigma_next).
    max_gain = 1 / torch.finfo(x.dtype).eps
    if form == 'anchored':
        d_strong, d_weak = legs_at(x, x.new_full([x.shape[0]], sigma), [(strong, ea_s), (weak, ea_w)], roles)
        return x + (strength * min(h / sigma_next, max_gain)) * (d_strong - d_weak)
    x_strong = x - (h / sigma) * (x - _call(roles[0], strong, x, sigma, ea_s))
    sw = sigma if weak_sigma == 'current' else sigma_next
    x_back = x_strong + min(h / sw, max_gain) * (x_strong - _call(roles[1], weak, x_strong, sw, ea_w))
    return x + strength * (x_back - x)


def finite_number(value):
    """True for a finite int or float; bools, strings, tensors, inf and nan are not numbers to an option."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_options(*, strength, weak_sigma, form, reflections):
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not abs(strength) <= MAX_STRENGTH:
        raise ValueError(f'strength must be a finite number in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}] '
                         f'(1.0 = the paper), got {strength!r}')
    if weak_sigma not in WEAK_SIGMAS:
        raise ValueError(f'weak_sigma must be one of {WEAK_SIGMAS}, got {weak_sigma!r}')
    if form not in FORMS:
        raise ValueError(f'form must be one of {FORMS}, got {form!r}')
    if form == 'anchored' and weak_sigma != 'current':
        raise ValueError("form='anchored' evaluates the weak leg at the current sigma; "
                         "weak_sigma='next' only applies to form='paper'")
    if isinstance(reflections, bool) or not isinstance(reflections, numbers.Integral) or reflections < 1:
        raise ValueError(f'reflections (per step) must be an integer >= 1, got {reflections!r}')


def check_sigmas(sigmas):
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f'sigmas must be a torch.Tensor, got {type(sigmas).__name__}')
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f'sigmas must be a 1-D schedule with at least 2 entries, got shape {tuple(sigmas.shape)}')
    if not torch.isfinite(sigmas).all():
        raise ValueError('sigmas must be finite (found inf or nan)')
    if (sigmas < 0).any():
        raise ValueError('sigmas must be >= 0 (found a negative sigma)')
    if (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError('sigmas must be non-increasing (noisiest first, as k-diffusion schedules are)')
    if not sigmas[0] > 0:
        raise ValueError('sigmas must start above 0 (got a schedule of zeros): sampling starts from noise')


def window_bounds(sigma_window):
    """``(lo, hi)`` of a sigma window; ``None`` is the whole range."""
    if sigma_window is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in sigma_window)
    except (TypeError, ValueError):
        raise ValueError(f'sigma_window must be a pair (lo, hi) of numbers, got {sigma_window!r}') from None
    if not lo <= hi:
        raise ValueError(f'sigma_window must have lo <= hi, got {sigma_window!r}')
    return lo, hi


def reflected_steps(sigmas, lam=None, sigma_window=None):
    """Boolean list: does step i (sigmas[i] -> sigmas[i+1]) reflect?

    ``lam``: reflect the first ``lam`` steps (the noisiest); default ``len(sigmas) - 2``, i.e. every step but
    the last (the paper's T=50, lambda=49). ``sigma_window=(lo, hi)``: reflect the steps with
    ``lo <= sigmas[i] <= hi`` instead. A step into sigma = 0 and a zero-length step (a repeated sigma) never
    reflect.
    """
    n = len(sigmas) - 1
    if lam is not None and sigma_window is not None:
        raise ValueError('give lam (first lambda steps) or sigma_window (lo, hi), not both')
    if sigma_window is not None:
        lo, hi = window_bounds(sigma_window)
        chosen = [lo <= float(s) <= hi for s in sigmas[:-1]]
    else:
        lam = n - 1 if lam is None else lam
        if isinstance(lam, bool) or not isinstance(lam, numbers.Integral) or lam < 0:
            raise ValueError(f'lam (number of reflected steps) must be an integer >= 0, got {lam!r}')
        chosen = [i < lam for i in range(n)]
    return [c and float(sigmas[i]) > float(sigmas[i + 1]) > 0 for i, c in enumerate(chosen)]


class Reflection:
    """The W2SD options of one sampler call, bound to its model, schedule and extra args.

    ``refl(x, i)`` returns x reflected for step i, or x itself when step i does not reflect.

    Options (keyword-only, paper defaults):
      weak: the weak denoiser (required).
      weak_extra_args: dict, or a function of the main extra_args returning a dict (default: the main ones).
      strong: the reflection's strong denoiser (default: the main model).
      strong_extra_args: as weak_extra_args, for the strong leg (default: the main ones).
      lam: reflect the first lam steps (default: all but the last). sigma_window: (lo, hi) instead of lam.
      strength: multiplies the reflection displacement (1.0 = the paper; 0 turns reflection off).
      weak_sigma: 'current' (paper Eq. 5) or 'next' (textbook inversion).
      form: 'paper' or 'anchored' (both legs at (x, sigma)).
      reflections: reflections per reflected step (1 = the paper).
      then: further pairs ``(strong, weak, strong_extra_args, weak_extra_args)`` reflected in order after the
        first on every reflected step, with the same options (successive composition, ``pairs.compose``);
        ``None`` entries mean the main denoiser / extra args.
    """

    def __init__(self, model, sigmas, extra_args, *, weak=None, weak_extra_args=None, strong=None,
                 strong_extra_args=None, lam=None, sigma_window=None, strength=1., weak_sigma='current',
                 form='paper', reflections=1, then=()):
        check_sigmas(sigmas)
        check_options(strength=strength, weak_sigma=weak_sigma, form=form, reflections=reflections)
        if weak is None:
            raise TypeError('W2SD needs a weak denoiser: pass weak=<callable D(x, sigma, **extra_args)> '
                            '(see w2sd_samplers.pairs for CFG, prompt, LoRA and checkpoint pairs)')
        if not isinstance(extra_args, dict):
            raise TypeError(f'extra_args must be a dict of keyword arguments for the model, '
                            f'got {type(extra_args).__name__}')
        for role, d in (('main', model), ('weak', weak), ('strong', strong)):
            if d is not None or role == 'main':
                check_denoiser(role, d)
        for role, ea in (('weak', weak_extra_args), ('strong', strong_extra_args)):
            if ea is not None and not (callable(ea) or isinstance(ea, dict)):
                raise TypeError(f'{role}_extra_args must be a dict or a function of the main extra_args, '
                                f'got {type(ea).__name__}')
        then = tuple(then) if isinstance(then, (tuple, list)) else None
        if then is None or not all(isinstance(p, tuple) and len(p) == 4 and callable(p[1]) for p in then):
            raise TypeError('then must be a sequence of (strong, weak, strong_extra_args, weak_extra_args) tuples '
                            'with a callable weak denoiser (see pairs.compose(..., successive=True))')
        self.main = checked('main', model)
        self.sigmas, self.extra_args = sigmas, extra_args
        # A strong leg left to default is the main model: its errors are the main model's.
        self.pairs = tuple((model if s is None else s, w, s_ea, w_ea, ('main' if s is None else 'strong', 'weak'))
                           for s, w, s_ea, w_ea in ((strong, weak, strong_extra_args, weak_extra_args),) + then)
        self.options = dict(strength=strength, weak_sigma=weak_sigma, form=form, reflections=reflections)
        self.steps = reflected_steps(sigmas, lam, sigma_window) if strength != 0 else [False] * (len(sigmas) - 1)

    def __call__(self, x, i):
        if not self.steps[i]:
            return x
        ea = self.extra_args
        for k, (strong, weak, strong_spec, weak_spec, roles) in enumerate(self.pairs):
            where = '' if k == 0 else f'then[{k - 1}]: '
            ea_s = ea if strong_spec is None else resolve_extra_args(strong_spec, ea, where + 'strong_extra_args')
            ea_w = ea if weak_spec is None else resolve_extra_args(weak_spec, ea, where + 'weak_extra_args')
            x = reflect(x, self.sigmas[i], self.sigmas[i + 1], strong, weak, ea_s, ea_w, roles=roles,
                        **self.options)
        return x
