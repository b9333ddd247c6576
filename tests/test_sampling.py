"""The W2SD sampler family against k-diffusion's own samplers and written-out references."""
import copy
import functools
import inspect
import math

import k_diffusion.sampling as K
import pytest
import torch

import w2sd_samplers as W
from w2sd_samplers import sampling
from w2sd_samplers.nfe import CallCounter
from w2sd_samplers.toy import GaussianMixture
from rounding import reorder_bound

STRONG = GaussianMixture([[-2., 0., 1.], [2., 1., -1.], [0., -2., 2.]], [0.4, 0.6, 0.5], [0.2, 0.5, 0.3])
WEAK = GaussianMixture([[-2., 0., 1.], [2., 1., -1.], [0., -2., 2.]], [0.4, 0.6, 0.5], [0.05, 0.7, 0.25])
SIGMAS = K.get_sigmas_karras(8, 0.05, 20.)
X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * SIGMAS[0]

# (name, base kwargs) for every sampler, ancestral/SDE ones with their options varied.
CASES = [('euler', {}), ('euler', {'s_churn': 2.}), ('euler_ancestral', {}), ('euler_ancestral', {'eta': .5}),
         ('heun', {}), ('heun', {'s_churn': 1., 's_tmin': .1, 's_tmax': 5.}), ('dpm_2', {}),
         ('dpm_2_ancestral', {}), ('lms', {}), ('lms', {'order': 2}), ('dpmpp_2s_ancestral', {}),
         ('dpmpp_sde', {}), ('dpmpp_sde', {'r': .3, 'eta': .7}), ('dpmpp_2m', {}), ('dpmpp_2m_sde', {}),
         ('dpmpp_2m_sde', {'solver_type': 'heun'}), ('dpmpp_3m_sde', {}), ('dpmpp_3m_sde', {'eta': 0.})]


# The hosts' samplers that PyPI k-diffusion lacks: tested against the hosts and independent forms in
# test_sampling_twins.py, test_sd_webui_twins.py and test_comfyui_real.py.
HOST_ONLY = {'heunpp2', 'ipndm', 'ipndm_v', 'res_multistep'}


def test_every_sampler_is_covered():
    assert {name for name, _ in CASES} == set(W.SAMPLERS) - HOST_ONLY
    assert set(W.SAMPLERS) - HOST_ONLY == {'euler', 'euler_ancestral', 'heun', 'dpm_2', 'dpm_2_ancestral', 'lms',
                               'dpmpp_2s_ancestral', 'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m_sde'}


def run_pair(name, kwargs, w2sd, noise_sampler=None):
    """k-diffusion's sampler and ours from the same RNG state; also returns the RNG states afterwards."""
    extra = {} if noise_sampler is None else {'noise_sampler': noise_sampler()}
    torch.manual_seed(123)
    ref = getattr(K, f'sample_{name}')(STRONG, X, SIGMAS, disable=True, **kwargs, **extra)
    state_ref = torch.get_rng_state()
    extra = {} if noise_sampler is None else {'noise_sampler': noise_sampler()}
    torch.manual_seed(123)
    ours = W.SAMPLERS[name](STRONG, X, SIGMAS, disable=True, weak=WEAK, **kwargs, **extra, **w2sd)
    return ref, ours, state_ref, torch.get_rng_state()


@pytest.mark.parametrize('name, kwargs', CASES)
@pytest.mark.parametrize('off', [{'lam': 0}, {'strength': 0.}])
def test_reflection_off_is_bit_identical_to_k_diffusion(name, kwargs, off):
    ref, ours, _, _ = run_pair(name, kwargs, off)
    assert torch.equal(ref, ours)


@pytest.mark.parametrize('name, kwargs', [c for c in CASES if 'noise_sampler' in
                                          inspect.signature(getattr(K, f'sample_{c[0]}')).parameters])
def test_bit_identical_with_a_brownian_tree_noise_sampler(name, kwargs):
    tree = lambda: K.BrownianTreeNoiseSampler(X, SIGMAS[-2], SIGMAS[0], seed=7)  # noqa: E731
    ref, ours, _, _ = run_pair(name, kwargs, {'lam': 0}, noise_sampler=tree)
    assert torch.equal(ref, ours)


