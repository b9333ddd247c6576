"""The W2SD setting an eval chose, written as the values a user types into ComfyUI's W2SD KSampler, the A1111 /
Forge W2SD panel, and ``w2sd generate`` (the names are those of ``wrappers/comfyui/nodes.py``,
``wrappers/sd_webui`` and ``w2sd generate --help``)."""
import dataclasses
import shlex

from ..tuning import reflected

# The webui's labels of the k-diffusion samplers that have W2SD twins ("W2SD " + label in its sampler list).
WEBUI_SAMPLERS = {'euler': 'Euler', 'euler_ancestral': 'Euler a', 'heun': 'Heun', 'dpm_2': 'DPM2',
                  'dpm_2_ancestral': 'DPM2 a', 'lms': 'LMS', 'dpmpp_2s_ancestral': 'DPM++ 2S a',
                  'dpmpp_sde': 'DPM++ SDE', 'dpmpp_2m': 'DPM++ 2M', 'dpmpp_2m_sde': 'DPM++ 2M SDE',
                  'dpmpp_3m_sde': 'DPM++ 3M SDE', 'heunpp2': 'HeunPP2 (Forge)', 'ipndm': 'IPNDM (Forge)',
                  'ipndm_v': 'IPNDM_V (Forge)'}
# --schedule -> (ComfyUI scheduler, webui schedule type). 'native' is diffusers' evenly spaced ('leading') timestep
# grid; the hosts' nearest grids are evenly spaced in timestep too but may end at another sigma.
SCHEDULES = {'karras': ('karras', 'Karras'), 'exponential': ('exponential', 'Exponential'),
             'native': ('ddim_uniform (nearest to diffusers\' timestep grid)',
                        'DDIM (nearest to diffusers\' timestep grid)')}


@dataclasses.dataclass
class Run:
    """What the eval ran: the pair (``kind``, ``value``, LoRA ``scales``), CFGs, sampler and schedule."""
    kind: str
    value: object
    scales: tuple
    cfg: float
    strong_cfg: float
    weak_cfg: float
    sampler: str
    schedule: str
    negative_prompt: str = None


def _g(v):
    return f'{v:g}'


def w2sd_values(setting):
    """``(form, weak_sigma, lam, strength)`` of a W2SD or Z-Sampling :class:`~.methods.Setting` (lam: reflected
    steps counted from the first; None with a sigma window)."""
    from .methods import METHODS
    p = setting.options
    form = (METHODS.get(setting.method) or {}).get('form', 'paper')
    weak_sigma = (METHODS.get(setting.method) or {}).get('weak_sigma', 'current')
    lam = None if p.get('window') is not None else reflected(setting.steps, p['lam_frac'])
    return form, weak_sigma, lam, p['strength']


def instructions(setting, run):
    """Markdown bullet lines: the ComfyUI node values, the webui panel values and the ``w2sd generate`` command of
    a W2SD ``setting`` run on ``run``'s pair."""
    form, weak_sigma, lam, strength = w2sd_values(setting)
    r = run
    lines = []
    if lam is None:
        lines.append(f'- This setting reflects on the sigma window {setting.options["window"]}; the hosts take a '
                     'step count `lam` (the first lam steps) instead: count the steps of your schedule inside the '
                     'window.')
        lam_text = 'LAM'
    else:
        lam_text = str(lam)
    comfy_sched, webui_sched = SCHEDULES[r.schedule]
    strong, weak = _g(r.strong_cfg), _g(r.weak_cfg)
    if r.kind == 'prompt':
        weak_inputs = f'; `weak_positive` = CLIP Text Encode of "{r.value}"'
    elif r.kind == 'lora':
        weak_inputs = (f'; load the model without the LoRA, `Create Hook LoRA` ({r.value}) at {_g(r.scales[0])} on '
                       f'`positive`/`negative` and at {_g(r.scales[1])} on `weak_positive`/`weak_negative`')
    elif r.kind == 'weights':
        weak_inputs = f'; `Create Hook Model as LoRA` from {r.value} (strength 1.0) on `weak_positive`/`weak_negative`'
    else:
        weak_inputs = ''
    lines.append(f'- **ComfyUI**, W2SD KSampler: `steps` {setting.steps}, `cfg` {_g(r.cfg)}, `sampler_name` '
                 f'{r.sampler}, `scheduler` {comfy_sched}, `strong_cfg` {strong}, `weak_cfg` {weak}, `lam` '
                 f'{lam_text}, `strength` {_g(strength)}, `weak_sigma` {weak_sigma}, `form` {form}, `reflections` '
                 f'1{weak_inputs}.')
    lines.append('- **A1111 / Forge**: ' + _webui(setting, r, form, weak_sigma, lam_text, strength, webui_sched))
    lines.append('- **w2sd generate**: ' + _generate(setting, r, form, weak_sigma, lam_text, strength))
    return lines


