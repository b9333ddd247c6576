"""What the current sampling pass (first pass or hires pass) of a webui processing object ``p`` uses."""


def sampler_name(p):
    """The sampler of the pass about to run; the hires pass may name its own (``p.hr_sampler_name``)."""
    hr_name = getattr(p, 'hr_sampler_name', None)
    if getattr(p, 'is_hr_pass', False) and hr_name and hr_name != 'Use same sampler':
        return hr_name
    return p.sampler_name


def sampler_names(p):
    """The samplers of the passes ``p`` will run: the first pass's, and the hires pass's when there is one."""
    names = [p.sampler_name]
    if getattr(p, 'enable_hr', False):
        hr_name = getattr(p, 'hr_sampler_name', None)
        names.append(p.sampler_name if not hr_name or hr_name == 'Use same sampler' else hr_name)
    return names


def cond_request(p, total_steps):
    """How the host computes this pass's conds, for computing the weak prompt's the same way.

    ``total_steps(steps)`` is the pass sampler's ``SamplerData.total_steps``. Returns ``(size, steps,
    hires_steps, extra_network_data)``: the ``SdConditioning`` keywords and the arguments of
    ``p.get_conds_with_caching`` as the host's ``setup_conds`` / ``calculate_hr_conds`` pass them.
    """
    if getattr(p, 'is_hr_pass', False):
        size = {'width': p.hr_upscale_to_x, 'height': p.hr_upscale_to_y}
        if hasattr(p, 'hr_distilled_cfg'):  # Forge
            size['distilled_cfg_scale'] = p.hr_distilled_cfg
        return size, p.firstpass_steps, total_steps(p.hr_second_pass_steps or p.steps), p.hr_extra_network_data
    size = {'width': p.width, 'height': p.height}
    if hasattr(p, 'distilled_cfg_scale'):  # Forge
        size['distilled_cfg_scale'] = p.distilled_cfg_scale
    return size, total_steps(p.steps), None, p.extra_network_data


def reflection_off(p, options):
    """Why this pass runs without reflection (a short infotext value), or ``None`` when it reflects.

    Forge drops the hires pass's negative prompt when its Hires CFG is 1 (``p.hr_uc = None``; 1.0 is the API's
    default), and a reflection leg at any other CFG needs it. Failing the whole generation after the first pass
    would lose it, so that pass samples without reflection and the infotext says so. A1111 has no ``hr_cfg``.
    """
    if not (getattr(p, 'is_hr_pass', False) and getattr(p, 'hr_cfg', None) == 1):
        return None
    leg_cfgs = (options.weak_cfg,) if options.weak == 'cfg' else (options.reflection_cfg,)
    if all(cfg == 1 for cfg in leg_cfgs):
        return None
    return f'off (Hires CFG 1 has no negative prompt; W2SD needs CFG {leg_cfgs[0]:g})'
