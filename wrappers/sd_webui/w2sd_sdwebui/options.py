"""The W2SD script's settings: parsing and validation of UI/API values, infotext and paste-back.

The script's ``ui()`` returns one component per name in ``ARGS``, in that order; the webui passes their values
positionally to ``process()``. API clients send one dict (``alwayson_scripts: {"W2SD": {"args": [{"enabled": true,
"weak": "prompt", ...}]}}``); names it leaves out take their defaults. A positional list also reaches ``process()``,
but the host pads a short one with the panel's defaults and cuts a long one to ``len(ARGS)`` before the script
sees it, so a list in the wrong order or length cannot be caught here (docs/sd_webui.md, API).
"""
import dataclasses
import math

from w2sd_samplers.reflect import WEAK_SIGMAS, finite_number

# cfg: the same model at a lower CFG (paper Table 4 pairs CFG 5.5 with CFG 0). prompt: another prompt.
# lora: the loaded LoRAs at another multiplier (A1111 only). checkpoint: a second checkpoint (Forge only).
KINDS = ('cfg', 'prompt', 'lora', 'checkpoint')
HOST_KINDS = {'A1111': ('cfg', 'prompt', 'lora'), 'Forge': ('cfg', 'prompt', 'checkpoint')}


@dataclasses.dataclass(frozen=True)
class Options:
    enabled: bool = False
    weak: str = 'cfg'
    weak_cfg: float = 0.0
    weak_prompt: str = ''
    weak_negative_prompt: str = ''      # empty: the main negative prompt
    weak_lora: float = -1.5             # the paper's weak LoRA scale
    lora_names: str = ''                # comma-separated; empty: every loaded LoRA
    weak_checkpoint: str = ''
    reflection_cfg: float = 1.0         # both reflection legs of prompt/lora/checkpoint pairs (paper App. B.1)
    lam: int = -1                       # reflected steps; -1: all but the last (the paper's lambda = T - 1)
    strength: float = 1.0
    weak_sigma: str = 'current'

    @property
    def lora_name_list(self):
        return [n.strip() for n in self.lora_names.split(',') if n.strip()]


ARGS = tuple(f.name for f in dataclasses.fields(Options))
DEFAULTS = Options()
# The panel's labels, which messages name.
LABELS = {
    'enabled': 'Enable', 'weak': 'Weak model', 'weak_cfg': 'Weak CFG', 'weak_prompt': 'Weak prompt',
    'weak_negative_prompt': 'Weak negative prompt', 'weak_lora': 'Weak LoRA multiplier', 'lora_names': 'LoRA names',
    'weak_checkpoint': 'Weak checkpoint', 'reflection_cfg': 'Reflection CFG', 'lam': 'Reflected steps lambda',
    'strength': 'Reflection strength', 'weak_sigma': 'Weak sigma',
}
# The numeric settings' ranges: the panel's sliders have these, and UI and API values are held to them (_number).
# lam: -1 or any count over the API (a count of the steps or more is the same as -1); its slider ends at 150,
# the webui's largest step count.
RANGES = {'weak_cfg': (-5., 30.), 'weak_lora': (-4., 4.), 'reflection_cfg': (0., 30.), 'strength': (-10., 10.)}
LAM_SLIDER_MAX = 150


def _number(name, value):
    lo, hi = RANGES[name]
    if not finite_number(value) or not lo <= value <= hi:
        raise ValueError(f'W2SD: {name} ({LABELS[name]}) must be a finite number in [{lo:g}, {hi:g}], '
                         f'got {value!r}')
    return float(value)


def _integer(name, value):
    # Gradio sliders send integral floats (10.0); 2.5, inf, nan and strings are errors, not truncations.
    if not finite_number(value) or value != int(value):
        raise ValueError(f'W2SD: {name} must be a whole number, got {value!r}')
    return int(value)


