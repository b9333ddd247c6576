"""ComfyUI nodes for W2SD: a SAMPLER, a GUIDER and an all-in-one KSampler-style node."""
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .core import FORMS, ROLE_KEY, SAMPLER_NAMES, WEAK_SIGMAS, sampler_function, w2sd_options

CATEGORY = 'sampling/w2sd'
CFG = {'min': -100.0, 'max': 100.0, 'step': 0.1, 'round': 0.01}


def reflection_inputs():
    return {
        'lam': ('INT', {'default': -1, 'min': -1, 'max': 10000,
                        'tooltip': 'reflect the first lam steps (the noisiest); -1 = every step but the last'}),
        'strength': ('FLOAT', {'default': 1.0, 'min': -10.0, 'max': 10.0, 'step': 0.05,
                               'tooltip': 'scales the reflection; 1 = the paper, 0 = plain sampling'}),
        'weak_sigma': (list(WEAK_SIGMAS), {'tooltip': 'noise level of the weak inversion: current (paper) or next'}),
        'form': (list(FORMS), {'tooltip': 'paper: strong denoise then weak inversion; anchored: both legs at x'}),
        'reflections': ('INT', {'default': 1, 'min': 1, 'max': 10, 'tooltip': 'reflections per reflected step'}),
    }


class W2SDGuider(comfy.samplers.CFGGuider):
    """CFG guider with a second (weak) pair of conds and a CFG scale per W2SD role.

    The main step uses positive/negative at ``cfg``; the reflection's strong leg positive/negative at
    ``strong_cfg``; its weak leg weak_positive/weak_negative at ``weak_cfg``. Hooks on the weak conds (a LoRA at
    another strength, another checkpoint as a patch) make a weak model without a second load.
    """
    handles_w2sd_roles = True

    def set_conds(self, positive, negative, weak_positive, weak_negative):
        self.inner_set_conds({'positive': positive, 'negative': negative,
                              'weak_positive': weak_positive, 'weak_negative': weak_negative})

    def set_cfg(self, cfg, strong_cfg=None, weak_cfg=None):
        self.cfg = cfg
        self.strong_cfg = cfg if strong_cfg is None else strong_cfg
        self.weak_cfg = cfg if weak_cfg is None else weak_cfg

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        role = model_options.get(ROLE_KEY, 'main')
        prefix = 'weak_' if role == 'weak' else ''
        cfg = {'main': self.cfg, 'strong': self.strong_cfg, 'weak': self.weak_cfg}[role]
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get(prefix + 'negative'),
                                                self.conds.get(prefix + 'positive'), cfg,
                                                model_options=model_options, seed=seed)


def make_guider(model, positive, negative, weak_positive, weak_negative, cfg, strong_cfg, weak_cfg):
    guider = W2SDGuider(model)
    guider.set_conds(positive, negative, positive if weak_positive is None else weak_positive,
                     negative if weak_negative is None else weak_negative)
    guider.set_cfg(cfg, strong_cfg, weak_cfg)
    return guider


