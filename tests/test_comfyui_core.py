"""The ComfyUI node pack's logic with small stand-ins for ComfyUI's objects (no ComfyUI needed)."""
import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from w2sd_samplers import _kdiff
from w2sd_samplers import sampling
from w2sd_samplers.sampling import sample_w2sd_euler, sample_w2sd_dpmpp_2m
from w2sd_samplers.toy import GaussianMixture

_path = pathlib.Path(__file__).parents[1] / 'wrappers' / 'comfyui' / 'core.py'
_spec = importlib.util.spec_from_file_location('w2sd_comfy_core', _path)
core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(core)

STRONG = GaussianMixture([[-2., 0.], [2., 0.]], 0.5, [0.5, 0.5])
WEAK = GaussianMixture([[-2., 0.], [2., 0.]], 0.5, [0.1, 0.9])
UNCOND = GaussianMixture([[0., 1.]], 1.5, [1.])


class Inpaint:
    """ComfyUI's KSamplerX0Inpaint signature: an extra_args key it does not know raises TypeError."""

    def __init__(self, guider):
        self.inner_model = guider
        self.calls = []

    def __call__(self, x, sigma, denoise_mask, model_options={}, seed=None):
        self.calls.append(model_options.get(core.ROLE_KEY, 'main'))
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class RoleGuider:
    handles_w2sd_roles = True
    weak_conds_are_strong = False

    def __init__(self, **denoisers):
        self.denoisers = denoisers

    def __call__(self, x, sigma, model_options={}, seed=None):
        return self.denoisers[model_options.get(core.ROLE_KEY, 'main')](x, sigma)


class CFGGuider:
    """What ComfyUI's sampling_function does with cond/uncond and post-CFG functions; ``uncond=None`` is its
    BasicGuider: no negative conds, and a zero tensor in place of the unconditional prediction."""

    def __init__(self, cond, uncond, cfg):
        self.cond, self.uncond, self.cfg = cond, uncond, cfg

    def __call__(self, x, sigma, model_options={}, seed=None):
        c = self.cond(x, sigma)
        u = torch.zeros_like(x) if self.uncond is None else self.uncond(x, sigma)
        out = u + (c - u) * self.cfg
        for fn in model_options.get('sampler_post_cfg_function', []):
            out = fn({'denoised': out, 'cond_denoised': c, 'uncond_denoised': u,
                      'uncond': None if self.uncond is None else ['negative conds']})
        return out


def cfg(scale):
    return lambda x, sigma: UNCOND(x, sigma) + (STRONG(x, sigma) - UNCOND(x, sigma)) * scale


