"""W2SD entries for the webui's sampler registry (``modules.sd_samplers``)."""
from w2sd_samplers.sampling import SAMPLERS

from .twins import REFUSED, TWINS

PREFIX = 'W2SD '


def host_name(funcname):
    """The name of a host table's sampler function: ``sample_X``, or a callable's ``__name__`` (A1111's Restart)."""
    return funcname if isinstance(funcname, str) else getattr(funcname, '__name__', repr(funcname))


def twin(name):
    """The W2SD twin of the host sampler function called ``name``, or ``None``."""
    if name in TWINS:
        return TWINS[name]
    return SAMPLERS.get(name[len('sample_'):]) if name.startswith('sample_') else None


def sampler_table(host_table):
    """``(label, name, aliases, options)`` for each entry of the host's ``samplers_k_diffusion`` table that has a
    W2SD twin; ``name`` is the host function's name (``twin(name)`` is the twin).

    The host's options are kept, so each W2SD sampler gets its twin's default schedule and the same injected
    kwargs (``brownian_noise`` -> a per-image-seeded ``noise_sampler``, ``solver_type``, ``second_order``, ...).
    """
    return [(PREFIX + label, host_name(funcname), ['w2sd_' + a for a in aliases], dict(options))
            for label, funcname, aliases, options in host_table if twin(host_name(funcname)) is not None]


def refusals(host_table):
    """``{label: reason}`` for the host's samplers that get no W2SD twin."""
    return {label: REFUSED.get(host_name(funcname), 'no W2SD twin in this version of the extension')
            for label, funcname, _, _ in host_table if twin(host_name(funcname)) is None}


def is_w2sd(sampler_name):
    return isinstance(sampler_name, str) and sampler_name.startswith(PREFIX)


def register(sd_samplers, entries):
    """Add ``entries`` (``SamplerData``) to ``sd_samplers``, skipping names already there (UI reloads).

    Forge has ``add_sampler``; A1111 needs the list and the map extended in place and ``set_samplers()`` to
    rebuild its lower-case lookup, plus a cleared ``get_sampler_and_scheduler`` cache (``functools.cache``).
    """
    add = getattr(sd_samplers, 'add_sampler', None)
    for data in entries:
        if add is not None:
            add(data)
        elif data.name not in sd_samplers.all_samplers_map:
            sd_samplers.all_samplers.append(data)
            sd_samplers.all_samplers_map[data.name] = data
    if add is None:
        sd_samplers.set_samplers()
    cached = getattr(sd_samplers, 'get_sampler_and_scheduler', None)
    if hasattr(cached, 'cache_clear'):
        cached.cache_clear()
