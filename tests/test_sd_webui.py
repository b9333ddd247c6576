"""The A1111 / Forge extension's host-independent parts, driven the way the hosts drive them.

The stand-ins below follow the hosts' calling conventions as read from their source:
A1111 v1.10 / dev (``modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample``,
``modules/sd_samplers_common.py: Sampler.initialize, TorchHijack``, ``modules/sd_samplers_cfg_denoiser.py:
CFGDenoiser.forward``, ``modules/sd_samplers.py``; read at AUTOMATIC1111/stable-diffusion-webui 72632242 and the
full-history mirror kklouzal/stable-diffusion-webui 7eed414) and Forge lllyasviel/stable-diffusion-webui-forge
dfdcbab (``CFGDenoiser.forward`` replaces ``cond_scale`` by ``p.hr_cfg`` in the hires pass; ``sd_samplers.add_sampler``;
``sampling_function`` reads ``inner_model.inner_model.forge_objects.unet``).
"""
import functools
import inspect
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'wrappers', 'sd_webui'))

import k_diffusion.sampling as K  # noqa: E402

from w2sd_samplers import sampling  # noqa: E402
from w2sd_sdwebui import options as opts, passes, registry, roles  # noqa: E402


class InterruptedException(BaseException):
    """A1111 interrupts sampling with a BaseException raised from the denoiser."""


def exact(x, sigma, mean):
    # The exact denoiser of data N(mean, I): x0 estimate (x + sigma^2 mean) / (1 + sigma^2).
    s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
    return (x + s2 * mean) / (1 + s2)


class HostCFGDenoiser(torch.nn.Module):
    """Stand-in for the webui's CFGDenoiser: the same forward signature, step counter, prompt-editing lookup,
    refiner-style reads of the live extra args and, with ``forge=True``, Forge's hires ``cond_scale`` override.

    ``cond`` is a list of ``(end_at_step, mean)`` pairs, as prompt editing schedules them; ``uncond`` a mean.
    The UNet's output is scaled by ``1 + sum of the loaded LoRAs' unet multipliers`` and shifted by
    ``forge_objects.unet`` so tests can see which weights ran.
    """

    def __init__(self, p, forge=False, networks=()):
        super().__init__()
        self.step, self.p, self.forge, self.networks = 0, p, forge, networks
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(
            forge_objects=types.SimpleNamespace(unet=0.0)))
        self.calls, self.interrupt_at = [], None

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise InterruptedException
        if self.forge and self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        mean_c = next(m for end, m in cond if self.step < end)
        unet = self.inner_model.inner_model.forge_objects.unet
        self.calls.append({'step': self.step, 'mean': float(mean_c), 'cond_scale': cond_scale, 'cond': cond,
                           'uncond': uncond,
                           'unet': unet, 'lora': [n.unet_multiplier for n in self.networks]})
        scale = 1 + sum(n.unet_multiplier for n in self.networks)
        # Forge skips the uncond when it is None (CFG 1): only cond_scale 1 gives the CFG result then.
        d_c, d_u = (exact(x, sigma, m) * scale + unet for m in (mean_c, mean_c if uncond is None else uncond))
        self.step += 1
        return d_u + cond_scale * (d_c - d_u)


def host_sample(fn, model, x, sigmas, extra_args, options=None, p=None, w2sd=None):
    """``KDiffusionSampler.sample`` / ``initialize``: kwargs chosen by signature, sigmas by keyword on the CPU."""
    parameters = inspect.signature(fn).parameters
    kwargs = dict(w2sd or {})
    for name in ('s_churn', 's_tmin', 's_tmax', 's_noise'):
        if name in parameters and p is not None and hasattr(p, name):
            kwargs[name] = getattr(p, name)
    if 'eta' in parameters:
        kwargs['eta'] = 1.0
    if 'sigmas' in parameters:
        kwargs['sigmas'] = sigmas.cpu()
    if 'n' in parameters:  # DPM fast: the step count and the model's sigma range
        kwargs.update(n=len(sigmas) - 1, sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]))
    options = options or {}
    if options.get('brownian_noise'):
        seeds = list(range(x.shape[0]))  # the host seeds one tree per image
        kwargs['noise_sampler'] = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    if options.get('solver_type') == 'heun':
        kwargs['solver_type'] = 'heun'
    steps = []
    out = fn(model, x, extra_args=extra_args, disable=True, callback=lambda d: steps.append(d['i']), **kwargs)
    return out, steps