def setup():
    sigmas = torch.tensor([10., 5., 2., 0.8, 0.3, 0.], dtype=torch.float64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    main = {'model_options': {'transformer_options': {}}, 'seed': 3, 'denoise_mask': None}
    return x, sigmas, main


def test_options_from_widgets():
    assert core.w2sd_options() == dict(lam=None, strength=1., weak_sigma='current', form='paper', reflections=1)
    assert core.w2sd_options(3, 0.5, 'next', 'paper', 2)['lam'] == 3
    for bad in (dict(lam=-2), dict(lam=1.5), dict(weak_sigma='prev'), dict(form='mirror')):
        with pytest.raises(ValueError, match=next(iter(bad))):
            core.w2sd_options(**bad)


@pytest.mark.parametrize('name, value', [('strength', float('nan')), ('strength', 11.), ('strength', -20),
                                         ('lam', 10001), ('lam', True), ('reflections', 0), ('reflections', 2.),
                                         ('strength', '1')])
def test_widget_values_outside_the_widgets_range_name_that_range(name, value):
    lo, hi = core.RANGES[name]
    with pytest.raises(ValueError, match=rf'^W2SD: {name} must be .* in \[{lo:g}, {hi:g}\], got'):
        core.w2sd_options(**{name: value})


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf'), '5', True])
@pytest.mark.parametrize('name', ['strong_cfg', 'weak_cfg'])
def test_a_cfg_that_is_not_a_finite_number_is_refused_before_sampling(name, value):
    x, sigmas, main = setup()
    model = Inpaint(CFGGuider(STRONG, UNCOND, 5.5))
    with pytest.raises(ValueError, match=f'^W2SD: {name} must be a finite number'):
        core.sample('euler', model, x, sigmas, main, disable=True, **{'strong_cfg': 5.5, 'weak_cfg': 0., name: value})
    assert model.calls == []


def test_roles_are_routed_through_model_with_the_same_extra_args_keys():
    x, sigmas, main = setup()
    model = Inpaint(RoleGuider(main=STRONG, strong=STRONG, weak=WEAK))
    keys_before = {k: v for k, v in main.items()}
    out = core.sample('euler', model, x, sigmas, main, disable=True, lam=3)
    ref = sample_w2sd_euler(STRONG, x, sigmas, weak=WEAK, lam=3, disable=True)
    assert torch.equal(out, ref)
    assert main == keys_before and core.ROLE_KEY not in main['model_options']
    assert model.calls == ['strong', 'weak', 'main'] * 3 + ['main'] * 2


def test_multistep_sampler_and_options_pass_through():
    x, sigmas, main = setup()
    model = Inpaint(RoleGuider(main=STRONG, strong=STRONG, weak=WEAK))
    opts = core.w2sd_options(-1, 0.7, 'next', 'paper', 2)
    out = core.sampler_function('dpmpp_2m')(model, x, sigmas, extra_args=main, disable=True, **opts)
    ref = sample_w2sd_dpmpp_2m(STRONG, x, sigmas, weak=WEAK, disable=True, strength=0.7, weak_sigma='next',
                               reflections=2)
    assert torch.equal(out, ref)


def test_cfg_override_with_a_plain_cfg_guider():
    x, sigmas, main = setup()
    model = Inpaint(CFGGuider(STRONG, UNCOND, 5.5))
    out = core.sample('euler', model, x, sigmas, main, disable=True, strong_cfg=1.0, weak_cfg=0.0)
    ref = sample_w2sd_euler(cfg(5.5), x, sigmas, strong=cfg(1.0), weak=cfg(0.0), disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # strong_cfg=None: the strong leg is the main call
    out = core.sample('euler', model, x, sigmas, main, disable=True, weak_cfg=-2.0)
    ref = sample_w2sd_euler(cfg(5.5), x, sigmas, weak=cfg(-2.0), disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_role_model_options_copy_and_leave_the_callers_alone():
    post = [lambda args: args['denoised']]
    options = {'sampler_post_cfg_function': post, 'transformer_options': {'a': 1}}
    tagged = core.role_model_options(options, 'weak', 2.0)
    assert options == {'sampler_post_cfg_function': post, 'transformer_options': {'a': 1}} and len(post) == 1
    assert tagged[core.ROLE_KEY] == 'weak' and tagged['disable_cfg1_optimization'] is True
    assert len(tagged['sampler_post_cfg_function']) == 2
    c, u = torch.tensor([3.]), torch.tensor([1.])
    assert tagged['sampler_post_cfg_function'][-1]({'cond_denoised': c, 'uncond_denoised': u}).item() == 5.
    assert 'sampler_post_cfg_function' not in core.role_model_options({}, 'strong')
    with pytest.raises(ValueError, match='role'):
        core.role_model_options({}, 'medium')
    with pytest.raises(ValueError, match='unconditional'):
        core.cfg_override(2.0)({'cond_denoised': c, 'uncond_denoised': None})
    # CFG 1 is the conditional prediction itself: no negative needed, and the CFG-1 shortcut may stay on
    assert core.cfg_override(1.0)({'cond_denoised': c, 'uncond_denoised': None, 'uncond': None}) is c
    assert 'disable_cfg1_optimization' not in core.role_model_options({}, 'weak', 1.0)


def test_errors_name_the_fix():
    x, sigmas, main = setup()
    plain = Inpaint(CFGGuider(STRONG, UNCOND, 5.5))
    with pytest.raises(ValueError, match='W2SD Guider'):
        core.sample('euler', plain, x, sigmas, main)
    with pytest.raises(ValueError, match='cfg_source = guider needs a W2SD Guider'):
        core.sample('euler', plain, x, sigmas, main, cfg_source='guider', weak_cfg=0.)
    with pytest.raises(ValueError, match='cfg_source must be one of'):
        core.sample('euler', plain, x, sigmas, main, cfg_source='both', weak_cfg=0.)
    with pytest.raises(ValueError, match='sampler_name must be one of'):
        core.sampler_function('euler_a')
    assert core.sample('euler', plain, x, sigmas[:1], main, weak_cfg=0.) is x  # as ComfyUI's samplers do


@pytest.mark.parametrize('name', ['res_multistep_cfg_pp', 'uni_pc', 'dpm_adaptive', 'dpm_fast', 'dpmpp_2m_cfg_pp'])
def test_samplers_without_a_w2sd_form_are_refused_with_the_reason(name):
    with pytest.raises(ValueError, match=f"sampler_name '{name}' cannot run with W2SD reflections: .*(multistep|"
                                         f"schedule|step sizes)"):
        core.sampler_function(name)


def test_sampler_lists_are_consistent():
    assert not set(core.SAMPLER_NAMES) & set(core.REFUSED)
    assert set(core.SAMPLER_NAMES) == set(core.HOST_STEPS) | set(core.TWINS)
    assert all(hasattr(sampling, 'sample_w2sd_' + twin) for twin, _ in core.TWINS.values())
    assert set(core.NOT_FOR_FLOW) <= set(core.BROWNIAN) and set(core.BIT_EXACT_TWINS) <= set(core.TWINS)


def test_missing_negative_is_an_error_not_a_blow_up():
    """BasicGuider: ComfyUI hands the post-CFG function uncond=None and a zero uncond prediction."""
    x, sigmas, main = setup()
    basic = Inpaint(CFGGuider(STRONG, None, 1.0))
    with pytest.raises(ValueError, match='no negative conditioning'):
        core.sample('euler', basic, x, sigmas, main, disable=True, strong_cfg=5.5, weak_cfg=0.)


def test_legs_at_cfg_1_need_no_negative_so_the_anchored_identity_runs_under_a_basic_guider():
    x, sigmas, main = setup()
    basic = Inpaint(CFGGuider(STRONG, None, 1.0))
    out = core.sample('euler', basic, x, sigmas, main, disable=True, strong_cfg=1., weak_cfg=1., form='anchored')
    assert torch.equal(out, K_euler(x, sigmas))


def test_cfg_source_auto_uses_a_w2sd_guider_and_sampler_overrides_it():
    x, sigmas, main = setup()
    guider = RoleGuider(main=STRONG, strong=STRONG, weak=WEAK)
    ref = sample_w2sd_euler(STRONG, x, sigmas, weak=WEAK, disable=True)
    for source in ('auto', 'guider'):
        out = core.sample('euler', Inpaint(guider), x, sigmas, main, disable=True, cfg_source=source,
                          strong_cfg=5.5, weak_cfg=0.)
        assert torch.equal(out, ref)
    calls = []

    class Recorder(RoleGuider):
        def __call__(self, x, sigma, model_options={}, seed=None):
            calls.append(len(model_options.get('sampler_post_cfg_function', [])))
            return super().__call__(x, sigma, model_options, seed)

    core.sample('euler', Inpaint(Recorder(main=STRONG, strong=STRONG, weak=WEAK)), x, sigmas[:3], main,
                disable=True, cfg_source='sampler', strong_cfg=5.5, weak_cfg=0.)
    assert calls == [1, 1, 0, 0]  # strong and weak legs carry the override, the main calls do not


def test_a_leg_pair_that_coincides_is_refused_in_the_paper_form():
    x, sigmas, main = setup()
    same = RoleGuider(main=STRONG, strong=STRONG, weak=STRONG)
    same.weak_conds_are_strong, same.strong_cfg, same.weak_cfg = True, 1.0, 1.0
    with pytest.raises(ValueError, match='weak reflection leg equals the strong one'):
        core.sample('euler', Inpaint(same), x, sigmas, main, disable=True)
    with pytest.raises(ValueError, match='weak reflection leg equals the strong one'):
        core.sample('euler', Inpaint(CFGGuider(STRONG, UNCOND, 5.5)), x, sigmas, main, strong_cfg=2., weak_cfg=2.)
    # the anchored form is then exactly the identity, and strength 0 the plain sampler: both allowed
    plain = K_euler(x, sigmas)
    assert torch.equal(core.sample('euler', Inpaint(same), x, sigmas, main, disable=True, form='anchored'), plain)
    assert torch.equal(core.sample('euler', Inpaint(same), x, sigmas, main, disable=True, strength=0.), plain)
    same.weak_cfg = 0.0  # a CFG pair on the same conds is a real pair
    assert not torch.equal(core.sample('euler', Inpaint(same), x, sigmas, main, disable=True), plain)


def K_euler(x, sigmas):
    return _kdiff.sampling().sample_euler(STRONG, x, sigmas, disable=True)


def test_host_step_samplers_run_the_hosts_own_function_step_by_step(monkeypatch):
    """A CFG++-style host function writes into extra_args: the caller's dict stays as it was, and with reflection
    off the result is the host function's own, bit for bit."""
    x, sigmas, main = setup()
    K = _kdiff.sampling()
    seen_models = []

    def host_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen_models.append(model)
        extra_args['model_options'] = {**extra_args['model_options'], 'sampler_post_cfg_function': [id]}
        return K.sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)

    monkeypatch.setattr(K, 'sample_w2sd_test_host', host_euler, raising=False)
    monkeypatch.setitem(core.HOST_STEPS, 'host', 'w2sd_test_host')
    model = Inpaint(RoleGuider(main=STRONG, strong=STRONG, weak=WEAK))
    before = {k: v for k, v in main.items()}
    steps = []
    off = core.sample('host', model, x, sigmas, main, disable=True, strength=0., callback=lambda d: steps.append(d['i']))
    assert torch.equal(off, host_euler(model, x, sigmas, extra_args=dict(main), disable=True))
    assert steps == list(range(len(sigmas) - 1))
    assert main == before and 'sampler_post_cfg_function' not in main['model_options']
    assert all(m is model for m in seen_models)  # the host function gets ComfyUI's model, not a wrapper
    on = core.sample('host', model, x, sigmas, main, disable=True, lam=3)
    assert torch.equal(on, sample_w2sd_euler(STRONG, x, sigmas, weak=WEAK, lam=3, disable=True))


def test_noise_built_the_comfyui_way(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        default_noise_sampler=lambda x, seed=None: calls.append(('generator', seed)) or 'gen',
        BrownianTreeNoiseSampler=lambda x, lo, hi, seed=None, cpu=False: calls.append(
            ('tree', float(lo), float(hi), seed, cpu)) or 'tree')
    _kdiff.set_backend(fake)
    try:
        x, sigmas, _ = setup()
        def with_noise(model, x, sigmas, noise_sampler=None):
            pass

        def without_noise(model, x, sigmas):
            pass

        assert core.noise_sampler('euler_ancestral', with_noise, x, sigmas, 7) == 'gen'
        assert core.noise_sampler('dpmpp_2m_sde', with_noise, x, sigmas, 7) == 'tree'
        assert core.noise_sampler('dpmpp_sde_gpu', with_noise, x, sigmas, 8) == 'tree'
        assert core.noise_sampler('dpmpp_2m', without_noise, x, sigmas, 7) is None
    finally:
        _kdiff.set_backend(None)
    assert calls == [('generator', 7), ('tree', 0.3, 10., 7, True), ('tree', 0.3, 10., 8, False)]


def test_ve_noise_samplers_refuse_flow_models(monkeypatch):
    class CONST:
        pass
    monkeypatch.setitem(__import__('sys').modules, 'comfy.model_sampling', types.SimpleNamespace(CONST=CONST))
    x, sigmas, main = setup()
    guider = RoleGuider(main=STRONG, strong=STRONG, weak=WEAK)
    guider.inner_model = types.SimpleNamespace(model_sampling=CONST())
    with pytest.raises(ValueError, match='flow'):
        core.sample('dpmpp_2m_sde', Inpaint(guider), x, sigmas, main)
    assert torch.isfinite(core.sample('euler', Inpaint(guider), x, sigmas, main, disable=True)).all()


def test_the_checkout_root_imported_as_a_plain_module_loads_no_nodes(monkeypatch):
    """pytest imports the root ``__init__.py`` as a plain module when the checkout folder is named w2sd-samplers;
    with ComfyUI imported (the live tests) it must not try the pack's relative import."""
    monkeypatch.setitem(sys.modules, 'comfy', types.ModuleType('comfy'))
    spec = importlib.util.spec_from_file_location('__init__', pathlib.Path(__file__).parents[1] / '__init__.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, 'NODE_CLASS_MAPPINGS')


def test_lms_denoises_at_its_step_into_sigma_0_as_comfyuis_lms_does():
    """ComfyUI's sample_lms returns the denoised estimate when sigmas[i + 1] == 0 (k-diffusion's takes an LMS step
    there): off is then ComfyUI's lms, and the reflected steps are those of the full schedule."""
    x, sigmas, main = setup()
    model = Inpaint(RoleGuider(main=STRONG, strong=STRONG, weak=WEAK))
    off = core.sample('lms', model, x, sigmas, main, disable=True, strength=0.)
    K = _kdiff.sampling()
    before_last = K.sample_lms(STRONG, x, sigmas[:-1], disable=True)
    assert torch.equal(off, STRONG(before_last, sigmas[-2] * before_last.new_ones([len(x)])))
    steps = []
    model.calls.clear()
    on = core.sample('lms', model, x, sigmas, main, callback=lambda d: steps.append(d['i']), disable=True, lam=3)
    assert steps == [0, 1, 2, 3, 4] and model.calls == ['strong', 'weak', 'main'] * 3 + ['main'] * 2
    ref = sampling.sample_w2sd_lms(STRONG, x, sigmas[:-1], weak=WEAK, lam=3, disable=True)
    assert torch.equal(on, STRONG(ref, sigmas[-2] * ref.new_ones([len(x)])))
    # a schedule that does not end at 0 (SplitSigmas) is the twin's own
    assert torch.equal(core.sample('lms', model, x, sigmas[:-1], main, disable=True),
                       sampling.sample_w2sd_lms(STRONG, x, sigmas[:-1], weak=WEAK, disable=True))
