"""ComfyUI nodes for W2SD: a SAMPLER, a GUIDER and an all-in-one KSampler-style node."""
import inspect
import sys

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .core import (CFG_SOURCES, FORMS, INPAINT_OPTIONS, RANGES, REFUSED, ROLE_KEY, SAMPLER_NAMES, WEAK_SIGMAS,
                   check_number, check_sampler_name, sampler_function, w2sd_options)

# The categories of ComfyUI's own sampling nodes: "model/sampling" (KSampler), ".../samplers" and ".../guiders"
# since 2026; "sampling" and "sampling/custom_sampling/..." before. ComfyUI has imported its nodes.py by now.
SAMPLING = getattr(getattr(sys.modules.get('nodes'), 'KSampler', None), 'CATEGORY', 'model/sampling')
CUSTOM_SAMPLING = SAMPLING if SAMPLING.startswith('model/') else SAMPLING + '/custom_sampling'
# Keys of a LATENT that describe its input, not the sampled result: the stock KSampler drops them.
LATENT_RATIO_KEYS = ('downscale_ratio_spacial', 'downscale_ratio_temporal')

STRONG_CFG, WEAK_CFG = 5.5, 0.0  # the CFG pair (Z-Sampling): works with any guider that has a negative
CFG = {'step': 0.1, 'round': 0.01}
SAMPLER_TOOLTIP = ('base sampler; each reflected step reflects the latent, then takes this sampler\'s step. '
                   'Not offered: ' + ', '.join(sorted(REFUSED)) + ' (multistep without a W2SD twin yet, or their '
                   'own schedule: see docs/comfyui.md)')


def number(name, **extra):
    """A numeric widget's options with its ``RANGES`` entry (the range ``check_number`` holds it to)."""
    lo, hi = RANGES[name]
    return {'min': lo, 'max': hi, **extra}


def validate_sampler_name(cls, sampler_name=None):
    """``VALIDATE_INPUTS``: a refused or unknown sampler's reason in ComfyUI's validation error (instead of its
    bare "Value not in list"). ``None``: the value comes over a link; the node function checks it then."""
    try:
        if sampler_name is not None:
            check_sampler_name(sampler_name)
    except ValueError as e:
        return str(e)
    return True
STRONG_TOOLTIP = 'CFG of the reflection\'s strong leg'
WEAK_TOOLTIP = ('CFG of the reflection\'s weak leg. With a plain CFG guider the weak leg differs from the strong '
                'one only by this CFG (paper, Z-Sampling: strong 5.5, weak 0); with weak conds use 1.0 for both')


def reflection_inputs():
    return {
        'lam': ('INT', number('lam', default=-1,
                              tooltip='reflect the first lam steps (the noisiest); -1 = every step but the last '
                                      '(the paper), and so is any lam of the step count or more')),
        'strength': ('FLOAT', number('strength', default=1.0, step=0.05,
                                     tooltip='scales the reflection; 1 = the paper, 0 = the base sampler unchanged')),
        'weak_sigma': (list(WEAK_SIGMAS), {'tooltip': 'noise level of the weak inversion: current (the paper) or '
                                                      'next (textbook inversion)'}),
        'form': (list(FORMS), {'default': 'anchored',
                               'tooltip': 'paper: strong denoising step, then weak inversion; anchored: both legs '
                                          'at the current latent (the identity when weak equals strong). Default '
                                          'anchored: W2SD\'s pick in 41 of 50 tuned benchmark cells, where the '
                                          'paper form hurt at few steps (benchmarks/RESULTS.md)'}),
        'reflections': ('INT', number('reflections', default=1,
                                      tooltip='reflections per reflected step (1 = the paper)')),
    }


class W2SDGuider(comfy.samplers.CFGGuider):
    """CFG guider with a second (weak) pair of conds and a CFG scale per W2SD role.

    The main step uses positive/negative at ``cfg``; the reflection's strong leg positive/negative at
    ``strong_cfg``; its weak leg weak_positive/weak_negative at ``weak_cfg``. Hooks on the weak conds (a LoRA at
    another strength, another checkpoint as a patch) make a weak model without a second load.
    """
    handles_w2sd_roles = True

    def set_conds(self, positive, negative, weak_positive=None, weak_negative=None):
        # The very objects ComfyUI passes when one output feeds both inputs: the weak leg's conds are the strong's.
        self.weak_conds_are_strong = ((weak_positive is None or weak_positive is positive)
                                      and (weak_negative is None or weak_negative is negative))
        self.inner_set_conds({'positive': positive, 'negative': negative,
                              'weak_positive': positive if weak_positive is None else weak_positive,
                              'weak_negative': negative if weak_negative is None else weak_negative})

    def set_cfg(self, cfg, strong_cfg=STRONG_CFG, weak_cfg=WEAK_CFG):
        self.cfg, self.strong_cfg, self.weak_cfg = cfg, strong_cfg, weak_cfg

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        role = model_options.get(ROLE_KEY, 'main')
        prefix = 'weak_' if role == 'weak' else ''
        cfg = {'main': self.cfg, 'strong': self.strong_cfg, 'weak': self.weak_cfg}[role]
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get(prefix + 'negative'),
                                                self.conds.get(prefix + 'positive'), cfg,
                                                model_options=model_options, seed=seed)