@pytest.mark.parametrize('name, kwargs', CASES)
def test_reflection_draws_no_noise(name, kwargs):
    # Same global RNG consumption with and without reflections, so one seed gives paired runs.
    ref, ours, state_ref, state_ours = run_pair(name, kwargs, {})
    assert torch.equal(state_ref, state_ours)
    assert not torch.equal(ref, ours)


def reference_w2sd_euler(x, sigmas, lam, weak_sigma='current', strength=1.):
    """paper.md 1.6, written out independently of the library."""
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        ones = torch.ones(len(x))
        if i < lam and sn > 0:
            xp = x + (sn - s) * (x - STRONG(x, s * ones)) / s
            sw = s if weak_sigma == 'current' else sn
            xt = xp + (s - sn) * (xp - WEAK(xp, sw * ones)) / sw
            x = x + strength * (xt - x)
        x = x + (sn - s) * (x - STRONG(x, s * ones)) / s
    return x


@pytest.mark.parametrize('lam, weak_sigma, strength', [(7, 'current', 1.), (3, 'next', 1.), (5, 'current', .5)])
def test_euler_matches_the_papers_algorithm(lam, weak_sigma, strength):
    ours = W.sample_w2sd_euler(STRONG, X, SIGMAS, disable=True, weak=WEAK, lam=lam, weak_sigma=weak_sigma,
                               strength=strength)
    want = reference_w2sd_euler(X, SIGMAS, lam, weak_sigma, strength)
    # The same float32 arithmetic in another order (ATen's kernels round it differently per CPU capability): per
    # step 3 mixture outputs rounded to float32 (the mixtures compute in float64) and 5 + 5 + 5 + 3 operations of
    # the Euler step, the two inversions and the strength blend; a step passes an earlier error on with a gain
    # taken as 1 (the mixtures' shrinkage is below 1).
    torch.testing.assert_close(ours, want, rtol=0, atol=reorder_bound((len(SIGMAS) - 1) * 21, X, ours, want))


def test_dpmpp_2m_keeps_its_history_across_reflections():
    # DPM-Solver++(2M) from the paper's formula: the step after a reflection still uses D_{i-1}.
    x, old = X, None
    for i in range(len(SIGMAS) - 1):
        s, sn = SIGMAS[i], SIGMAS[i + 1]
        if 1 <= i < 5:
            x = W.reflect(x, s, sn, STRONG, WEAK)
        d = STRONG(x, s * torch.ones(len(x)))
        blend = d
        if old is not None and sn > 0:
            r = (SIGMAS[i - 1] / s).log() / (s / sn).log()
            blend = (1 + 1 / (2 * r)) * d - old / (2 * r)
        x = sn / s * x + (1 - sn / s) * blend
        old = d
    ours = W.sample_w2sd_dpmpp_2m(STRONG, X, SIGMAS, disable=True, weak=WEAK, sigma_window=(SIGMAS[4], SIGMAS[1]))
    torch.testing.assert_close(ours, x)


def test_a_users_single_step_sampler_gets_reflections():
    @torch.no_grad()
    def my_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
            if callback is not None:
                callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
            x = x + K.to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        return x

    steps = []
    ours = W.with_reflection(my_euler)(STRONG, X, SIGMAS, disable=True, weak=WEAK, lam=4,
                                       callback=lambda d: steps.append(d['i']))
    assert torch.equal(ours, W.sample_w2sd_euler(STRONG, X, SIGMAS, disable=True, weak=WEAK, lam=4))
    assert steps == list(range(len(SIGMAS) - 1))
    off = W.with_reflection(my_euler)(STRONG, X, SIGMAS, disable=True, weak=WEAK, lam=0)
    assert torch.equal(off, my_euler(STRONG, X, SIGMAS))


@pytest.mark.parametrize('name', sorted(W.SAMPLERS))
def test_callback_once_per_outer_step_with_k_diffusion_keys(name):
    seen = []
    W.SAMPLERS[name](STRONG, X, SIGMAS, disable=True, weak=WEAK, callback=seen.append)
    assert [d['i'] for d in seen] == list(range(len(SIGMAS) - 1))
    assert all(set(d) == {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} for d in seen)