class W2SDSamplerNode:
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: any base sampler of the family with reflections."""
    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'sampler_name': (SAMPLER_NAMES,),
            **reflection_inputs(),
            'cfg_source': (['sampler', 'guider'], {
                'tooltip': 'sampler: the reflection legs use strong_cfg / weak_cfg below (works with any CFG '
                           'guider); guider: a W2SD Guider sets conds and CFG of each leg'}),
            'strong_cfg': ('FLOAT', {'default': 5.5, **CFG}),
            'weak_cfg': ('FLOAT', {'default': 0.0, **CFG}),
        }}

    RETURN_TYPES = ('SAMPLER',)
    FUNCTION = 'get_sampler'
    CATEGORY = CATEGORY

    def get_sampler(self, sampler_name, lam, strength, weak_sigma, form, reflections, cfg_source, strong_cfg,
                    weak_cfg):
        options = w2sd_options(lam, strength, weak_sigma, form, reflections)
        if cfg_source == 'sampler':
            options.update(strong_cfg=strong_cfg, weak_cfg=weak_cfg)
        return (comfy.samplers.KSAMPLER(sampler_function(sampler_name), extra_options=options),)


class W2SDGuiderNode:
    """GUIDER: main, strong and weak conds/CFG for W2SD (use with SamplerCustomAdvanced and a W2SD sampler)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'model': ('MODEL',),
            'positive': ('CONDITIONING',),
            'negative': ('CONDITIONING',),
            'cfg': ('FLOAT', {'default': 5.5, **CFG, 'tooltip': 'CFG of the main step'}),
            'strong_cfg': ('FLOAT', {'default': 1.0, **CFG, 'tooltip': 'CFG of the reflection strong leg'}),
            'weak_cfg': ('FLOAT', {'default': 1.0, **CFG, 'tooltip': 'CFG of the reflection weak leg'}),
        }, 'optional': {
            'weak_positive': ('CONDITIONING', {'tooltip': 'weak leg positive (default: positive); '
                                               'hooks on it give a weak LoRA strength or checkpoint'}),
            'weak_negative': ('CONDITIONING', {'tooltip': 'weak leg negative (default: negative)'}),
        }}

    RETURN_TYPES = ('GUIDER',)
    FUNCTION = 'get_guider'
    CATEGORY = CATEGORY

    def get_guider(self, model, positive, negative, cfg, strong_cfg, weak_cfg, weak_positive=None,
                   weak_negative=None):
        return (make_guider(model, positive, negative, weak_positive, weak_negative, cfg, strong_cfg, weak_cfg),)


class W2SDKSamplerNode:
    """All in one: KSampler with W2SD reflections; weak = other CFG and/or weak conds (with hooks)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {'required': {
            'model': ('MODEL',),
            'seed': ('INT', {'default': 0, 'min': 0, 'max': 0xffffffffffffffff, 'control_after_generate': True}),
            'steps': ('INT', {'default': 50, 'min': 1, 'max': 10000}),
            'cfg': ('FLOAT', {'default': 5.5, **CFG, 'tooltip': 'CFG of the main step'}),
            'sampler_name': (SAMPLER_NAMES,),
            'scheduler': (comfy.samplers.SCHEDULER_NAMES,),
            'positive': ('CONDITIONING',),
            'negative': ('CONDITIONING',),
            'latent_image': ('LATENT',),
            'denoise': ('FLOAT', {'default': 1.0, 'min': 0.0, 'max': 1.0, 'step': 0.01}),
            'strong_cfg': ('FLOAT', {'default': 5.5, **CFG, 'tooltip': 'CFG of the reflection strong leg'}),
            'weak_cfg': ('FLOAT', {'default': 0.0, **CFG, 'tooltip': 'CFG of the reflection weak leg'}),
            **reflection_inputs(),
        }, 'optional': {
            'weak_positive': ('CONDITIONING',),
            'weak_negative': ('CONDITIONING',),
        }}

    RETURN_TYPES = ('LATENT',)
    FUNCTION = 'sample'
    CATEGORY = CATEGORY

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               strong_cfg, weak_cfg, lam, strength, weak_sigma, form, reflections, weak_positive=None,
               weak_negative=None):
        guider = make_guider(model, positive, negative, weak_positive, weak_negative, cfg, strong_cfg, weak_cfg)
        sampler = comfy.samplers.KSAMPLER(sampler_function(sampler_name),
                                          extra_options=w2sd_options(lam, strength, weak_sigma, form, reflections))
        # ComfyUI's KSampler computes the schedule (denoise, and the dropped penultimate sigma of dpm_2*)
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        latent = latent_image.copy()
        x = comfy.sample.fix_empty_latent_channels(model, latent['samples'])
        noise = comfy.sample.prepare_noise(x, seed, latent.get('batch_index'))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        samples = guider.sample(noise, x, sampler, sigmas, denoise_mask=latent.get('noise_mask'), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
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
