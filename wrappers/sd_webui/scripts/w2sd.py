"""W2SD for AUTOMATIC1111 / Forge: the "W2SD ..." samplers and the always-visible W2SD settings.

Thin glue over the host: the logic lives in ``w2sd_sdwebui`` (tested with stand-ins) and the sampling math in
``w2sd_samplers``. Read against A1111 v1.10 / dev and Forge ``dfdcbab``.
"""
import html
import os
import sys

import gradio as gr

from modules import prompt_parser, scripts, sd_models, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:
    sys.path.insert(0, _root)

from w2sd_sdwebui import library  # noqa: E402

library.load(_root, os.environ)

from w2sd_samplers.reflect import WEAK_SIGMAS  # noqa: E402
from w2sd_sdwebui import options as w2sd_options, passes, registry, roles  # noqa: E402


class W2SDSampler(sd_samplers_kdiffusion.KDiffusionSampler):
    """The host's k-diffusion sampler running ``sample_w2sd_<name>`` with the W2SD roles bound per call."""

    def __init__(self, name, sd_model):
        super().__init__(registry.twin(name), sd_model)
        # The host looks up s_churn & co. by function name; ours take those of the host function they twin.
        self.extra_params = sd_samplers_kdiffusion.sampler_extra_params.get(name, [])

    def initialize(self, p):
        kwargs = super().initialize(p)  # installs the seeded TorchHijack our samplers draw noise through
        options = getattr(p, 'w2sd_options', None)
        if isinstance(options, Exception):
            raise options
        off = options is not None and options.enabled and passes.reflection_off(p, options)
        if off:
            print(f'W2SD: hires pass {off}')
            p.extra_generation_params[w2sd_options.HIRES_KEY] = off
            options = None
        networks = getattr(sys.modules.get('networks'), 'loaded_networks', None)  # A1111's Lora extension
        kwargs.update(roles.sampler_kwargs(self.model_wrap_cfg, options, networks=networks,
                                           weak_conds=getattr(p, 'w2sd_weak_conds', None),
                                           weak_unet=getattr(p, 'w2sd_weak_unet', None)))
        return kwargs


def _register():
    table = sd_samplers_kdiffusion.samplers_k_diffusion
    entries = [sd_samplers_common.SamplerData(label, lambda model, name=name: W2SDSampler(name, model), aliases,
                                              options)
               for label, name, aliases, options in registry.sampler_table(table)]
    registry.register(sd_samplers, entries)
    for label, reason in registry.refusals(table).items():
        print(f'W2SD: no "W2SD {label}" sampler: {reason}')


_register()

_weak_models = {}  # Forge: the loaded weak checkpoint, by file name (one at a time)


def _forge_checkpoint(title):
    info = sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise ValueError(f'W2SD: Weak checkpoint {title!r} not found; the checkpoints the webui lists: '
                         f'{", ".join(sorted(sd_models.checkpoint_tiles())) or "none"}')
    if not info.filename.lower().endswith('.safetensors'):
        raise ValueError(f'W2SD: the weak checkpoint must be a .safetensors file, got {info.filename}')
    return info


def _forge_weak_unet(title):
    info = _forge_checkpoint(title)
    if info.filename not in _weak_models:
        from backend.loader import forge_loader
        _weak_models.clear()
        _weak_models[info.filename] = forge_loader(info.filename)
    return _weak_models[info.filename].forge_objects.unet


def _weak_conds(p, options):
    config = sd_samplers.find_sampler_config(passes.sampler_name(p))
    size, steps, hires_steps, networks = passes.cond_request(p, config.total_steps)
    cache = p.__dict__.setdefault('w2sd_cond_cache', {'c': [None, None], 'uc': [None, None]})
    n = len(p.prompts)
    c = p.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning,
                                 prompt_parser.SdConditioning([options.weak_prompt] * n, **size),
                                 steps, [cache['c']], networks, hires_steps)
    if not options.weak_negative_prompt:
        return c, None
    uc = p.get_conds_with_caching(prompt_parser.get_learned_conditioning,
                                  prompt_parser.SdConditioning([options.weak_negative_prompt] * n,
                                                               is_negative_prompt=True, **size),
                                  steps, [cache['uc']], networks, hires_steps)
    return c, uc