def make_p(**kw):
    return types.SimpleNamespace(is_hr_pass=False, **kw)


def conds():
    # Prompt editing: the cond switches at step 3.
    return {'cond': [(3, torch.tensor(2.0)), (10 ** 6, torch.tensor(-1.0))], 'uncond': torch.tensor(0.5),
            'cond_scale': 5.5, 's_min_uncond': 0.0, 'image_cond': torch.zeros(2, 1)}


X = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
SIGMAS = K.get_sigmas_karras(8, 0.1, 10.)


def run(kind='cfg', forge=False, networks=(), p=None, fn=sampling.sample_w2sd_euler, weak_conds=None,
        weak_unet=None, interrupt_at=None, **options):
    p = make_p() if p is None else p
    model = HostCFGDenoiser(p, forge=forge, networks=networks)
    model.interrupt_at = interrupt_at
    extra_args = conds()
    o = opts.parse({'enabled': True, 'weak': kind, **options})
    w2sd = roles.sampler_kwargs(model, o, weak_conds=weak_conds, networks=networks, weak_unet=weak_unet)
    out, steps = host_sample(fn, model, X * SIGMAS[0], SIGMAS, extra_args, w2sd=w2sd)
    return out, steps, model, extra_args


# --- the step counter and the host's calls ------------------------------------------------------------------

def test_only_main_calls_advance_the_step_counter():
    out, steps, model, _ = run()
    n = len(SIGMAS) - 1
    assert steps == list(range(n))  # callback once per outer step
    assert model.step == n  # as many as the plain sampler
    # Each reflected step makes two calls at the step counter of the main call that follows them.
    seen = [c['step'] for c in model.calls]
    assert seen == [s for i in range(n) for s in ([i, i, i] if i < n - 1 else [i])]


def test_prompt_editing_switches_at_the_same_outer_step():
    _, _, model, _ = run()
    plain = HostCFGDenoiser(make_p())
    host_sample(K.sample_euler, plain, X * SIGMAS[0], SIGMAS, conds())
    # Main calls close each outer step's group of calls; they see the plain sampler's prompt schedule, and each
    # reflection sees the cond of the step it belongs to.
    groups, i = [], 0
    for n in [3] * (len(SIGMAS) - 2) + [1]:
        groups.append(model.calls[i:i + n])
        i += n
    assert [g[-1]['mean'] for g in groups] == [c['mean'] for c in plain.calls] == [2., 2., 2.] + [-1.] * 5
    assert all(len({c['mean'] for c in g}) == 1 for g in groups)


def test_disabled_equals_the_k_diffusion_sampler_bit_for_bit():
    p = make_p()
    model = HostCFGDenoiser(p)
    w2sd = roles.sampler_kwargs(model, opts.parse({}), networks=None)
    out, steps = host_sample(sampling.sample_w2sd_euler, model, X * SIGMAS[0], SIGMAS, conds(), w2sd=w2sd)
    ref_model = HostCFGDenoiser(p)
    ref, ref_steps = host_sample(K.sample_euler, ref_model, X * SIGMAS[0], SIGMAS, conds())
    assert torch.equal(out, ref) and steps == ref_steps and model.step == ref_model.step


def test_extra_args_untouched_and_only_host_keys_passed():
    out, _, model, extra_args = run()
    fresh = conds()
    assert set(extra_args) == set(fresh)
    assert extra_args['cond_scale'] == 5.5 and extra_args['cond'] is not None
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(extra_args['cond'], fresh['cond']))


