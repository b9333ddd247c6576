"""The webui-only W2SD twins (``wrappers/sd_webui/w2sd_sdwebui/twins.py``) and the sampler lists they complete.

References are independent of the twins: k-diffusion's own samplers (DPM fast; Heun for A1111's Restart with no
restarts; LMS, the variable-step Adams-Bashforth method, for IPNDM / IPNDM_V) and the library's W2SD samplers
for the reflected runs. Equality with the hosts' own functions is checked against a real checkout in
``test_sd_webui_host.py`` (SDWEBUI_PATH).
"""
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'wrappers', 'sd_webui'))

import k_diffusion.sampling as K  # noqa: E402

from w2sd_samplers import _kdiff, sampling  # noqa: E402
from w2sd_sdwebui import registry, twins  # noqa: E402


def gmm(x, sigma):
    """Exact denoiser of data from an equal mixture of N(-2, 0.5^2) and N(2, 0.5^2) per coordinate."""
    s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
    means = torch.tensor([-2., 2.])
    var = 0.25 + s2[..., None]
    logits = -(x[..., None] - means) ** 2 / (2 * var)
    post = torch.softmax(logits, -1)
    return (post * (0.25 * x[..., None] + s2[..., None] * means) / var).sum(-1)


class Counter:
    def __init__(self, fn=gmm):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def weak(x, sigma):
    return 0.5 * gmm(x, sigma)  # a different (worse) denoiser, so reflections move x


X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
KARRAS = K.get_sigmas_karras(12, 0.03, 14.6)


def seeded(fn, *args, **kwargs):
    torch.manual_seed(7)  # the default noise samplers draw from the global generator
    return fn(*args, disable=True, **kwargs)


# --- off equals the host's sampler ----------------------------------------------------------------------------

@pytest.mark.parametrize('eta', [0., 1.])
@pytest.mark.parametrize('n', [9, 10, 11])  # the three ways DPM fast splits n model calls into orders
def test_dpm_fast_off_is_k_diffusions_bit_for_bit(n, eta):
    x = X * 14.6
    ref = seeded(K.sample_dpm_fast, gmm, x, 0.03, 14.6, n, eta=eta)
    out = seeded(sampling.sample_w2sd_dpm_fast, gmm, x, 0.03, 14.6, n, eta=eta, weak=weak, lam=0)
    assert torch.equal(out, ref)


def test_restart_without_restarts_is_heun():
    x = X * KARRAS[0]
    ref = seeded(K.sample_heun, gmm, x, KARRAS)
    assert torch.equal(seeded(twins.sample_w2sd_restart, gmm, x, KARRAS, restart_list={}, weak=weak, lam=0), ref)
    # and reflected, the library's W2SD Heun: the same reflection before the same steps
    on = seeded(twins.sample_w2sd_restart, gmm, x, KARRAS, restart_list={}, weak=weak)
    assert torch.equal(on, seeded(sampling.sample_w2sd_heun, gmm, x, KARRAS, weak=weak))
    assert not torch.equal(on, ref)


@pytest.mark.parametrize('steps, restarts, per_restart', [(20, 1, 9), (40, 2, 10)])
def test_restart_default_plan_follows_a1111(steps, restarts, per_restart):
    """A1111 (the Restart paper's recipe): 20+ steps take ``restarts`` restarts of ``per_restart`` Heun steps from
    near sigma 2 down to near 0.1, on a Karras schedule shortened by their count."""
    sigmas = K.get_sigmas_karras(steps, 0.03, 14.6)
    main, step_list = twins.restart_schedule(sigmas)
    assert len(main) - 1 == steps - restarts * per_restart
    restart = [(float(a), float(b)) for a, b, i in step_list if i is None]
    assert len(restart) == restarts * per_restart
    nearest = [float(main[int(torch.argmin(abs(main - level)))]) for level in (2, 0.1)]
    assert (restart[0][0], restart[-1][1]) == pytest.approx(nearest)
    model = Counter()
    seeded(twins.sample_w2sd_restart, model, X * sigmas[0], sigmas, weak=weak, lam=0)
    # two calls per Heun step, one for the last step into 0
    assert model.calls == 2 * len(step_list) - 1


