"""The extension's script file (``wrappers/sd_webui/scripts/w2sd.py``) loaded against stand-in ``modules.*``.

The stand-ins reproduce what the script uses of the hosts, read at A1111 v1.10 / dev (AUTOMATIC1111/
stable-diffusion-webui 72632242, mirror kklouzal/stable-diffusion-webui 7eed414) and Forge dfdcbab:
``KDiffusionSampler(funcname, sd_model)`` accepting a callable, ``Sampler.initialize(p)`` returning the kwargs
chosen by signature and installing ``TorchHijack``, ``sample()`` calling ``func(model_wrap_cfg, x,
extra_args=sampler_extra_args, disable=False, callback=callback_state, sigmas=..., **kwargs)``,
``SamplerData(name, constructor, aliases, options)``, ``Script`` hooks ``process(p, *args)`` and
``process_before_every_sampling(p, *args, **kwargs)``, ``p.get_conds_with_caching(function, prompts, steps,
caches, extra_network_data, hires_steps)``.
"""
import collections
import importlib.util
import inspect
import os
import sys
import types

import pytest
import torch

from test_sd_webui import SIGMAS, X, HostCFGDenoiser, a1111_registry, conds

import k_diffusion.sampling as K

from w2sd_sdwebui import options as opts

HERE = os.path.dirname(__file__)
UI_DEFAULTS = [getattr(opts.DEFAULTS, n) for n in opts.ARGS]  # what the host passes for an untouched panel
SCRIPT = os.path.join(HERE, '..', 'wrappers', 'sd_webui', 'scripts', 'w2sd.py')


class SamplerData(collections.namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])):
    def total_steps(self, steps):
        return steps * 2 if self.options.get('second_order') else steps


class KDiffusionSampler:
    """The host's sampler, reduced to the parts a W2SD sampler goes through."""

    def __init__(self, funcname, sd_model, options=None):
        self.funcname, self.sd_model = funcname, sd_model
        self.func = funcname if callable(funcname) else getattr(K, funcname)
        self.extra_params = host.sampler_extra_params.get(funcname, [])
        self.model_wrap_cfg = HostCFGDenoiser(None)
        self.config = None

    def initialize(self, p):
        self.model_wrap_cfg.p, self.model_wrap_cfg.step = p, 0
        K.torch = TorchHijack(p)
        parameters = inspect.signature(self.func).parameters
        kwargs = {n: getattr(p, n) for n in self.extra_params if hasattr(p, n) and n in parameters}
        if 'eta' in parameters:
            kwargs['eta'] = 1.0
        return kwargs

    def sample(self, p, x, conditioning, unconditional_conditioning):
        kwargs = self.initialize(p)
        kwargs['sigmas'] = SIGMAS
        self.sampler_extra_args = {**conds(), 'cond': conditioning, 'uncond': unconditional_conditioning}
        self.steps = []
        return self.func(self.model_wrap_cfg, x * SIGMAS[0], extra_args=self.sampler_extra_args, disable=True,
                         callback=lambda d: self.steps.append(d['i']), **kwargs)


class TorchHijack:
    """``k_diffusion.sampling.torch`` during a run: ``randn_like`` returns the processing object's next noise."""

    def __init__(self, p):
        self.p = p

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        return self.p.rng.pop(0)


host = types.SimpleNamespace()


class Component:
    def __init__(self, *args, value=None, **kwargs):
        self.args, self.value, self.kwargs = args, value, kwargs


class Accordion:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Script:
    def elem_id(self, item_id):
        return f'script_txt2img_w2sd_{item_id}'


class Processing(types.SimpleNamespace):
    def get_conds_with_caching(self, function, prompts, steps, caches, extra_network_data, hires_steps=None):
        self.cond_requests.append((function, list(prompts), prompts.kwargs, steps, extra_network_data, hires_steps))
        caches[0][:] = ['params', ('conds of', tuple(prompts))]
        return caches[0][1]


class SdConditioning(list):
    def __init__(self, prompts, **kwargs):
        super().__init__(prompts)
        self.kwargs = kwargs


def checkpoint_match(title):
    """``sd_models.get_closet_checkpoint_match``: the checkpoint whose title contains ``title``, or None."""
    return next((types.SimpleNamespace(filename=f'/models/{t}', title=t)
                 for t in ('a.safetensors', 'b.safetensors', 'c.ckpt') if title and title in t), None)