def make_guider(model, positive, negative, weak_positive, weak_negative, cfg, strong_cfg, weak_cfg):
    for name, value in (('cfg', cfg), ('strong_cfg', strong_cfg), ('weak_cfg', weak_cfg)):
        check_number(name, value)
    guider = W2SDGuider(model)
    guider.set_conds(positive, negative, weak_positive, weak_negative)
    guider.set_cfg(cfg, strong_cfg, weak_cfg)
    return guider


def make_sampler(sampler_name, options):
    return comfy.samplers.KSAMPLER(sampler_function(sampler_name), extra_options=options,
                                   inpaint_options=INPAINT_OPTIONS.get(sampler_name, {}))


def guider_inputs():
    """The W2SD Guider's inputs, shared with the W2SD KSampler."""
    return {
        'cfg': ('FLOAT', number('cfg', default=5.5, **CFG,
                                tooltip='CFG of the main step (the base sampler\'s own call)')),
        'strong_cfg': ('FLOAT', number('strong_cfg', default=STRONG_CFG, **CFG,
                                       tooltip=STRONG_TOOLTIP + ', on positive / negative')),
        'weak_cfg': ('FLOAT', number('weak_cfg', default=WEAK_CFG, **CFG, tooltip=WEAK_TOOLTIP)),
    }


def weak_cond_inputs():
    return {
        'weak_positive': ('CONDITIONING', {'tooltip': 'positive of the weak leg (default: positive), e.g. a '
                                           'plainer prompt; hooks on it (Create Hook LoRA / Model as LoRA) give a '
                                           'weak LoRA strength or a weak checkpoint'}),
        'weak_negative': ('CONDITIONING', {'tooltip': 'negative of the weak leg (default: negative); put the same '
                                           'hooks on it as on weak_positive'}),
    }


class W2SDSamplerNode:
    DESCRIPTION = ('W2SD (Weak-to-Strong Diffusion) sampler for SamplerCustom / SamplerCustomAdvanced: the base '
                   'sampler with a reflection (a strong denoising step, then a weak inversion) before each of the '
                   'first lam steps. The weak leg is a lower CFG (strong_cfg / weak_cfg) with any CFG guider, or '
                   'the weak conds of a W2SD Guider.')

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'sampler_name': (SAMPLER_NAMES, {'tooltip': SAMPLER_TOOLTIP}),
            **reflection_inputs(),
            'cfg_source': (list(CFG_SOURCES), {
                'tooltip': 'CFG of the reflection legs. auto: a connected W2SD Guider\'s strong/weak conds and '
                           'CFG, else strong_cfg / weak_cfg below; sampler: strong_cfg / weak_cfg below, also '
                           'over a W2SD Guider\'s (its weak conds are kept); guider: a W2SD Guider\'s only'}),
            'strong_cfg': ('FLOAT', number('strong_cfg', default=STRONG_CFG, **CFG,
                                           tooltip=STRONG_TOOLTIP + ' (cfg_source sampler, or auto without a W2SD '
                                                   'Guider)')),
            'weak_cfg': ('FLOAT', number('weak_cfg', default=WEAK_CFG, **CFG,
                                         tooltip=WEAK_TOOLTIP + ' (cfg_source sampler, or auto without a W2SD '
                                                 'Guider)')),
        }}

    VALIDATE_INPUTS = classmethod(validate_sampler_name)

    RETURN_TYPES = ('SAMPLER',)
    OUTPUT_TOOLTIPS = ('the W2SD sampler',)
    FUNCTION = 'get_sampler'
    CATEGORY = CUSTOM_SAMPLING + '/samplers'

    def get_sampler(self, sampler_name, lam, strength, weak_sigma, form, reflections, cfg_source, strong_cfg,
                    weak_cfg):
        if cfg_source not in CFG_SOURCES:
            raise ValueError(f'W2SD: cfg_source must be one of {CFG_SOURCES}, got {cfg_source!r}')
        for name, value in (('strong_cfg', strong_cfg), ('weak_cfg', weak_cfg)):
            check_number(name, value)
        options = dict(w2sd_options(lam, strength, weak_sigma, form, reflections), cfg_source=cfg_source,
                       strong_cfg=strong_cfg, weak_cfg=weak_cfg)
        return (make_sampler(sampler_name, options),)