def test_ipndm_off_is_adams_bashforth():
    """IPNDM's fixed weights are Adams-Bashforth's: on equal steps it is k-diffusion's LMS (order 4), stepping into
    sigma 0 as Forge does."""
    sigmas = torch.linspace(14., 0., 15)
    x = X * sigmas[0]
    ref = seeded(K.sample_lms, gmm, x, sigmas, order=4)
    out = seeded(sampling.sample_w2sd_ipndm, gmm, x, sigmas, denoise_to_zero=False, weak=weak, lam=0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fn', [sampling.sample_w2sd_ipndm, sampling.sample_w2sd_ipndm_v])
def test_ipndm_default_ends_with_the_denoised_estimate_as_comfyui(fn):
    """ComfyUI's IPNDM* return the last model call's denoised estimate at sigma 0; Forge's steps there. Before the
    last step the two forms are the same run."""
    x, runs = X * KARRAS[0], {}
    for denoise_to_zero in (True, False):
        seen = []
        out = seeded(fn, gmm, x, KARRAS, denoise_to_zero=denoise_to_zero, weak=weak, callback=seen.append)
        runs[denoise_to_zero] = out, seen
    (comfy, seen), (forge, seen_forge) = runs[True], runs[False]
    assert torch.equal(comfy, seen[-1]['denoised'])
    assert all(torch.equal(a['x'], b['x']) for a, b in zip(seen, seen_forge))
    assert not torch.equal(comfy, forge)


def test_ipndm_v_off_is_variable_step_adams_bashforth_at_order_2():
    """IPNDM_V's second-order weights are variable-step AB2's (its 3rd/4th-order ones are zju-pi's own: checked
    against the host in test_sd_webui_host.py)."""
    x = X * KARRAS[0]
    ref = seeded(K.sample_lms, gmm, x, KARRAS, order=2)
    out = seeded(sampling.sample_w2sd_ipndm_v, gmm, x, KARRAS, max_order=2, denoise_to_zero=False, weak=weak,
                 lam=0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fn', [sampling.sample_w2sd_ipndm, sampling.sample_w2sd_ipndm_v, sampling.sample_w2sd_heunpp2])
def test_first_order_cases_are_w2sd_euler(fn):
    """With max_order 1 (IPNDM*) or a single step (HeunPP2's last step is Euler) the loop is Euler's, so the
    reflected run is the library's W2SD Euler: the reflection sits before the same steps."""
    sigmas = KARRAS if fn is not sampling.sample_w2sd_heunpp2 else KARRAS[-2:]
    kwargs = {'max_order': 1} if fn is not sampling.sample_w2sd_heunpp2 else {}
    x = X * sigmas[0]
    for w2sd in ({'weak': weak, 'lam': 0}, {'weak': weak}, {'weak': weak, 'lam': 3, 'weak_sigma': 'next'}):
        torch.testing.assert_close(seeded(fn, gmm, x, sigmas, **kwargs, **w2sd),
                                   seeded(sampling.sample_w2sd_euler, gmm, x, sigmas, **w2sd), rtol=0, atol=1e-6)


def fake_deis_backend(monkeypatch):
    """A k-diffusion copy with a ``deis`` module (Forge's and ComfyUI's have one; PyPI's has not) whose
    coefficients are IPNDM's fixed weights times the step, so DEIS becomes IPNDM (max order 3)."""
    package = types.ModuleType('fakekd')
    sampling_module = types.ModuleType('fakekd.sampling')
    sampling_module.__dict__.update({k: v for k, v in vars(K).items() if not k.startswith('__')})

    def get_deis_coeff_list(t_steps, max_order, deis_mode='tab'):
        weights = [(1.,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12)]
        return [[w * (t_steps[i + 1] - t_steps[i]) for w in weights[min(max_order, i + 1) - 1]]
                for i in range(len(t_steps) - 1)]
    deis = types.SimpleNamespace(get_deis_coeff_list=get_deis_coeff_list)
    for name, module in (('fakekd', package), ('fakekd.sampling', sampling_module), ('fakekd.deis', deis)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(_kdiff, '_override', sampling_module)


def test_deis_uses_the_hosts_coefficients_and_carries_history(monkeypatch):
    fake_deis_backend(monkeypatch)
    sigmas = KARRAS[:-1]  # DEIS takes an Euler step into sigma 0, IPNDM does not: end above 0
    x = X * sigmas[0]
    for w2sd in ({'lam': 0}, {}):
        out = seeded(sampling.sample_w2sd_deis, gmm, x, sigmas, weak=weak, **w2sd)
        ref = seeded(sampling.sample_w2sd_ipndm, gmm, x, sigmas, max_order=3, weak=weak, **w2sd)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- reflected runs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fn, args, kwargs', [
    (sampling.sample_w2sd_dpm_fast, (0.03, 14.6, 10), {}),
    (twins.sample_w2sd_restart, (K.get_sigmas_karras(20, 0.03, 14.6),), {}),
    (sampling.sample_w2sd_heunpp2, (KARRAS,), {}),
    (sampling.sample_w2sd_ipndm, (KARRAS,), {}),
    (sampling.sample_w2sd_ipndm_v, (KARRAS,), {}),
])
def test_reflection_costs_two_calls_per_reflected_step_and_changes_the_result(fn, args, kwargs):
    x = X * 14.6
    off_model, on_model, steps = Counter(), Counter(), []
    off = seeded(fn, off_model, x, *args, weak=weak, lam=0, **kwargs)
    on = seeded(fn, on_model, x, *args, weak=Counter(weak), lam=3, callback=lambda d: steps.append(d['i']),
                **kwargs)
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    assert on_model.calls == off_model.calls + 3  # the strong leg is the main model; the weak leg counted apart
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one callback per (outer) step, in order


def test_twins_reject_bad_w2sd_options_by_name():
    with pytest.raises(ValueError, match='strength'):
        sampling.sample_w2sd_dpm_fast(gmm, X, 0.03, 14.6, 9, weak=weak, strength=float('nan'))
    with pytest.raises(TypeError, match='weak denoiser'):
        sampling.sample_w2sd_ipndm(gmm, X, KARRAS)


# --- the hosts' sampler lists ---------------------------------------------------------------------------------

def restart_sampler():
    """Stands for A1111's ``sd_samplers_extra.restart_sampler`` (the table holds the function itself)."""


# samplers_k_diffusion of A1111 v1.10.1 and of Forge dfdcbab (labels and function names; options elided)
A1111 = ['DPM++ 2M', 'DPM++ SDE', 'DPM++ 2M SDE', 'DPM++ 2M SDE Heun', 'DPM++ 2S a', 'DPM++ 3M SDE', 'Euler a', 'Euler',
         'LMS', 'Heun', 'DPM2', 'DPM2 a', 'DPM fast', 'DPM adaptive', 'Restart']
FUNCS = ['sample_dpmpp_2m', 'sample_dpmpp_sde', 'sample_dpmpp_2m_sde', 'sample_dpmpp_2m_sde',
         'sample_dpmpp_2s_ancestral', 'sample_dpmpp_3m_sde', 'sample_euler_ancestral', 'sample_euler', 'sample_lms',
         'sample_heun', 'sample_dpm_2', 'sample_dpm_2_ancestral', 'sample_dpm_fast', 'sample_dpm_adaptive',
         restart_sampler]
FORGE_EXTRA = [('HeunPP2', 'sample_heunpp2'), ('IPNDM', 'sample_ipndm'), ('IPNDM_V', 'sample_ipndm_v'),
               ('DEIS', 'sample_deis')]


@pytest.mark.parametrize('host', ['a1111', 'forge'])
def test_every_listed_sampler_gets_a_twin_or_a_stated_refusal(host):
    table = [(label, f, [label.lower()], {}) for label, f in zip(A1111, FUNCS)]
    if host == 'forge':
        table += [(label, f, [label.lower()], {}) for label, f in FORGE_EXTRA]
    rows = registry.sampler_table(table)
    labels = [label for label, *_ in table]
    assert [r[0] for r in rows] == ['W2SD ' + label for label in labels if label != 'DPM adaptive']
    assert registry.refusals(table) == {'DPM adaptive': twins.REFUSED['sample_dpm_adaptive']}
    assert {registry.twin(name).__name__ for _, name, _, _ in rows} >= {
        'sample_w2sd_dpm_fast', 'sample_w2sd_restart', 'sample_w2sd_euler'}
    # an unknown future sampler is refused, not guessed
    assert 'no W2SD twin' in registry.refusals([('New', 'sample_new', [], {})])['New']