def test_cfg_pair_matches_the_library_on_plain_denoisers():
    out, _, model, _ = run(weak_cfg=1.0)
    assert {c['cond_scale'] for c in model.calls} == {5.5, 1.0}

    # The same sampler on plain closures, with no host in between, and the step-dependent cond given explicitly.
    step = [0]

    def cfg(scale):
        def d(x, sigma):
            mean_c = torch.tensor(2.0) if step[0] < 3 else torch.tensor(-1.0)
            return exact(x, sigma, 0.5) + scale * (exact(x, sigma, mean_c) - exact(x, sigma, 0.5))
        return d

    def main(x, sigma):
        out = cfg(5.5)(x, sigma)
        step[0] += 1
        return out

    ref = sampling.sample_w2sd_euler(main, X * SIGMAS[0], SIGMAS, disable=True, weak=cfg(1.0), strong=cfg(5.5))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_prompt_pair_uses_weak_conds_at_reflection_cfg():
    weak_c = [(10 ** 6, torch.tensor(0.0))]
    out, _, model, extra_args = run('prompt', weak_prompt='a cat', weak_conds=(weak_c, None), reflection_cfg=1.0)
    weak_calls = [c for c in model.calls if c['cond'] is weak_c]
    assert len(weak_calls) == len(SIGMAS) - 2
    assert {c['cond_scale'] for c in weak_calls} == {1.0}
    assert all(c['uncond'] is extra_args['uncond'] for c in weak_calls)  # empty weak negative: the main one
    strong_calls = [c for c in model.calls if c['cond'] is extra_args['cond'] and c['cond_scale'] == 1.0]
    assert len(strong_calls) == len(SIGMAS) - 2
    weak_uc = torch.tensor(-3.0)
    _, _, model, _ = run('prompt', weak_prompt='a cat', weak_negative_prompt='blur', weak_conds=(weak_c, weak_uc))
    assert all(c['uncond'] is weak_uc for c in model.calls if c['cond'] is weak_c)


def test_prompt_pair_without_conds_is_an_error():
    with pytest.raises(ValueError, match='weak conditioning'):
        run('prompt', weak_prompt='a cat')


class Net:
    def __init__(self, name, m):
        self.name, self.unet_multiplier = name, m


def test_lora_multiplier_toggled_for_the_weak_call_only():
    nets = [Net('style', 0.8), Net('other', 1.0)]
    run('lora', networks=nets, lora_names='style', weak_lora=-1.5)
    assert [n.unet_multiplier for n in nets] == [0.8, 1.0]
    _, _, model, _ = run('lora', networks=nets, lora_names='style', weak_lora=-1.5)
    loras = [tuple(c['lora']) for c in model.calls]
    n = len(SIGMAS) - 1
    assert loras == [x for i in range(n) for x in ([(0.8, 1.0), (-1.5, 1.0), (0.8, 1.0)] if i < n - 1
                                                     else [(0.8, 1.0)])]


def test_lora_names_match_the_prompts_alias():
    alias = Net('xlMoreArtFullV1', 0.8)
    alias.mentioned_name = 'moreart'
    nets = [alias, Net('other', 1.0)]
    _, _, model, _ = run('lora', networks=nets, lora_names='moreart', weak_lora=-1.5)
    assert tuple(model.calls[1]['lora']) == (-1.5, 1.0) and [n.unet_multiplier for n in nets] == [0.8, 1.0]


def test_lora_pair_without_a_matching_lora_is_an_error():
    with pytest.raises(ValueError, match='<lora:name:weight>'):
        run('lora', networks=[Net('style', 0.8)], lora_names='missing')
    with pytest.raises(ValueError, match='loaded: none'):
        run('lora', networks=[])


def test_forge_hires_cfg_is_swapped_for_reflection_calls_and_restored():
    p = make_p(hr_cfg=4.0)
    p.is_hr_pass = True
    _, _, model, _ = run(forge=True, p=p, weak_cfg=1.5)
    assert [c['cond_scale'] for c in model.calls[:3]] == [4.0, 1.5, 4.0]
    assert p.hr_cfg == 4.0
    # First pass: cond_scale comes from extra_args, hr_cfg is not touched.
    p.is_hr_pass = False
    _, _, model, _ = run(forge=True, p=p, weak_cfg=1.5)
    assert [c['cond_scale'] for c in model.calls[:3]] == [5.5, 1.5, 5.5]


