"""W2SD entries for the webui's sampler registry (``modules.sd_samplers``)."""
from w2sd_samplers.sampling import SAMPLERS

PREFIX = 'W2SD '


def sampler_table(host_table):
    """``(label, name, aliases, options)`` for each entry of the host's ``samplers_k_diffusion`` table that has a
    W2SD twin; ``name`` is the key of ``w2sd_samplers.SAMPLERS``.

    The host's options are kept, so each W2SD sampler gets its twin's default schedule and the same injected
    kwargs (``brownian_noise`` -> a per-image-seeded ``noise_sampler``, ``solver_type``, ``second_order``, ...).
    """
    rows = []
    for label, funcname, aliases, options in host_table:
        if isinstance(funcname, str) and funcname.startswith('sample_') and funcname[7:] in SAMPLERS:
            rows.append((PREFIX + label, funcname[7:], ['w2sd_' + a for a in aliases], dict(options)))
    return rows


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