def test_progress_bar_honours_disable(capsys):
    W.sample_w2sd_euler(STRONG, X, SIGMAS, weak=WEAK, disable=False)
    assert '8/8' in capsys.readouterr().err
    W.sample_w2sd_euler(STRONG, X, SIGMAS, weak=WEAK, disable=True)
    assert capsys.readouterr().err == ''


def test_nfe_per_role_and_extra_args_functions_evaluated_per_call():
    counter = CallCounter()
    calls = []

    def weak_args(main_args):
        calls.append(dict(main_args))
        return {}
    cond = lambda x, s, scale: STRONG(x, s)  # noqa: E731
    W.sample_w2sd_heun(counter.wrap(cond, 'main'), X, SIGMAS, extra_args={'scale': 5.5}, disable=True,
                       weak=counter.wrap(WEAK, 'weak'), weak_extra_args=weak_args, lam=3,
                       strong=counter.wrap(cond, 'strong'), strong_extra_args={'scale': 1.})
    # Heun: 2 calls per step except the last (Euler into sigma = 0); one strong and one weak per reflection.
    assert counter.counts == {'main': 2 * 8 - 1, 'strong': 3, 'weak': 3}
    assert calls == [{'scale': 5.5}] * 3


def test_default_strong_role_is_the_main_model():
    counter = CallCounter()
    W.sample_w2sd_euler(counter.wrap(STRONG, 'main'), X, SIGMAS, disable=True, weak=counter.wrap(WEAK, 'weak'))
    assert counter.counts == {'main': 8 + 7, 'weak': 7}  # lambda = T - 1 by default


def test_caller_inputs_are_never_modified():
    x, sigmas = X.clone(), SIGMAS.clone()
    extra = {'scale': torch.tensor([2.])}
    extra_copy = copy.deepcopy(extra)
    model = lambda x, s, scale: STRONG(x, s)  # noqa: E731
    for name, fn in W.SAMPLERS.items():
        fn(model, x, sigmas, extra_args=extra, disable=True, weak=model,
           weak_extra_args=lambda ea: {**ea, 'scale': ea['scale'] * 0})
    assert torch.equal(x, X) and torch.equal(sigmas, SIGMAS)
    assert extra.keys() == extra_copy.keys() and torch.equal(extra['scale'], extra_copy['scale'])


@pytest.mark.parametrize('sigmas, match', [
    (SIGMAS[None], '1-D'),
    (torch.tensor([5., float('inf'), 0.]), 'finite'),
    (torch.tensor([5., float('nan'), 0.]), 'finite'),
    (torch.tensor([1., 2., 0.]), 'non-increasing'),
    (torch.tensor([1., .5, -.1]), '>= 0'),
    ([5., 1., 0.], 'torch.Tensor'),
])
def test_bad_sigmas(sigmas, match):
    with pytest.raises((ValueError, TypeError), match=match):
        W.sample_w2sd_euler(STRONG, X, sigmas, disable=True, weak=WEAK)


def test_bad_roles_are_named():
    with pytest.raises(TypeError, match='weak denoiser'):
        W.sample_w2sd_euler(STRONG, X, SIGMAS, disable=True)
    with pytest.raises(ValueError, match='the main denoiser returned'):
        W.sample_w2sd_euler(lambda x, s: x[:1], X, SIGMAS, disable=True, weak=WEAK, lam=0)
    with pytest.raises(ValueError, match='the strong denoiser returned'):
        W.sample_w2sd_dpmpp_2m(STRONG, X, SIGMAS, disable=True, weak=WEAK, strong=lambda x, s: x.sum(1))
    with pytest.raises(TypeError, match='weak_extra_args'):
        W.sample_w2sd_euler(STRONG, X, SIGMAS, disable=True, weak=WEAK, weak_extra_args=[1])
    with pytest.raises(TypeError, match=r"sample_w2sd_euler\(\) got an unexpected keyword argument 'lamda'"):
        W.sample_w2sd_euler(STRONG, X, SIGMAS, disable=True, weak=WEAK, lamda=3)
    with pytest.raises(ValueError, match='solver_type'):
        W.sample_w2sd_dpmpp_2m_sde(STRONG, X, SIGMAS, disable=True, weak=WEAK, solver_type='rk4')