def test_forge_without_uncond_only_allows_cfg_one():
    p = make_p()
    model = HostCFGDenoiser(p, forge=True)
    extra_args = {**conds(), 'uncond': None, 'cond_scale': 1.0}  # Forge skips the negative prompt at CFG 1
    w2sd = roles.sampler_kwargs(model, opts.parse({'enabled': True, 'weak_cfg': 0.0}))
    # the message names the panel's control for the kind of weak model
    with pytest.raises(ValueError, match="needs the negative prompt.*set the W2SD panel's Weak CFG to 1"):
        host_sample(sampling.sample_w2sd_euler, model, X, SIGMAS, extra_args, w2sd=w2sd)
    w2sd = roles.sampler_kwargs(model, opts.parse({'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a cat',
                                                   'reflection_cfg': 2.0}),
                                weak_conds=([(10 ** 6, torch.tensor(0.0))], None))
    with pytest.raises(ValueError, match="CFG 2 needs the negative prompt.*panel's Reflection CFG to 1"):
        host_sample(sampling.sample_w2sd_euler, model, X, SIGMAS, extra_args, w2sd=w2sd)
    assert extra_args['uncond'] is None and model.step == 0
    w2sd = roles.sampler_kwargs(model, opts.parse({'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a cat'}),
                                weak_conds=([(10 ** 6, torch.tensor(0.0))], None))
    out, _ = host_sample(sampling.sample_w2sd_euler, model, X, SIGMAS, extra_args, w2sd=w2sd)  # both legs at CFG 1
    assert torch.isfinite(out).all()


def test_forge_checkpoint_pair_swaps_the_unet_for_the_weak_call():
    out, _, model, _ = run('checkpoint', forge=True, weak_checkpoint='weak.safetensors', weak_unet=0.25)
    assert [c['unet'] for c in model.calls[:3]] == [0.0, 0.25, 0.0]  # strong leg, weak leg, main step
    assert model.inner_model.inner_model.forge_objects.unet == 0.0


@pytest.mark.parametrize('at', [3, 4])  # the strong and the weak leg of the second reflection
def test_interrupt_in_a_reflection_call_restores_host_state(at):
    nets = [Net('style', 0.8)]
    p = make_p(hr_cfg=4.0)
    p.is_hr_pass = True
    with pytest.raises(InterruptedException):
        run('lora', networks=nets, p=p, forge=True, interrupt_at=at, weak_lora=-2.0)
    assert nets[0].unet_multiplier == 0.8 and p.hr_cfg == 4.0
    model = HostCFGDenoiser(make_p(), networks=nets)
    model.interrupt_at = at
    w2sd = roles.sampler_kwargs(model, opts.parse({'enabled': True}))
    with pytest.raises(InterruptedException):
        host_sample(sampling.sample_w2sd_euler, model, X, SIGMAS, conds(), w2sd=w2sd)
    assert model.step == 1  # one main call happened; the reflection calls around it did not count


# --- noise through the host's hijacked k-diffusion ---------------------------------------------------------

class TorchHijack:
    """A1111's TorchHijack: ``randn_like`` returns the processing object's seeded noise, in order."""

    def __init__(self, seed):
        self.generator, self.drawn = torch.Generator().manual_seed(seed), 0

    def __getattr__(self, item):
        return getattr(torch, item)

    def randn_like(self, x):
        self.drawn += 1
        return torch.randn(x.shape, generator=self.generator)


def test_ancestral_noise_comes_from_the_hosts_seeded_rng(monkeypatch):
    outs = []
    for seed in (1, 1, 2):
        hijack = TorchHijack(seed)
        monkeypatch.setattr(K, 'torch', hijack)
        out, _, _, _ = run(fn=sampling.sample_w2sd_euler_ancestral)
        outs.append(out)
        assert hijack.drawn == len(SIGMAS) - 2  # one draw per step into sigma > 0, none for reflections
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# --- registration and the kwargs the host injects ----------------------------------------------------------

# A few rows in the shape of the host's ``samplers_k_diffusion`` table: (label, function name or callable,
# aliases, options).
HOST_TABLE = [
    ('DPM++ 2M', 'sample_dpmpp_2m', ['k_dpmpp_2m'], {'scheduler': 'karras'}),
    ('DPM++ 2M SDE Heun', 'sample_dpmpp_2m_sde', ['k_dpmpp_2m_sde_heun'],
     {'scheduler': 'exponential', 'brownian_noise': True, 'solver_type': 'heun'}),
    ('Euler a', 'sample_euler_ancestral', ['k_euler_a'], {'uses_ensd': True}),
    ('Heun', 'sample_heun', ['k_heun'], {'second_order': True}),
    ('DPM fast', 'sample_dpm_fast', ['k_dpm_fast'], {}),
    ('Restart', lambda *a, **k: None, ['restart'], {'second_order': True}),
    ('IPNDM', 'sample_ipndm', ['ipndm'], {}),
]