class W2SDGuiderNode:
    DESCRIPTION = ('Guider for W2SD: the main step on positive / negative at cfg, the reflection\'s strong leg on '
                   'positive / negative at strong_cfg, its weak leg on weak_positive / weak_negative at weak_cfg. '
                   'Use with SamplerCustomAdvanced and a W2SD Sampler; with any other sampler it is a CFG guider.')

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'model': ('MODEL', {'tooltip': 'the model for all three calls (hooks on the weak conds change the weak '
                                           'leg\'s weights)'}),
            'positive': ('CONDITIONING', {'tooltip': 'positive of the main step and the strong leg'}),
            'negative': ('CONDITIONING', {'tooltip': 'negative of the main step and the strong leg'}),
            **guider_inputs(),
        }, 'optional': weak_cond_inputs()}

    RETURN_TYPES = ('GUIDER',)
    OUTPUT_TOOLTIPS = ('the W2SD guider (for SamplerCustomAdvanced)',)
    FUNCTION = 'get_guider'
    CATEGORY = CUSTOM_SAMPLING + '/guiders'

    def get_guider(self, model, positive, negative, cfg, strong_cfg, weak_cfg, weak_positive=None,
                   weak_negative=None):
        return (make_guider(model, positive, negative, weak_positive, weak_negative, cfg, strong_cfg, weak_cfg),)


def fix_empty_latent(model, latent):
    # Current ComfyUI also takes the latent's downscale ratios (to size an empty latent); v0.8 does not.
    params = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    return comfy.sample.fix_empty_latent_channels(model, latent['samples'],
                                                  *[latent.get(k) for k in LATENT_RATIO_KEYS if k in params])


class W2SDKSamplerNode:
    DESCRIPTION = ('KSampler with W2SD (Weak-to-Strong Diffusion) reflections: before each of the first lam steps '
                   'the latent takes a strong denoising step and a weak inversion. Weak = a lower CFG (weak_cfg), '
                   'and/or weak conds (another prompt, or hooks for a weak LoRA strength / checkpoint).')

    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'model': ('MODEL', {'tooltip': 'the model used for denoising the input latent'}),
            'seed': ('INT', {'default': 0, 'min': 0, 'max': 0xffffffffffffffff, 'control_after_generate': True,
                             'tooltip': 'the random seed used for creating the noise'}),
            'steps': ('INT', {'default': 50, 'min': 1, 'max': 10000,
                              'tooltip': 'number of steps (the paper: 50)'}),
            **{k: v for k, v in guider_inputs().items() if k == 'cfg'},
            'sampler_name': (SAMPLER_NAMES, {'tooltip': SAMPLER_TOOLTIP}),
            'scheduler': (comfy.samplers.SCHEDULER_NAMES, {'tooltip': 'how noise is removed over the steps'}),
            'positive': ('CONDITIONING', {'tooltip': 'positive of the main step and the strong leg'}),
            'negative': ('CONDITIONING', {'tooltip': 'negative of the main step and the strong leg'}),
            'latent_image': ('LATENT', {'tooltip': 'the latent image to denoise'}),
            'denoise': ('FLOAT', number('denoise', default=1.0, step=0.01,
                                        tooltip='the amount of denoising; lower keeps more of the input latent')),
            **{k: v for k, v in guider_inputs().items() if k != 'cfg'},
            **reflection_inputs(),
        }, 'optional': weak_cond_inputs()}

    VALIDATE_INPUTS = classmethod(validate_sampler_name)
    RETURN_TYPES = ('LATENT',)
    OUTPUT_TOOLTIPS = ('the denoised latent',)
    FUNCTION = 'sample'
    CATEGORY = SAMPLING

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               strong_cfg, weak_cfg, lam, strength, weak_sigma, form, reflections, weak_positive=None,
               weak_negative=None):
        check_number('denoise', denoise)
        guider = make_guider(model, positive, negative, weak_positive, weak_negative, cfg, strong_cfg, weak_cfg)
        sampler = make_sampler(sampler_name, w2sd_options(lam, strength, weak_sigma, form, reflections))
        # ComfyUI's KSampler computes the schedule (denoise, and the dropped penultimate sigma of dpm_2*)
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        x = fix_empty_latent(model, latent_image)
        noise = comfy.sample.prepare_noise(x, seed, latent_image.get('batch_index'))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = guider.sample(noise, x, sampler, sigmas, denoise_mask=latent_image.get('noise_mask'),
                                callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent = {k: v for k, v in latent_image.items() if k not in LATENT_RATIO_KEYS}
        latent['samples'] = samples.to(comfy.model_management.intermediate_device())
        return (latent,)


NODE_CLASS_MAPPINGS = {
    'W2SDSampler': W2SDSamplerNode,
    'W2SDGuider': W2SDGuiderNode,
    'W2SDKSampler': W2SDKSamplerNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    'W2SDSampler': 'W2SD Sampler',
    'W2SDGuider': 'W2SD Guider',
    'W2SDKSampler': 'W2SD KSampler',
}
