"""The reflection's strong and weak denoisers, built from the host's CFG denoiser.

``model`` is the webui's ``CFGDenoiser`` (``sampler.model_wrap_cfg``): ``model(x, sigma, cond=, uncond=,
cond_scale=, s_min_uncond=, image_cond=)`` runs the whole CFG and advances ``model.step``, the counter that drives
prompt editing, the refiner switch and skip-early-CFG. Every role here calls ``model`` itself, so inpainting
blends, script callbacks and interrupts stay in place, but restores ``model.step``: only the sampler's main call
advances it. Each role gets the main ``extra_args`` at call time (the live dict the host updates on a refiner
switch) and passes the model a changed copy; the caller's dict is never modified.
"""
from .options import DEFAULTS, LABELS


def keep_step(model, denoiser):
    """``denoiser`` that leaves ``model.step`` as it found it, also when the call raises."""
    def call(x, sigma, **extra_args):
        step = model.step
        try:
            return denoiser(x, sigma, **extra_args)
        finally:
            model.step = step
    return call


def with_args(model, cond_scale, setting, **override):
    """``model`` called with ``cond_scale`` (the W2SD panel's ``setting``) and the ``override`` entries replaced in
    a copy of its extra args.

    Forge's denoiser replaces ``cond_scale`` by ``p.hr_cfg`` during a hires pass, so that value is swapped too
    (and restored); A1111 has no ``hr_cfg``. Forge passes ``uncond=None`` when the user's CFG is 1, which only a
    call at CFG 1 can do without.
    """
    def call(x, sigma, **extra_args):
        args = {**extra_args, **override, 'cond_scale': cond_scale}
        if args.get('uncond') is None and cond_scale != 1:
            raise ValueError(f'W2SD: a reflection call at CFG {cond_scale:g} needs the negative prompt, which Forge '
                             f'skips when the CFG Scale is 1: raise the CFG Scale, or set the W2SD panel\'s '
                             f'{LABELS[setting]} to 1')
        p = model.p
        if not (getattr(p, 'is_hr_pass', False) and hasattr(p, 'hr_cfg')):
            return model(x, sigma, **args)
        hr_cfg, p.hr_cfg = p.hr_cfg, cond_scale
        try:
            return model(x, sigma, **args)
        finally:
            p.hr_cfg = hr_cfg
    return call


def _named(network, names):
    # A1111 keeps the file's name and, as mentioned_name, the name or alias the prompt used.
    return not names or network.name in names or getattr(network, 'mentioned_name', None) in names


def with_lora_multiplier(networks, names, multiplier, denoiser):
    """``denoiser`` run with the UNet multiplier of the loaded LoRAs in ``networks`` (A1111's
    ``networks.loaded_networks``; only those named in ``names`` when it is not empty) set to ``multiplier``.

    A1111 re-merges a layer's LoRA weights from its backup whenever the multipliers differ from the merged ones,
    so setting them back restores the strong weights exactly.
    """
    def call(x, sigma, **extra_args):
        chosen = [n for n in networks if _named(n, names)]
        saved = [n.unet_multiplier for n in chosen]
        try:
            for n in chosen:
                n.unet_multiplier = multiplier
            return denoiser(x, sigma, **extra_args)
        finally:
            for n, m in zip(chosen, saved):
                n.unet_multiplier = m
    return call


def with_forge_unet(model, unet, denoiser):
    """``denoiser`` run with Forge's UNet patcher swapped for ``unet``.

    Forge's ``sampling_function`` reads ``model.inner_model.inner_model.forge_objects.unet`` at call time
    (``inner_model.inner_model`` is ``shared.sd_model``), so the swap changes the network of that one call.
    """
    def call(x, sigma, **extra_args):
        objects = model.inner_model.inner_model.forge_objects
        saved, objects.unet = objects.unet, unet
        try:
            return denoiser(x, sigma, **extra_args)
        finally:
            objects.unet = saved
    return call


def sampler_kwargs(model, options, *, weak_conds=None, networks=None, weak_unet=None):
    """The W2SD keyword arguments of ``sample_w2sd_*`` for one sampler call.

    ``options``: an ``Options`` or ``None``; disabled gives reflection off (the sampler equals its k-diffusion twin).
    ``weak_conds``: ``(cond, uncond)`` of the weak prompt (``uncond`` None: the main one), for ``weak='prompt'``.
    ``networks``: A1111's list of loaded LoRA networks, for ``weak='lora'``.
    ``weak_unet``: the weak checkpoint's Forge ``UnetPatcher``, for ``weak='checkpoint'``.
    """
    if options is None or not options.enabled:
        return {'weak': model, 'lam': 0}
    kind, rcfg = options.weak, options.reflection_cfg
    if kind == 'cfg':
        strong, weak = model, with_args(model, options.weak_cfg, 'weak_cfg')
    elif kind == 'prompt':
        if weak_conds is None:
            raise ValueError("W2SD: weak='prompt' but no weak conditioning was computed for this pass")
        cond, uncond = weak_conds
        override = {'cond': cond} if uncond is None else {'cond': cond, 'uncond': uncond}
        strong, weak = with_args(model, rcfg, 'reflection_cfg'), with_args(model, rcfg, 'reflection_cfg', **override)
    elif kind == 'lora':
        names = options.lora_name_list
        loaded = [n.name for n in networks or ()]
        if not any(_named(n, names) for n in networks or ()):
            raise ValueError(f"W2SD: weak='lora' needs a LoRA in the prompt (<lora:name:weight>)"
                             f"{' named ' + ', '.join(names) if names else ''}; loaded: {loaded or 'none'}")
        strong = with_args(model, rcfg, 'reflection_cfg')
        weak = with_lora_multiplier(networks, names, options.weak_lora, strong)
    else:
        if weak_unet is None:
            raise ValueError("W2SD: weak='checkpoint' but no weak checkpoint was loaded for this pass")
        strong = with_args(model, rcfg, 'reflection_cfg')
        weak = with_forge_unet(model, weak_unet, strong)
    return {
        'strong': keep_step(model, strong), 'weak': keep_step(model, weak),
        'lam': None if options.lam == DEFAULTS.lam else options.lam,
        'strength': options.strength, 'weak_sigma': options.weak_sigma,
    }