def test_sampler_table_mirrors_the_hosts_rows_that_have_a_twin():
    rows = registry.sampler_table(HOST_TABLE)
    assert [r[0] for r in rows] == ['W2SD DPM++ 2M', 'W2SD DPM++ 2M SDE Heun', 'W2SD Euler a', 'W2SD Heun',
                                    'W2SD DPM fast', 'W2SD IPNDM']  # not the unnamed callable
    assert rows[1] == ('W2SD DPM++ 2M SDE Heun', 'sample_dpmpp_2m_sde', ['w2sd_k_dpmpp_2m_sde_heun'],
                       HOST_TABLE[1][3])
    assert rows[1][3] is not HOST_TABLE[1][3]
    assert all(registry.is_w2sd(r[0]) for r in rows) and not registry.is_w2sd('Euler a')


SamplerData = functools.partial(types.SimpleNamespace)


def a1111_registry():
    """``modules/sd_samplers.py`` of A1111: list, name map, ``set_samplers`` and a cached lookup."""
    m = types.SimpleNamespace(all_samplers=[SamplerData(name='Euler', aliases=['k_euler'])], samplers_map={})
    m.all_samplers_map = {d.name: d for d in m.all_samplers}

    def set_samplers():
        m.samplers = m.all_samplers
        m.samplers_map.clear()
        for d in m.all_samplers:
            m.samplers_map[d.name.lower()] = d.name
            for a in d.aliases:
                m.samplers_map[a.lower()] = d.name

    @functools.cache
    def get_sampler_and_scheduler(name):
        return m.all_samplers_map.get(name, m.all_samplers[0]).name

    m.set_samplers, m.get_sampler_and_scheduler = set_samplers, get_sampler_and_scheduler
    set_samplers()
    return m


def test_register_a1111():
    m = a1111_registry()
    assert m.get_sampler_and_scheduler('W2SD Euler') == 'Euler'  # cached before registration
    entries = [SamplerData(name=r[0], aliases=r[2]) for r in registry.sampler_table(
        [('Euler', 'sample_euler', ['k_euler'], {})])]
    registry.register(m, entries)
    registry.register(m, [SamplerData(name='W2SD Euler', aliases=['w2sd_k_euler'])])  # UI reload: no duplicate
    assert [d.name for d in m.all_samplers] == ['Euler', 'W2SD Euler']
    assert m.samplers_map['w2sd euler'] == m.samplers_map['w2sd_k_euler'] == 'W2SD Euler'
    assert m.get_sampler_and_scheduler('W2SD Euler') == 'W2SD Euler'


def test_register_forge_uses_add_sampler():
    added = []
    m = types.SimpleNamespace(add_sampler=added.append)
    entries = [SamplerData(name='W2SD Euler'), SamplerData(name='W2SD Heun')]
    registry.register(m, entries)
    assert added == entries


@pytest.mark.parametrize('label', ['W2SD DPM++ 2M', 'W2SD DPM++ 2M SDE Heun', 'W2SD Euler a', 'W2SD Heun',
                                   'W2SD DPM fast'])
def test_host_injected_kwargs_are_accepted(label):
    host_row = next(r for r in HOST_TABLE if 'W2SD ' + r[0] == label)
    _, name, _, options = next(r for r in registry.sampler_table(HOST_TABLE) if r[0] == label)
    p = make_p(s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.)
    model = HostCFGDenoiser(p)
    w2sd = roles.sampler_kwargs(model, opts.parse({'enabled': True}))
    out, steps = host_sample(registry.twin(name), model, X * SIGMAS[0], SIGMAS, conds(), options, p, w2sd)
    twin = HostCFGDenoiser(p)
    _, twin_steps = host_sample(getattr(K, host_row[1]), twin, X * SIGMAS[0], SIGMAS, conds(), options, p)
    assert torch.isfinite(out).all()
    # Same progress and the same step count (Heun's second call included) as the twin under the same host.
    assert steps == twin_steps and model.step == twin.step and len(model.calls) > twin.step