@pytest.fixture
def script(monkeypatch):
    """The script module, imported with the stand-ins in ``sys.modules``; the real k-diffusion stays."""
    registry = a1111_registry()
    registry.find_sampler_config = lambda name: registry.all_samplers_map[name]
    host.sampler_extra_params = {'sample_euler': ['s_churn', 's_tmin', 's_tmax', 's_noise']}
    table = [('Euler', 'sample_euler', ['k_euler'], {}), ('Euler a', 'sample_euler_ancestral', ['k_euler_a'], {}),
             ('Heun', 'sample_heun', ['k_heun'], {'second_order': True})]
    stubs = {
        'gradio': types.SimpleNamespace(Accordion=Accordion, Checkbox=Component, Radio=Component, Slider=Component,
                                        Textbox=Component, Dropdown=Component, HTML=Component),
        'modules': types.ModuleType('modules'),
        'modules.scripts': types.SimpleNamespace(Script=Script, AlwaysVisible=object()),
        'modules.sd_models': types.SimpleNamespace(checkpoint_tiles=lambda: ['b.safetensors', 'a.safetensors'],
                                                   get_closet_checkpoint_match=checkpoint_match),
        'modules.sd_samplers': registry,
        'modules.sd_samplers_common': types.SimpleNamespace(SamplerData=SamplerData),
        'modules.sd_samplers_kdiffusion': types.SimpleNamespace(
            KDiffusionSampler=KDiffusionSampler, samplers_k_diffusion=table,
            sampler_extra_params=host.sampler_extra_params),
        'modules.prompt_parser': types.SimpleNamespace(
            SdConditioning=SdConditioning, get_multicond_learned_conditioning='multicond',
            get_learned_conditioning='learned'),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith('modules.'):
            setattr(stubs['modules'], name[8:], module)
    monkeypatch.setattr(K, 'torch', K.torch)  # the stand-in initialize() hijacks it, as the host does
    spec = importlib.util.spec_from_file_location('w2sd_script_under_test', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, registry


def make_p(sampler_name='W2SD Euler', sd_model=None, **kw):
    return Processing(sampler_name=sampler_name, hr_sampler_name=None, is_hr_pass=False,
                      sd_model=types.SimpleNamespace() if sd_model is None else sd_model,
                      extra_generation_params={}, cond_requests=[], prompts=['a', 'b'], width=64, height=96,
                      steps=len(SIGMAS) - 1, extra_network_data={}, rng=[torch.randn(2, 3) for _ in SIGMAS],
                      s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1., **kw)


def test_import_registers_the_w2sd_samplers(script):
    module, registry = script
    assert [d.name for d in registry.all_samplers] == ['Euler', 'W2SD Euler', 'W2SD Euler a', 'W2SD Heun']
    assert registry.samplers_map['w2sd_k_euler_a'] == 'W2SD Euler a'
    assert registry.all_samplers_map['W2SD Heun'].options == {'second_order': True}
    sampler = registry.all_samplers_map['W2SD Euler'].constructor('sd_model')
    assert isinstance(sampler, module.W2SDSampler) and sampler.extra_params == host.sampler_extra_params['sample_euler']


def test_ui_controls_follow_args_and_paste_back(script):
    module, _ = script
    s = module.W2SDScript()
    controls = s.ui(False)
    assert [c.value for c in controls] == UI_DEFAULTS
    message = s.infotext_fields[-1][0]
    assert [c for c, _ in s.infotext_fields] == controls + [message] and message not in controls
    pasted = [paste({'W2SD': 'prompt', 'W2SD weak prompt': 'a dog', 'W2SD lambda': '7'})
              for _, paste in s.infotext_fields]
    assert pasted[:2] == [True, 'prompt'] and pasted[3] == 'a dog' and pasted[opts.ARGS.index('lam')] == 7
    assert pasted[-1] == ''  # the message area is cleared
    # an invalid value: every control back at its default (W2SD off), and the reason in the message area
    pasted = [paste({'W2SD': 'prompt', 'W2SD weak prompt': 'a dog', 'W2SD lambda': '2.7'})
              for _, paste in s.infotext_fields]
    assert pasted[:-1] == UI_DEFAULTS
    assert pasted[-1].startswith('W2SD: the pasted infotext was not applied') and 'W2SD lambda: &#x27;2.7&#x27;' in \
        pasted[-1]


@pytest.mark.parametrize('forge', [False, True])
def test_the_panel_offers_the_weak_models_of_its_host(script, monkeypatch, forge):
    module, _ = script
    if forge:
        monkeypatch.setitem(sys.modules, 'modules_forge', types.ModuleType('modules_forge'))
    controls = dict(zip(opts.ARGS, module.W2SDScript().ui(False)))
    kinds = controls['weak'].args[0]
    assert kinds == (['cfg', 'prompt', 'checkpoint'] if forge else ['cfg', 'prompt', 'lora'])
    assert controls['weak_checkpoint'].kwargs['visible'] is forge
    assert controls['weak_lora'].kwargs['visible'] is controls['lora_names'].kwargs['visible'] is (not forge)
    assert controls['strength'].args == opts.RANGES['strength'] == (-10., 10.)  # the API's range


@pytest.mark.parametrize('sampler, hires, written', [
    ('Euler', None, False), ('W2SD Euler', None, True), ('Euler', 'W2SD Euler', True),
    ('W2SD Euler', 'Use same sampler', True), ('Euler', 'Use same sampler', False)])
def test_the_infotext_has_w2sd_settings_only_when_a_w2sd_sampler_runs(script, capsys, sampler, hires, written):
    module, _ = script
    p = make_p(sampler_name=sampler, enable_hr=hires is not None)
    p.hr_sampler_name = hires
    module.W2SDScript().process(p, {'enabled': True})
    assert ('W2SD' in p.extra_generation_params) is written
    assert ('W2SD: enabled, but no "W2SD ..." sampler' in capsys.readouterr().out) is not written


def test_process_and_sampling_with_a_weak_prompt(script):
    module, registry = script
    s = module.W2SDScript()
    p = make_p()
    s.process(p, {'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a cat', 'weak_negative_prompt': 'blur'})
    assert p.extra_generation_params['W2SD'] == 'prompt' and p.extra_generation_params['W2SD weak prompt'] == 'a cat'
    s.process_before_every_sampling(p, x=None, noise=None, c=None, uc=None)
    (f_c, prompts_c, size, steps, nets, hires), (f_uc, prompts_uc, size_uc, *_) = p.cond_requests
    assert (f_c, prompts_c, size, steps, hires) == ('multicond', ['a cat', 'a cat'], {'width': 64, 'height': 96},
                                                    len(SIGMAS) - 1, None)
    assert (f_uc, prompts_uc, size_uc) == ('learned', ['blur', 'blur'], {'width': 64, 'height': 96,
                                                                          'is_negative_prompt': True})
    sampler = registry.all_samplers_map['W2SD Euler'].constructor('sd_model')
    main_c = [(10 ** 6, torch.tensor(1.0))]
    p.w2sd_weak_conds = ([(10 ** 6, torch.tensor(0.0))], torch.tensor(0.0))  # tensors for the stand-in model
    out = sampler.sample(p, X, main_c, torch.tensor(0.5))
    calls = sampler.model_wrap_cfg.calls
    assert sampler.steps == list(range(len(SIGMAS) - 1)) and sampler.model_wrap_cfg.step == len(SIGMAS) - 1
    assert sum(c['cond'] is p.w2sd_weak_conds[0] for c in calls) == len(SIGMAS) - 2
    assert torch.isfinite(out).all()


def test_disabled_script_leaves_the_sampler_a_plain_twin(script):
    module, registry = script
    p = make_p()
    module.W2SDScript().process(p, *UI_DEFAULTS)
    assert p.extra_generation_params == {}
    out = registry.all_samplers_map['W2SD Euler'].constructor('m').sample(p, X, [(10 ** 6, torch.tensor(1.))],
                                                                          torch.tensor(.5))
    p_ref = make_p()
    ref = KDiffusionSampler('sample_euler', 'm')
    assert torch.equal(out, ref.sample(p_ref, X, [(10 ** 6, torch.tensor(1.))], torch.tensor(.5)))


def test_ancestral_noise_comes_from_the_hijacked_module(script):
    module, registry = script
    p = make_p(sampler_name='W2SD Euler a')
    module.W2SDScript().process(p, True, *UI_DEFAULTS[1:])
    module.W2SDScript().process_before_every_sampling(p)
    unused = len(p.rng)
    registry.all_samplers_map['W2SD Euler a'].constructor('m').sample(p, X, [(10 ** 6, torch.tensor(1.))],
                                                                      torch.tensor(.5))
    assert unused - len(p.rng) == len(SIGMAS) - 2  # the host's seeded noise, one per step into sigma > 0


def test_invalid_settings_fail_the_w2sd_sampler(script):
    module, registry = script
    p = make_p()
    with pytest.raises(ValueError, match='needs a weak prompt'):
        module.W2SDScript().process(p, True, 'prompt', *UI_DEFAULTS[2:])
    sampler = registry.all_samplers_map['W2SD Euler'].constructor('m')
    with pytest.raises(ValueError, match='needs a weak prompt'):  # the host only logs script errors
        sampler.sample(p, X, [(10 ** 6, torch.tensor(1.))], torch.tensor(.5))
    with pytest.raises(ValueError, match='needs Forge'):
        module.W2SDScript().process(make_p(), {'enabled': True, 'weak': 'checkpoint',
                                                       'weak_checkpoint': 'a.safetensors'})
    forge_p = make_p(sd_model=types.SimpleNamespace(forge_objects=None))
    with pytest.raises(ValueError, match='needs A1111'):
        module.W2SDScript().process(forge_p, {'enabled': True, 'weak': 'lora'})


def forge_p(**kw):
    # The hires pass's size, steps and LoRAs, as Forge's processing object holds them.
    return make_p(sd_model=types.SimpleNamespace(forge_objects=None), hr_upscale_to_x=128, hr_upscale_to_y=192,
                  firstpass_steps=len(SIGMAS) - 1, hr_second_pass_steps=0, hr_extra_network_data={},
                  hr_distilled_cfg=3.5, **kw)


def test_forge_missing_weak_checkpoint_names_it_in_the_sampler_error(script):
    module, registry = script
    p = forge_p()
    with pytest.raises(ValueError, match="Weak checkpoint 'sd15-weak' not found; the checkpoints the webui lists: "
                                         "a.safetensors, b.safetensors"):
        module.W2SDScript().process(p, {'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': 'sd15-weak'})
    sampler = registry.all_samplers_map['W2SD Euler'].constructor('m')
    with pytest.raises(ValueError, match="'sd15-weak' not found"):  # the webui only logged the script's error
        sampler.sample(p, X, [(10 ** 6, torch.tensor(1.))], torch.tensor(.5))
    with pytest.raises(ValueError, match='must be a .safetensors file'):
        module.W2SDScript().process(forge_p(), {'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': 'c.ckpt'})


def test_errors_preparing_a_pass_reach_the_sampler(script, monkeypatch):
    module, registry = script
    p = forge_p()
    s = module.W2SDScript()
    s.process(p, {'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': 'a.safetensors'})

    def fail(title):
        raise ValueError(f'W2SD: could not load {title}')
    monkeypatch.setattr(module, '_forge_weak_unet', fail)
    with pytest.raises(ValueError, match='could not load'):
        s.process_before_every_sampling(p)
    sampler = registry.all_samplers_map['W2SD Euler'].constructor('m')
    with pytest.raises(ValueError, match='could not load a.safetensors'):  # not "no weak checkpoint was loaded"
        sampler.sample(p, X, [(10 ** 6, torch.tensor(1.))], torch.tensor(.5))


@pytest.mark.parametrize('settings, off', [
    ({'enabled': True}, True),                                            # weak CFG 0 needs the negative prompt
    ({'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a dog'}, False),  # both legs at reflection CFG 1
    ({'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a dog', 'reflection_cfg': 3.0}, True),
])
def test_forge_hires_cfg_one_skips_reflection_in_that_pass_and_says_so(script, settings, off):
    """Forge's API defaults Hires CFG to 1, where the host drops the hires negative prompt (``hr_uc = None``)."""
    module, registry = script
    p = forge_p(hr_cfg=1.0)
    s = module.W2SDScript()
    s.process(p, settings)
    p.is_hr_pass = True
    s.process_before_every_sampling(p)
    p.w2sd_weak_conds = ([(10 ** 6, torch.tensor(0.0))], None)  # tensors for the stand-in model
    sampler = registry.all_samplers_map['W2SD Euler'].constructor('m')
    sampler.model_wrap_cfg.forge = True  # the hires pass runs at p.hr_cfg
    out = sampler.sample(p, X, [(10 ** 6, torch.tensor(1.))], None)  # Forge: no uncond at CFG 1
    assert torch.isfinite(out).all()
    if off:
        assert p.extra_generation_params['W2SD hires pass'].startswith('off (Hires CFG 1 has no negative prompt')
        plain = KDiffusionSampler('sample_euler', 'm')
        plain.model_wrap_cfg.forge = True
        p_ref = forge_p(hr_cfg=1.0)
        p_ref.is_hr_pass = True
        assert torch.equal(out, plain.sample(p_ref, X, [(10 ** 6, torch.tensor(1.))], None))
    else:
        assert 'W2SD hires pass' not in p.extra_generation_params
        assert len(sampler.model_wrap_cfg.calls) > len(SIGMAS) - 1  # reflection calls ran
    # The first pass is not affected: a W2SD CFG pair at CFG 1 there is the user's own choice and an error.
    assert p.extra_generation_params['W2SD'] == settings.get('weak', 'cfg')