class W2SDScript(scripts.Script):
    def title(self):
        return 'W2SD'

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        d, ranges = w2sd_options.DEFAULTS, w2sd_options.RANGES
        host = 'Forge' if 'modules_forge' in sys.modules else 'A1111'
        forge = host == 'Forge'

        def control(component, name, *args, note='', **kwargs):
            return component(*args, value=getattr(d, name), label=w2sd_options.LABELS[name] + note,
                             elem_id=self.elem_id(name), **kwargs)

        with gr.Accordion('W2SD: Weak-to-Strong Diffusion (use with a "W2SD ..." sampler)', open=False):
            controls = [
                control(gr.Checkbox, 'enabled'),
                control(gr.Radio, 'weak', list(w2sd_options.HOST_KINDS[host])),
                control(gr.Slider, 'weak_cfg', *ranges['weak_cfg'], step=0.5, note=' (weak model = cfg)'),
                control(gr.Textbox, 'weak_prompt', lines=2, note=' (weak model = prompt)'),
                control(gr.Textbox, 'weak_negative_prompt', lines=1, note=' (empty: the main one)'),
                control(gr.Slider, 'weak_lora', *ranges['weak_lora'], step=0.05, visible=not forge,
                        note=' (weak model = lora)'),
                control(gr.Textbox, 'lora_names', visible=not forge, note=', comma-separated (empty: all loaded)'),
                control(gr.Dropdown, 'weak_checkpoint', [''] + (sorted(sd_models.checkpoint_tiles()) if forge else []),
                        visible=forge, note=' (weak model = checkpoint, .safetensors)'),
                control(gr.Slider, 'reflection_cfg', *ranges['reflection_cfg'], step=0.5,
                        note=' (both legs; weak model = prompt, ' + ('checkpoint)' if forge else 'lora)')),
                control(gr.Slider, 'lam', -1, w2sd_options.LAM_SLIDER_MAX, step=1, note=' (-1: all but the last)'),
                control(gr.Slider, 'strength', *ranges['strength'], step=0.05),
                control(gr.Radio, 'weak_sigma', list(WEAK_SIGMAS)),
            ]
            message = gr.HTML(value='', elem_id=self.elem_id('message'))  # what a pasted infotext could not apply
        self.infotext_fields = [(c, lambda params, name=name: w2sd_options.pasted(params, host)[0][name])
                                for name, c in zip(w2sd_options.ARGS, controls)]
        self.infotext_fields.append((message, lambda params: html.escape(w2sd_options.pasted(params, host)[1])))
        self.paste_field_names = [w2sd_options.KEY, *w2sd_options.KEYS.values()]
        return controls

    def process(self, p, *args):
        try:
            options = w2sd_options.parse(*args)
            forge = hasattr(p.sd_model, 'forge_objects')
            if options.enabled and options.weak == 'lora' and forge:
                raise ValueError("W2SD: weak='lora' needs A1111 (Forge merges LoRA weights at load time); "
                                 "on Forge use weak='checkpoint' or 'cfg'")
            if options.enabled and options.weak == 'checkpoint':
                if not forge:
                    raise ValueError("W2SD: weak='checkpoint' needs Forge")
                _forge_checkpoint(options.weak_checkpoint)
            if options.enabled and options.weak == 'prompt' and getattr(p, 'refiner_checkpoint_info', None):
                raise ValueError("W2SD: weak='prompt' cannot follow a refiner switch (its conds belong to the base "
                                 "model)")
        except ValueError as e:
            p.w2sd_options = e  # the webui only logs script errors; a W2SD sampler raises this one
            raise
        p.w2sd_options = options
        if not options.enabled:
            return
        if not any(map(registry.is_w2sd, passes.sampler_names(p))):
            print('W2SD: enabled, but no "W2SD ..." sampler is selected: nothing reflects, and the infotext gets '
                  'no W2SD settings')
            return
        p.extra_generation_params.update(w2sd_options.infotext(options))

    def process_before_every_sampling(self, p, *args, **kwargs):
        options = getattr(p, 'w2sd_options', None)
        if not isinstance(options, w2sd_options.Options) or not options.enabled:
            return
        if not registry.is_w2sd(passes.sampler_name(p)):
            return
        try:
            self._prepare_pass(p, options)
        except Exception as e:
            p.w2sd_options = e  # logged only by the webui: the W2SD sampler raises it
            raise

    @staticmethod
    def _prepare_pass(p, options):
        if options.weak == 'prompt':
            p.w2sd_weak_conds = _weak_conds(p, options)
        elif options.weak == 'checkpoint':
            # Forge resets forge_objects before each pass; a clone keeps the extra patcher to this pass, and
            # sampling_prepare then loads both UNets.
            weak_unet = _forge_weak_unet(options.weak_checkpoint)
            unet = p.sd_model.forge_objects.unet.clone()
            unet.add_extra_model_patcher_during_sampling(weak_unet)
            p.sd_model.forge_objects.unet = unet
            p.w2sd_weak_unet = weak_unet