# --- options, infotext, passes -------------------------------------------------------------------------------

def test_parse_positional_and_api_dict():
    assert opts.parse({}) == opts.DEFAULTS == opts.parse(*[getattr(opts.DEFAULTS, n) for n in opts.ARGS])
    o = opts.parse(True, 'prompt', 0.0, 'a red cube', '', -1.5, '', '', 1.0, 10.0, 0.5, 'next')
    assert o.enabled and o.weak == 'prompt' and o.lam == 10 and isinstance(o.lam, int) and o.weak_sigma == 'next'
    api = {'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a red cube', 'lam': 10, 'strength': 0.5,
           'weak_sigma': 'next'}
    assert opts.parse(api) == o
    # The API puts the dict in the first slot and the UI's defaults in the others.
    defaults = [getattr(opts.DEFAULTS, n) for n in opts.ARGS]
    assert opts.parse(api, *defaults[1:]) == o


@pytest.mark.parametrize('bad, match', [
    ({'weak': 'unet'}, 'weak must be one of'),
    ({'weak_cfg': float('nan')}, r'weak_cfg \(Weak CFG\) must be a finite number in \[-5, 30\], got nan'),
    # the sliders' ranges hold over the API too
    ({'strength': 11.0}, r'strength \(Reflection strength\) must be a finite number in \[-10, 10\]'),
    ({'strength': float('inf')}, r'strength .* in \[-10, 10\]'),
    ({'weak_lora': -4.5}, r'weak_lora .* in \[-4, 4\]'),
    ({'reflection_cfg': -1}, r'reflection_cfg .* in \[0, 30\]'),
    ({'weak_cfg': '5'}, 'weak_cfg .* finite number'),
    ({'lam': 2.5}, 'lam'),
    ({'lam': -2}, 'lam'),
    # API clients send strings and numbers where the UI sends booleans; "false" must not switch W2SD on.
    ({'enabled': 'false'}, r'enabled \(the Enable checkbox\) must be true or false'),
    ({'enabled': 1}, 'enabled'),
    ({'lam': float('inf')}, 'lam .* must be a whole number'),
    ({'lam': float('nan')}, 'lam .* must be a whole number'),
    ({'lam': '10'}, 'lam .* must be a whole number'),
    ({'weak': ['cfg']}, 'weak must be one of'),
    ({'weak_sigma': 'prev'}, 'weak_sigma'),
    ({'enabled': True, 'weak': 'prompt'}, 'needs a weak prompt'),
    ({'enabled': True, 'weak': 'checkpoint'}, 'needs a weak checkpoint'),
    ({'lamda': 3}, 'unknown settings'),
])
def test_parse_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match='^W2SD: .*' + match):
        opts.parse(bad)


def test_enabled_string_false_is_rejected_positionally_too():
    values = [getattr(opts.DEFAULTS, n) for n in opts.ARGS]
    values[0] = 'false'
    with pytest.raises(ValueError, match='enabled'):
        opts.parse(*values)


@pytest.mark.parametrize('count', [0, 1, len(opts.ARGS) - 1, len(opts.ARGS) + 1])
def test_parse_rejects_a_wrong_number_of_script_args(count):
    values = [getattr(opts.DEFAULTS, n) for n in opts.ARGS] * 2
    with pytest.raises(ValueError, match=f'passed {count} values for the W2SD panel.s {len(opts.ARGS)} settings'):
        opts.parse(*values[:count])
    with pytest.raises(ValueError, match='send one dict or all'):
        opts.parse({'enabled': True}, False)


@pytest.mark.parametrize('key, raw', [('W2SD lambda', '2.7'), ('W2SD lambda', 'inf'), ('W2SD weak CFG', 'nan'),
                                      ('W2SD strength', 'inf')])
def test_pasted_infotext_numbers_are_not_truncated_or_non_finite(key, raw):
    with pytest.raises(ValueError, match=f'infotext {key}: {raw!r} is not a'):
        opts.from_infotext({'W2SD': 'cfg', key: raw})
    assert opts.from_infotext({'W2SD': 'cfg', 'W2SD lambda': '27.0'})['lam'] == 27