def test_signature_shows_the_options_and_avoids_names_a1111_probes():
    for fn in W.SAMPLERS.values():
        params = inspect.signature(fn).parameters
        assert list(params)[:6] == ['model', 'x', 'sigmas', 'extra_args', 'callback', 'disable']
        assert params['weak'].kind is inspect.Parameter.KEYWORD_ONLY and params['strength'].default == 1.
        assert params['weak_sigma'].default == 'current' and params['lam'].default is None
        assert not {'n', 'sigma_min', 'sigma_max', 'sigma_sched'} & set(params)


@pytest.mark.parametrize('name, kwargs', CASES)
@pytest.mark.filterwarnings('ignore:divide by zero:RuntimeWarning')  # k-diffusion's lms on the repeat
def test_a_repeated_sigma_runs_as_in_k_diffusion_or_is_refused_where_k_diffusion_gives_nan(name, kwargs):
    sigmas = torch.tensor([10., 5., 5., 1., 0.])
    torch.manual_seed(0)
    ref = getattr(K, f'sample_{name}')(STRONG, X, sigmas, disable=True, **kwargs)
    counter = CallCounter()
    torch.manual_seed(0)
    run = functools.partial(W.SAMPLERS[name], STRONG, X, sigmas, disable=True, weak=counter.wrap(WEAK, 'weak'),
                            **kwargs)
    if not torch.isfinite(ref).all():
        with pytest.raises(ValueError, match=rf'sigmas repeats 5 \(entries 1 and 2\): step \d of {name} divides'):
            run()
        return
    assert torch.isfinite(run()).all()
    assert counter.counts['weak'] == 2  # 10 -> 5 and 5 -> 1; not 5 -> 5, not into 0


def user_noise(sigma, sigma_next):
    return torch.randn_like(X)  # a noise sampler of the user's: finite on a zero-length step


# The samplers whose history or Brownian noise divides by a step length, with the options that change which steps
# do; the host-only twins (ipndm_v, res_multistep) have no k-diffusion reference.
REPEAT_CASES = [('lms', {}), ('lms', {'order': 2}), ('dpmpp_sde', {}), ('dpmpp_sde', {'noise_sampler': user_noise}),
                ('dpmpp_2m', {}), ('dpmpp_2m_sde', {}), ('dpmpp_2m_sde', {'eta': 0.}),
                ('dpmpp_2m_sde', {'solver_type': 'heun'}),
                ('dpmpp_2m_sde', {'solver_type': 'heun', 'noise_sampler': user_noise}), ('dpmpp_3m_sde', {}),
                ('dpmpp_3m_sde', {'eta': 0.}), ('dpmpp_3m_sde', {'noise_sampler': user_noise}),
                ('ipndm_v', {}), ('ipndm_v', {'max_order': 2}), ('ipndm_v', {'denoise_to_zero': False}),
                ('res_multistep', {}), ('res_multistep', {'eta': .5})]
BASES = ([8., 4., 2., 1., .5, 0.], [8., 4., 2., 1., .5])
REPEATS = [torch.tensor(base[:k + 1] + base[k:]) for base in BASES for k in range(len(base)) if base[k] > 0] + \
    [torch.tensor(s) for s in ([8., 8., 4., 4., 2., 0.], [8., 4., 4., 4., 1., 0.], [8., 4., 2., 2., 1., 1.])]


@pytest.mark.parametrize('name, kwargs', REPEAT_CASES)
@pytest.mark.filterwarnings('ignore:divide by zero:RuntimeWarning')  # k-diffusion's lms on the repeat
def test_a_repeated_sigma_is_refused_exactly_where_the_reference_sampler_gives_nan(name, kwargs, monkeypatch):
    """Refused (naming sigmas) if and only if the reference's result is not finite; otherwise bit for bit."""
    if name in HOST_ONLY:  # the reference: our twin of the host's sampler (tested against it) without the check
        reference = functools.partial(W.SAMPLERS[name], weak=WEAK, lam=0)
        unchecked = {'_refuse_repeats': lambda *args: None}
    else:
        reference, unchecked = getattr(K, f'sample_{name}'), {}
    for sigmas in REPEATS:
        torch.manual_seed(0)
        with monkeypatch.context() as m:
            for attr, value in unchecked.items():
                m.setattr(sampling, attr, value)
            ref = reference(STRONG, X, sigmas, disable=True, **kwargs)
        torch.manual_seed(0)
        if not torch.isfinite(ref).all():
            with pytest.raises(ValueError, match='sigmas repeats'):
                W.SAMPLERS[name](STRONG, X, sigmas, disable=True, weak=WEAK, lam=0, **kwargs)
        else:
            assert torch.equal(W.SAMPLERS[name](STRONG, X, sigmas, disable=True, weak=WEAK, lam=0, **kwargs), ref)


