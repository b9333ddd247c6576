"""W2SD on diffusers pipelines: ``generate()`` and ``pipeline_pair()`` (the ``w2sd generate`` command is
:mod:`w2sd_samplers.commands.generate`).

Only the denoising loop is ours: prompts go through the pipeline's own ``encode_prompt``, latents through its
VAE and image/video post-processing. Supported: SD 1.x/2.x and SDXL text-to-image pipelines, AnimateDiff
text-to-video. The pair can combine a second model (pipeline or UNet), a LoRA at two scales, two CFG scales and
two prompts; ``w2sd=False`` runs the plain k-diffusion sampler on the same noise (the baseline).
"""
import contextlib
import dataclasses

import torch

from . import _kdiff
from .cfg import CFGDenoiser
from .nfe import CallCounter
from .pairs import Roles
from .reflect import finite_number
from .sampling import SAMPLERS

FAMILIES = ('sd', 'sdxl', 'animatediff')
SCHEDULES = ('native', 'karras', 'exponential')
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)            # what torch.Generator.manual_seed takes


@dataclasses.dataclass
class GenerateResult:
    """``images``: the pipeline's post-processed output (PIL images, or per-video frame lists for video);
    ``latents``: the final VP latents; ``nfe``: denoiser calls per role (one call = one batched CFG forward)."""
    images: object
    latents: torch.Tensor
    nfe: dict


def family(pipe):
    """'sd', 'sdxl' or 'animatediff' for a supported pipeline; ValueError otherwise."""
    # The adapters import k-diffusion (seconds); importing them when used keeps `w2sd --help` quick.
    from .adapters.vp import require_diffusers
    diffusers = require_diffusers()
    unet = getattr(pipe, 'unet', None)
    if not hasattr(pipe, 'encode_prompt') or unet is None:
        raise ValueError(f'{type(pipe).__name__} is not supported: generate() needs a UNet text-to-image or '
                         f'text-to-video pipeline of the families {FAMILIES}')
    if isinstance(unet, diffusers.UNetMotionModel) and hasattr(pipe, 'video_processor'):
        if unet.config.addition_embed_type == 'text_time':
            raise ValueError('AnimateDiff SDXL pipelines are not supported by generate() yet; use the adapter '
                             '(adapters.unet_denoiser) with a sampler directly')
        return 'animatediff'
    if isinstance(unet, diffusers.UNet2DConditionModel) and hasattr(pipe, 'image_processor'):
        return 'sdxl' if unet.config.addition_embed_type == 'text_time' else 'sd'
    raise ValueError(f'{type(pipe).__name__} with a {type(unet).__name__} is not supported; supported families: '
                     f'{FAMILIES}')


def _conds(pipe, fam, prompt, negative_prompt, height, width, device):
    """(cond, uncond) extra args of the family's UNet adapter, from the pipeline's own prompt encoder."""
    if fam != 'sdxl':
        pe, npe = pipe.encode_prompt(prompt, device, 1, True, negative_prompt)
        return {'encoder_hidden_states': pe}, {'encoder_hidden_states': npe}
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=negative_prompt)
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                 text_encoder_projection_dim=proj).to(device).repeat(len(pe), 1)
    return ({'encoder_hidden_states': pe, 'added_cond_kwargs': {'text_embeds': pooled, 'time_ids': ids}},
            {'encoder_hidden_states': npe, 'added_cond_kwargs': {'text_embeds': npooled, 'time_ids': ids}})


class _LoraScales:
    """Switches a PEFT adapter's scale through ``pipe.set_adapters``; ``restore()`` puts back every adapter
    layer's scales, active adapters and requires_grad flags exactly as they were."""

    def __init__(self, pipe, name):
        from peft.tuners.tuners_utils import BaseTunerLayer
        self.pipe, self.name, self.current = pipe, name, None
        self.saved = []
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for m in component.modules():
                    if isinstance(m, BaseTunerLayer):
                        self.saved.append((m, dict(m.scaling), list(m.active_adapters),
                                           [(p, p.requires_grad) for p in m.parameters()]))
        if not any(name in m.scaling for m, *_ in self.saved):
            raise ValueError(f'the pipeline has no LoRA adapter named {name!r}; load it first with '
                             f"pipe.load_lora_weights(path, adapter_name={name!r})")

    def use(self, scale):
        if scale != self.current:
            self.pipe.set_adapters(self.name, adapter_weights=scale)
            self.current = scale

    def wrap(self, denoiser, scale):
        def scaled(x, sigma, **extra_args):
            self.use(scale)
            return denoiser(x, sigma, **extra_args)
        return scaled

    def restore(self):
        # Restored layers leave the list, so that a second call finishes a pass an interrupt cut short.
        while self.saved:
            m, scaling, active, grads = self.saved[-1]
            m.set_adapter(active)
            m.scaling.clear()
            m.scaling.update(scaling)                    # the exact values (set_scale would recompute them)
            for p, g in grads:                           # set_adapter marks adapter weights trainable
                p.requires_grad_(g)
            self.saved.pop()