@pytest.mark.parametrize('settings', [
    {'enabled': True, 'weak': 'cfg', 'weak_cfg': 1.0},
    {'enabled': True, 'weak': 'prompt', 'weak_prompt': 'a cat, "oil painting"', 'weak_negative_prompt': 'blur',
     'reflection_cfg': 2.0, 'lam': 20, 'strength': 0.75, 'weak_sigma': 'next'},
    {'enabled': True, 'weak': 'lora', 'weak_lora': -2.0, 'lora_names': 'a, b'},
    {'enabled': True, 'weak': 'checkpoint', 'weak_checkpoint': 'sd15.safetensors [abc]'},
])
def test_infotext_round_trip(settings):
    o = opts.parse(settings)
    params = opts.infotext(o)
    assert opts.parse(opts.from_infotext(params)) == o
    # Pasted infotext arrives as strings.
    assert opts.parse(opts.from_infotext({k: str(v) for k, v in params.items()})) == o


@pytest.mark.parametrize('params, reason', [
    ({'W2SD': 'cfg', 'W2SD lambda': '2.7'}, "infotext W2SD lambda: '2.7' is not a whole number"),
    ({'W2SD': 'cfg', 'W2SD strength': '50'}, r'strength \(Reflection strength\) must be a finite number in'),
    ({'W2SD': 'unet'}, 'weak must be one of'),
    ({'W2SD': 'checkpoint', 'W2SD weak checkpoint': 'b.safetensors'}, "'checkpoint' is not a weak model A1111"),
])
def test_a_pasted_infotext_the_panel_cannot_run_switches_w2sd_off_and_says_why(params, reason):
    values, message = opts.pasted(params)
    assert values == {n: getattr(opts.DEFAULTS, n) for n in opts.ARGS} and not values['enabled']
    assert message.startswith('W2SD: the pasted infotext was not applied') and 'W2SD is off' in message
    assert re.search(reason, message), message


def test_a_pasted_infotext_fills_the_panel_on_the_host_that_offers_its_weak_model():
    lora = {'W2SD': 'lora', 'W2SD weak LoRA': '-2.0', 'W2SD lambda': '12'}
    values, message = opts.pasted(lora)
    assert message == '' and values['enabled'] and values['weak_lora'] == -2.0 and values['lam'] == 12
    assert 'is not a weak model Forge offers' in opts.pasted(lora, 'Forge')[1]
    assert opts.pasted({'W2SD': 'checkpoint', 'W2SD weak checkpoint': 'b.safetensors'}, 'Forge')[1] == ''
    assert opts.pasted({'Steps': '20'}) == ({n: getattr(opts.DEFAULTS, n) for n in opts.ARGS}, '')


def test_infotext_only_for_enabled_runs_and_relevant_keys():
    assert opts.infotext(opts.parse({'weak': 'prompt'})) == {}
    params = opts.infotext(opts.parse({'enabled': True, 'weak_cfg': 1.0}))
    assert params == {'W2SD': 'cfg', 'W2SD weak CFG': 1.0, 'W2SD lambda': -1, 'W2SD strength': 1.0,
                      'W2SD weak sigma': 'current'}
    assert opts.from_infotext({'Steps': '20'}) == {n: getattr(opts.DEFAULTS, n) for n in opts.ARGS}
    with pytest.raises(ValueError, match='W2SD weak CFG'):
        opts.from_infotext({'W2SD': 'cfg', 'W2SD weak CFG': 'high'})


def test_cond_request_first_pass_and_hires():
    total = (lambda steps: 2 * steps)
    p = types.SimpleNamespace(is_hr_pass=False, width=512, height=768, steps=20, extra_network_data={'lora': 1},
                              sampler_name='W2SD Heun', hr_sampler_name='Use same sampler')
    assert passes.cond_request(p, total) == ({'width': 512, 'height': 768}, 40, None, {'lora': 1})
    assert passes.sampler_name(p) == 'W2SD Heun'
    p.is_hr_pass, p.hr_upscale_to_x, p.hr_upscale_to_y, p.firstpass_steps = True, 1024, 1536, 40
    p.hr_second_pass_steps, p.hr_extra_network_data, p.hr_sampler_name = 0, {'lora': 2}, 'W2SD Euler'
    assert passes.cond_request(p, total) == ({'width': 1024, 'height': 1536}, 40, 40, {'lora': 2})
    assert passes.sampler_name(p) == 'W2SD Euler'
    p.hr_second_pass_steps, p.hr_distilled_cfg = 10, 3.5  # Forge
    assert passes.cond_request(p, total) == ({'width': 1024, 'height': 1536, 'distilled_cfg_scale': 3.5}, 40, 20,
                                             {'lora': 2})