@pytest.mark.parametrize('name', ['dpmpp_2m_sde', 'dpmpp_3m_sde'])
def test_a_one_step_schedule_into_zero_returns_the_denoised_estimate(name):
    # k-diffusion 0.1.1 raises UnboundLocalError here; ComfyUI's and Forge's copies return the denoised estimate.
    sigmas = torch.tensor([10., 0.])
    assert torch.equal(W.SAMPLERS[name](STRONG, X, sigmas, disable=True, weak=WEAK), STRONG(X, sigmas[:1].expand(16)))


@pytest.mark.parametrize('name', sorted(W.SAMPLERS))
def test_bad_input_is_caught_before_anything_is_built(name):
    # Brownian-tree samplers used to build their noise sampler first and fail inside torch/torchsde.
    with pytest.raises(ValueError, match='sigmas must start above 0'):
        W.SAMPLERS[name](STRONG, X, torch.zeros(5), disable=True, weak=WEAK)
    with pytest.raises(TypeError, match='x must be a torch.Tensor'):
        W.SAMPLERS[name](STRONG, X.tolist(), SIGMAS, disable=True, weak=WEAK)
    with pytest.raises(TypeError, match='extra_args must be a dict'):
        W.SAMPLERS[name](STRONG, X, SIGMAS, extra_args=[('c', 1)], disable=True, weak=WEAK)


@pytest.mark.parametrize('name', sorted(W.SAMPLERS))
def test_bad_calls_are_named_before_any_work(name):
    fn = W.SAMPLERS[name]
    with pytest.raises(TypeError, match=r'model \(the main denoiser\) must be a callable.*got NoneType'):
        fn(None, X, SIGMAS, disable=True, weak=WEAK)
    with pytest.raises(ValueError, match=r'x must have a batch dimension \(shape \[B, ...\]\)'):
        fn(STRONG, torch.tensor(1.), SIGMAS, disable=True, weak=WEAK)
    with pytest.raises(TypeError, match='callback must be a function of the step dict'):
        fn(STRONG, X, SIGMAS, disable=True, weak=WEAK, callback=5)
    with pytest.raises(TypeError, match='then must be a sequence'):
        fn(STRONG, X, SIGMAS, disable=True, weak=WEAK, then=5)
    with pytest.raises(TypeError, match='weak_extra_args returned list'):
        fn(STRONG, X, SIGMAS, disable=True, weak=WEAK, weak_extra_args=lambda ea: [ea])
    with pytest.raises(TypeError, match=r'then\[0\]: strong_extra_args returned tuple'):
        fn(STRONG, X, SIGMAS, disable=True, weak=WEAK, then=[(STRONG, WEAK, lambda ea: (), None)])
    for option in {'eta', 's_noise', 's_churn'} & set(inspect.signature(fn).parameters):
        with pytest.raises(ValueError, match=f'{option} must be a finite number, got nan'):
            fn(STRONG, X, SIGMAS, disable=True, weak=WEAK, **{option: math.nan})


def test_errors_name_what_the_user_called():
    # The strong leg defaults to the main model, so a bad main model is reported as the main model.
    with pytest.raises(ValueError, match='the main denoiser returned'):
        W.sample_w2sd_euler(lambda x, s: x[:1], X, SIGMAS, disable=True, weak=WEAK)
    pytest.importorskip('diffusers')
    from test_adapters_vp import tiny_sd_unet
    for role in ('model', 'weak', 'strong'):
        kw = {'model': STRONG, 'weak': WEAK, role: tiny_sd_unet()}
        with pytest.raises(TypeError, match='diffusers UNet2DConditionModel.*adapters.unet_denoiser'):
            W.sample_w2sd_euler(kw.pop('model'), X, SIGMAS, disable=True, **kw)