# id(token) -> (id(pipe), lora) of each pipeline_pair() in progress: a lora= run switches the shared pipeline's
# PEFT adapters, so it must not overlap another run on the same pipeline.
_RUNS = {}


def _claim(token, pipe, lora):
    _RUNS[id(token)] = (id(pipe), lora)
    # Registered before looking: of two runs starting at once, at least the later one sees the other.
    others = [name for key, (p, name) in list(_RUNS.items()) if p == id(pipe) and key != id(token)]
    if others and lora is not None:
        raise ValueError(f'lora={lora!r}: another generate() call is running on this pipeline. PEFT switches '
                         'adapter scales on the shared pipeline, so a call with lora= needs the pipeline to itself: '
                         'run such calls one at a time, or give each thread its own pipeline')
    busy = [name for name in others if name is not None]
    if busy:
        raise ValueError(f'another generate() call with lora={busy[0]!r} is running on this pipeline and switches '
                         'its PEFT adapters: wait for it, or give each thread its own pipeline')


def _release(token, switch):
    if switch is not None:
        switch.restore()
    _RUNS.pop(id(token), None)


def _decode(pipe, fam, latents, output_type):
    if output_type == 'latent':
        return latents
    if fam == 'animatediff':
        video = pipe.decode_latents(latents.to(pipe.vae.dtype))
        return pipe.video_processor.postprocess_video(video=video, output_type=output_type)
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and vae.config.force_upcast      # SDXL's VAE overflows in fp16
    mean, std = getattr(vae.config, 'latents_mean', None), getattr(vae.config, 'latents_std', None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        z = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + \
            torch.tensor(mean).view(shape).to(latents)
    else:
        z = latents / vae.config.scaling_factor
    try:
        if upcast:
            vae.to(torch.float32)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'{name} must be one of {sorted(choices)}, got {value!r}')


@dataclasses.dataclass
class PipelinePair:
    """A pipeline's W2SD roles for one prompt (:func:`pipeline_pair`), with its schedule, noise and decoder.

    ``roles``: a :class:`~w2sd_samplers.pairs.Roles` of CFG denoisers (``den``, the pipeline's UNet as a
    k-diffusion denoiser, behind :class:`~w2sd_samplers.cfg.CFGDenoiser`); the strong leg is ``None`` (the main
    denoiser) when it runs at the main step's CFG scale.
    """
    pipe: object
    family: str
    den: object
    roles: object
    height: int
    width: int

    def sigmas(self, steps, schedule='native', parity=False):
        from .adapters.vp import spaced_timesteps, timestep_sigmas
        from .parity import parity_sigmas
        config = self.pipe.scheduler.config
        if parity:
            sigmas = parity_sigmas(self.den, steps, config.get('steps_offset', 0))
        elif schedule == 'native':
            ts = spaced_timesteps(steps, config.get('timestep_spacing', 'leading'), config.get('steps_offset', 0),
                                  len(self.den.sigmas))
            # DDIM with set_alpha_to_one=False (as SD/SDXL ship) ends at abar_0, not at sigma 0.
            sigmas = timestep_sigmas(self.den, ts, 0. if config.get('set_alpha_to_one', True) else 'alpha0')
        else:
            sigmas = self.den.schedule(steps, schedule)
        return sigmas.to(self.pipe._execution_device)

    def sample(self, run, sigmas, seed, num_frames=16):
        """VP latents of ``run(x, sigmas)`` from the seed's initial noise; the seed also drives ancestral noise."""
        device, vsf = self.pipe._execution_device, self.pipe.vae_scale_factor
        shape = [len(self.roles.extra_args['cond']['encoder_hidden_states']), self.pipe.unet.config.in_channels,
                 self.height // vsf, self.width // vsf]
        if self.family == 'animatediff':
            shape.insert(2, num_frames)
        # drawn on the CPU in float32 whatever the defaults: the same seed gives the same image on every device
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), device='cpu',
                            dtype=torch.float32).to(device)
        x = noise * (1 + sigmas[0] ** 2).sqrt()          # the VP pure-noise latent in VE coordinates
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            torch.manual_seed(seed)                      # ancestral/SDE noise, without touching the caller's RNG
            x = run(x, sigmas)
        latents = x / (1 + sigmas[-1] ** 2).sqrt()       # back to the VP latent diffusers decodes
        return latents.to(self.pipe.unet.dtype)

    def decode(self, latents, output_type='pil'):
        return _decode(self.pipe, self.family, latents, output_type)