# --- install.py and the library's source --------------------------------------------------------------------

def run_install(monkeypatch, environ, installed=False, extension=None):
    pips = []
    monkeypatch.setitem(sys.modules, 'launch', types.SimpleNamespace(is_installed=None, run_pip=None))
    path = os.path.join(os.path.dirname(__file__), '..', 'wrappers', 'sd_webui', 'install.py')
    namespace = {'__file__': path, '__name__': 'w2sd_install'}
    with open(path) as f:
        source = f.read().rsplit('\ninstall(', 1)[0]  # the module without its last line, the call
    exec(compile(source, path, 'exec'), namespace)
    namespace['install'](extension or namespace['HERE'], environ, lambda cmd, desc: pips.append(cmd),
                         lambda name: installed)
    return pips


def test_install_needs_no_pip_for_a_checkout_so_it_works_offline(monkeypatch, tmp_path, capsys):
    assert run_install(monkeypatch, {}) == []  # the extension inside this checkout
    link = tmp_path / 'w2sd'
    link.symlink_to(os.path.join(REPO, 'wrappers', 'sd_webui'))
    assert run_install(monkeypatch, {}, extension=str(link)) == []
    copied = tmp_path / 'extensions' / 'w2sd'
    copied.mkdir(parents=True)
    assert run_install(monkeypatch, {'W2SD_SAMPLERS_SPEC': REPO}, extension=str(copied)) == []
    # a wheel (or another pip spec): installed once, without dependencies
    wheel = {'W2SD_SAMPLERS_SPEC': '/wheels/w2sd_samplers-0.1.0-py3-none-any.whl'}
    assert run_install(monkeypatch, wheel, extension=str(copied)) == [
        'install --no-deps "/wheels/w2sd_samplers-0.1.0-py3-none-any.whl"']
    assert run_install(monkeypatch, wheel, installed=True, extension=str(copied)) == []
    # neither: say what to do (w2sd-samplers is on no package index)
    assert run_install(monkeypatch, {}, extension=str(copied)) == []
    assert 'W2SD_SAMPLERS_SPEC' in capsys.readouterr().out


REPO = os.path.realpath(os.path.join(os.path.dirname(__file__), '..'))
IMPORT = """
import sys
sys.path.insert(0, {ext!r})
from w2sd_sdwebui import library
library.load({ext!r}, {environ!r})
import w2sd_samplers.sampling
print(w2sd_samplers.__file__)
print(sorted(m for m in ('tests', 'benchmarks', 'wrappers') if __import__('importlib').util.find_spec(m)))
"""


def test_the_script_imports_the_library_from_the_checkout_without_installing_it(tmp_path):
    link = tmp_path / 'extensions' / 'w2sd'
    link.parent.mkdir()
    link.symlink_to(os.path.join(REPO, 'wrappers', 'sd_webui'))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    # -I: no PYTHONPATH, no current folder, no user site: only the venv, where w2sd-samplers is installed
    # editable from /work/main (another checkout); the extension's own checkout wins
    out = subprocess.run([sys.executable, '-I', '-c', IMPORT.format(ext=str(link), environ={})], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == [os.path.join(REPO, 'w2sd_samplers', '__init__.py'), '[]']
    copied = tmp_path / 'copied'
    shutil.copytree(os.path.join(REPO, 'wrappers', 'sd_webui', 'w2sd_sdwebui'), copied / 'w2sd_sdwebui')
    code = IMPORT.format(ext=str(copied), environ={}).replace('import w2sd_samplers.sampling\n', '')
    out = subprocess.run([sys.executable, '-I', '-S', '-c', code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and 'is not inside a w2sd-samplers checkout' in out.stderr