def parse(*args):
    """``Options`` from the script's values: all of ``ARGS`` in the UI's order, or a dict of ``ARGS`` names in the
    first slot (API; names it leaves out take their defaults, and the host's UI defaults in the other slots are
    ignored). Anything else is a ``ValueError`` naming the setting."""
    if args and isinstance(args[0], dict):
        if len(args) not in (1, len(ARGS)):
            raise ValueError(f'W2SD: got a settings dict and {len(args) - 1} more script args; the W2SD panel has '
                             f'{len(ARGS)} settings ({", ".join(ARGS)}): send one dict or all {len(ARGS)} values')
        unknown = set(args[0]) - set(ARGS)
        if unknown:
            raise ValueError(f'W2SD: unknown settings {sorted(unknown)}; known: {list(ARGS)}')
        values = {**dataclasses.asdict(DEFAULTS), **args[0]}
    else:
        if len(args) != len(ARGS):
            raise ValueError(f'W2SD: the webui passed {len(args)} values for the W2SD panel\'s {len(ARGS)} settings '
                             f'({", ".join(ARGS)}): the extension\'s script and UI are out of step (restart the '
                             f'webui); API clients send all {len(ARGS)} in this order or one dict of names')
        values = dict(zip(ARGS, args))
    v = values
    if not isinstance(v['enabled'], bool):
        raise ValueError(f'W2SD: enabled (the Enable checkbox) must be true or false, got {v["enabled"]!r}; '
                         'API clients: send a JSON boolean, not a string or number')
    if not isinstance(v['weak'], str) or v['weak'] not in KINDS:
        raise ValueError(f'W2SD: weak must be one of {KINDS}, got {v["weak"]!r}')
    for name in ('weak_cfg', 'weak_lora', 'reflection_cfg', 'strength'):
        v[name] = _number(name, v[name])
    for name in ('weak_prompt', 'weak_negative_prompt', 'lora_names', 'weak_checkpoint'):
        if not isinstance(v[name], str):
            raise ValueError(f'W2SD: {name} must be a string, got {type(v[name]).__name__}')
    v['lam'] = _integer('lam (reflected steps: -1 = all but the last, or a count >= 0)', v['lam'])
    if v['lam'] < -1:
        raise ValueError(f'W2SD: lam (reflected steps) must be -1 (all but the last step) or >= 0, got {v["lam"]}')
    if not isinstance(v['weak_sigma'], str) or v['weak_sigma'] not in WEAK_SIGMAS:
        raise ValueError(f'W2SD: weak_sigma must be one of {WEAK_SIGMAS}, got {v["weak_sigma"]!r}')
    options = Options(**v)
    if options.enabled and options.weak == 'prompt' and not options.weak_prompt.strip():
        raise ValueError("W2SD: weak='prompt' needs a weak prompt")
    if options.enabled and options.weak == 'checkpoint' and not options.weak_checkpoint:
        raise ValueError("W2SD: weak='checkpoint' needs a weak checkpoint")
    return options


# Infotext keys, written only for an enabled run and only where they apply to its kind of weak model.
KEY = 'W2SD'
HIRES_KEY = 'W2SD hires pass'  # written when a hires pass samples without reflection
KEYS = {
    'weak_cfg': 'W2SD weak CFG',
    'weak_prompt': 'W2SD weak prompt',
    'weak_negative_prompt': 'W2SD weak negative prompt',
    'weak_lora': 'W2SD weak LoRA',
    'lora_names': 'W2SD LoRA names',
    'weak_checkpoint': 'W2SD weak checkpoint',
    'reflection_cfg': 'W2SD reflection CFG',
    'lam': 'W2SD lambda',
    'strength': 'W2SD strength',
    'weak_sigma': 'W2SD weak sigma',
}
_BY_KIND = {
    'cfg': ('weak_cfg',),
    'prompt': ('weak_prompt', 'weak_negative_prompt', 'reflection_cfg'),
    'lora': ('weak_lora', 'lora_names', 'reflection_cfg'),
    'checkpoint': ('weak_checkpoint', 'reflection_cfg'),
}


def infotext(options):
    """``p.extra_generation_params`` entries for ``options`` (the host quotes values that need it)."""
    if not options.enabled:
        return {}
    params = {KEY: options.weak}
    for name in _BY_KIND[options.weak] + ('lam', 'strength', 'weak_sigma'):
        value = getattr(options, name)
        if value != '':
            params[KEYS[name]] = value
    return params


def from_infotext(params):
    """Field values (a dict over ``ARGS``) from a parsed infotext dict; absent keys give the defaults.

    The values come back as the types of the fields, so pasting fills the UI and ``parse(dict)`` accepts them.
    """
    if KEY not in params:
        return dataclasses.asdict(DEFAULTS)
    values = {'enabled': True, 'weak': params[KEY]}
    for name, key in KEYS.items():
        default = getattr(DEFAULTS, name)
        raw = params.get(key, default)
        if isinstance(default, str):
            values[name] = str(raw)
            continue
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f'W2SD: infotext {key}: {raw!r} is not a number') from None
        if not math.isfinite(number) or (isinstance(default, int) and not number.is_integer()):
            kind = 'whole number' if isinstance(default, int) else 'finite number'
            raise ValueError(f'W2SD: infotext {key}: {raw!r} is not a {kind}')
        values[name] = type(default)(number)
    return {name: values.get(name, getattr(DEFAULTS, name)) for name in ARGS}


def pasted(params, host='A1111'):
    """What pasting the parsed infotext ``params`` on ``host`` puts in the panel: ``(values, message)``.

    Values the panel could not run (not a number, out of range, a weak model this host lacks) give the defaults,
    so W2SD is off instead of keeping the settings of before unseen, and a message that names the key.
    """
    try:
        values = from_infotext(params)
        parse(values)
        if values['weak'] not in HOST_KINDS[host]:
            raise ValueError(f"W2SD: infotext {KEY}: {values['weak']!r} is not a weak model {host} offers "
                             f"({', '.join(HOST_KINDS[host])})")
    except ValueError as e:
        reason = str(e).removeprefix('W2SD: ')
        return dataclasses.asdict(DEFAULTS), (f'W2SD: the pasted infotext was not applied to the W2SD panel '
                                              f'({reason}); W2SD is off, its settings at their defaults')
    return values, ''