def _check_cfg_scales(**scales):
    for name, value in scales.items():
        if value is not None and not finite_number(value):      # a NaN scale samples black images
            raise ValueError(f'{name} must be a finite number, got {value!r}')


@contextlib.contextmanager
def pipeline_pair(pipe, prompt, *, negative_prompt=None, height=None, width=None, guidance_scale=7.5,
                  strong_cfg=None, weak_cfg=None, weak_model=None, weak_prompt=None, lora=None,
                  lora_scales=(1., -1.)):
    """The :class:`PipelinePair` of :func:`generate`'s pair options (same meaning, same defaults) for ``prompt``;
    a LoRA adapter's state is restored on exit."""
    from .adapters.unet import unet_denoiser
    _check_cfg_scales(guidance_scale=guidance_scale, strong_cfg=strong_cfg, weak_cfg=weak_cfg)
    fam = family(pipe)
    device = pipe._execution_device           # the UNet's device, or the offload target
    vsf = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * vsf
    width = width or pipe.unet.config.sample_size * vsf
    if height % vsf or width % vsf:
        raise ValueError(f'height and width must be multiples of the VAE scale factor {vsf}, got {height}x{width}')
    strong_cfg = guidance_scale if strong_cfg is None else strong_cfg
    weak_cfg = strong_cfg if weak_cfg is None else weak_cfg
    weak_pipe = weak_model if hasattr(weak_model, 'unet') else None
    weak_unet = weak_pipe.unet if weak_pipe is not None else weak_model
    if weak_pipe is not None and family(weak_pipe) != fam:
        raise ValueError(f'weak_model is a {family(weak_pipe)} pipeline; the main one is {fam}')
    den = unet_denoiser(pipe.unet, pipe.scheduler)
    token, switch = object(), None
    try:
        _claim(token, pipe, lora)
        switch = _LoraScales(pipe, lora) if lora is not None else None
        def encoded(p, text, scale):
            if switch is not None:
                switch.use(scale)
            return _conds(p, fam, text, negative_prompt, height, width, device)

        s_scale, w_scale = lora_scales if switch is not None else (None, None)
        cond, uncond = encoded(pipe, prompt, s_scale)
        w_cond, w_uncond = encoded(weak_pipe or pipe, prompt if weak_prompt is None else weak_prompt, w_scale)
        main = CFGDenoiser(den)
        weak = main if weak_unet is None else CFGDenoiser(
            unet_denoiser(weak_unet, (weak_pipe or pipe).scheduler))
        if switch is not None:
            main, weak = switch.wrap(main, s_scale), switch.wrap(weak, w_scale)
        main_args = {'cond': cond, 'uncond': uncond, 'cond_scale': guidance_scale}
        same = strong_cfg == guidance_scale
        roles = Roles(main=main, extra_args=main_args, strong=None if same else main,
                      strong_extra_args=None if same else {**main_args, 'cond_scale': strong_cfg}, weak=weak,
                      weak_extra_args={'cond': w_cond, 'uncond': w_uncond, 'cond_scale': weak_cfg})
        yield PipelinePair(pipe, fam, den, roles, height, width)
    finally:
        # One line each, as in lora.Scope: a restore cut short by an interrupt is finished by the second.
        try: _release(token, switch)  # noqa: E701
        finally: _release(token, switch)  # noqa: E701