def _webui(setting, r, form, weak_sigma, lam_text, strength, schedule):
    if form != 'paper':
        return (f'the webui panel has the paper form only, not `{form}`; use ComfyUI or `w2sd generate` for this '
                'setting.')
    if r.sampler not in WEBUI_SAMPLERS:
        return f'the webui has no W2SD twin of `{r.sampler}`; use ComfyUI or `w2sd generate`.'
    if r.kind == 'weights':
        return 'Forge only: weak model `checkpoint` with the weak checkpoint as a .safetensors file; ' + \
            _panel(setting, r, 'checkpoint', weak_sigma, lam_text, strength, schedule)
    return _panel(setting, r, r.kind, weak_sigma, lam_text, strength, schedule)


def _panel(setting, r, kind, weak_sigma, lam_text, strength, schedule):
    head = (f'sampler "W2SD {WEBUI_SAMPLERS[r.sampler]}", schedule type {schedule}, steps {setting.steps}, '
            f'CFG scale {_g(r.cfg)}; W2SD panel: Enable, Weak model `{kind}`')
    if kind == 'cfg':
        if r.strong_cfg != r.cfg:
            return (f'the panel runs the strong leg at the main CFG ({_g(r.cfg)}), this run at {_g(r.strong_cfg)}; '
                    'use ComfyUI or `w2sd generate`.')
        weak = f', Weak CFG {_g(r.weak_cfg)}'
    else:
        if r.strong_cfg != r.weak_cfg:
            return (f'the panel runs both reflection legs at one Reflection CFG, this run at {_g(r.strong_cfg)} and '
                    f'{_g(r.weak_cfg)}; use ComfyUI or `w2sd generate`.')
        weak = f', Reflection CFG {_g(r.strong_cfg)}'
        if kind == 'prompt':
            weak = f', Weak prompt "{r.value}"' + weak
        elif kind == 'lora':
            weak = (f', Weak LoRA multiplier {_g(r.scales[1])} (prompt `<lora:NAME:{_g(r.scales[0])}>`; A1111 '
                    'only)') + weak
    return head + weak + f', Reflected steps lambda {lam_text}, Reflection strength {_g(strength)}, Weak sigma ' \
        f'{weak_sigma}.'


def _generate(setting, r, form, weak_sigma, lam_text, strength):
    argv = ['w2sd', 'generate', 'MODEL', '--prompt', 'PROMPT', '--steps', str(setting.steps), '--sampler', r.sampler,
            '--schedule', r.schedule, '--cfg', _g(r.cfg)]
    if r.negative_prompt:
        argv += ['--negative-prompt', r.negative_prompt]
    if r.strong_cfg != r.cfg:
        argv += ['--strong-cfg', _g(r.strong_cfg)]
    if r.weak_cfg != r.strong_cfg:
        argv += ['--weak-cfg', _g(r.weak_cfg)]
    if r.kind == 'prompt':
        argv += ['--weak-prompt', r.value]
    elif r.kind == 'weights':
        argv += ['--weak-model', r.value]
    elif r.kind == 'lora':
        argv += ['--lora', r.value, '--lora-scales', _g(r.scales[0]), _g(r.scales[1])]
    argv += ['--form', form, '--lam', lam_text, '--strength', _g(strength)]
    if weak_sigma != 'current':
        return 'has no weak-sigma flag; the `next` form runs in ComfyUI and the webui.'
    return f'`{shlex.join(argv)}`'