@torch.no_grad()
def generate(pipe, prompt, *, negative_prompt=None, steps=30, sampler='euler', schedule='native', guidance_scale=7.5,
             seed=0, height=None, width=None, num_frames=16, w2sd=True, weak_model=None, weak_prompt=None,
             strong_cfg=None, weak_cfg=None, lora=None, lora_scales=(1., -1.), parity=False, output_type='pil',
             progress=True, sampler_options=None, **w2sd_options):
    """Text to image (SD, SDXL) or video (AnimateDiff) with a W2SD sampler on a diffusers pipeline.

    Roles: the main step uses the pipeline's model at ``guidance_scale``; the reflection's strong leg the same
    model at ``strong_cfg`` (default ``guidance_scale``); the weak leg ``weak_model`` (a pipeline of the same
    family or a UNet; default the pipeline's) with ``weak_prompt`` (default ``prompt``) at ``weak_cfg`` (default
    ``strong_cfg``). ``lora``: the name of a PEFT adapter loaded into ``pipe``; ``lora_scales=(strong, weak)``
    (the main step uses the strong scale; other adapters are off during the run; the adapter state is restored
    afterwards). The switch is on the shared pipeline: while a ``lora=`` call runs, other calls on the same
    pipeline are refused (ValueError), and a ``lora=`` call is refused while another runs. The paper's weight and
    prompt pairs use ``strong_cfg=weak_cfg=1`` with the main step at 5.5.

    ``sampler``: a name of ``w2sd_samplers.SAMPLERS``; ``parity=True`` runs the official code instead
    (:mod:`w2sd_samplers.parity`: its DDIM grid, its reflection). ``schedule``: 'native' (the scheduler's
    timestep spacing), 'karras' or 'exponential'. ``w2sd=False``: the plain k-diffusion sampler, same noise.
    Other keywords are W2SD options (``lam``, ``strength``, ...); ``sampler_options`` go to the sampler (eta...).
    Returns a :class:`GenerateResult`.
    """
    from .adapters.vp import require_diffusers
    from .parity import sample_w2sd_official
    require_diffusers()
    _check_choice('sampler', sampler, SAMPLERS)
    _check_choice('schedule', schedule, SCHEDULES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f'seed must be an int, got {type(seed).__name__}')
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f'seed must be an integer from -2**63 to 2**64 - 1, got {seed}')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f'steps must be an integer >= 1, got {steps!r}')
    _check_cfg_scales(guidance_scale=guidance_scale, strong_cfg=strong_cfg, weak_cfg=weak_cfg)
    strong_cfg = guidance_scale if strong_cfg is None else strong_cfg
    weak_cfg = strong_cfg if weak_cfg is None else weak_cfg
    lora_on = lora is not None
    if lora_on and (not isinstance(lora_scales, (tuple, list)) or len(lora_scales) != 2
                    or not all(map(finite_number, lora_scales))):
        raise ValueError(f'lora_scales must be (strong_scale, weak_scale), two finite numbers, got {lora_scales!r}')
    if w2sd and weak_model is None and weak_prompt is None and weak_cfg == strong_cfg and \
            not (lora_on and lora_scales[0] != lora_scales[1]):
        raise ValueError('the weak denoiser equals the strong one: give a pair (weak_model, weak_prompt, '
                         'weak_cfg != strong_cfg, or lora with two scales), or w2sd=False for the baseline')

    with pipeline_pair(pipe, prompt, negative_prompt=negative_prompt, height=height, width=width,
                       guidance_scale=guidance_scale, strong_cfg=strong_cfg, weak_cfg=weak_cfg, weak_model=weak_model,
                       weak_prompt=weak_prompt, lora=lora, lora_scales=lora_scales) as pair:
        counter = CallCounter()
        roles = pair.roles
        (strong, strong_args), (weak, weak_args) = roles.leg('strong'), roles.leg('weak')
        w2sd_kwargs = dict(weak=counter.wrap(weak, 'weak'), strong=counter.wrap(strong, 'strong'),
                           strong_extra_args=strong_args, weak_extra_args=weak_args, **w2sd_options)
        model = counter.wrap(roles.main, 'main')
        options = dict(extra_args=roles.extra_args, disable=not progress, **(sampler_options or {}))

        def run(x, sigmas):
            K = _kdiff.sampling()
            if parity and w2sd:
                return sample_w2sd_official(model, x, sigmas, **options, **w2sd_kwargs)
            if parity or not w2sd:
                return getattr(K, 'sample_euler' if parity else f'sample_{sampler}')(model, x, sigmas, **options)
            return SAMPLERS[sampler](model, x, sigmas, **options, **w2sd_kwargs)
        latents = pair.sample(run, pair.sigmas(steps, schedule, parity), seed, num_frames)
        images = pair.decode(latents, output_type)
    return GenerateResult(images, latents, dict(counter.counts))
