import math

import pytest
import torch

from w2sd_samplers import pairs, toy
from w2sd_samplers.guidance import (difference_guidance, restart_nfe, restart_plan, sample_resampling,
                                    sample_restart, z_sampling)
from w2sd_samplers.nfe import CallCounter
from w2sd_samplers.reflect import reflected_steps
from w2sd_samplers.sampling import sample_w2sd_euler

K = pytest.importorskip('k_diffusion.sampling')

STRONG, WEAK = toy.four_modes([.3, .2, .2, .3]), toy.four_modes([.4, .1, .1, .4])


def inner(x, sigma, c):
    return x / (1 + sigma[:, None] ** 2) + torch.tanh(x) * c


def noise(n=64, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_difference_guidance_formula_window_and_nfe():
    counter = CallCounter()
    r = pairs.weights(counter.wrap(STRONG, 'strong'), counter.wrap(WEAK, 'weak'))
    x = noise(6) * 3
    sigma = torch.tensor([5., 5., 2., 2., .5, .5], dtype=torch.float64)
    d_s, d_w = STRONG(x, sigma), WEAK(x, sigma)
    torch.testing.assert_close(difference_guidance(r, 1.5)(x, sigma), d_s + 1.5 * (d_s - d_w), rtol=0, atol=1e-12)
    assert counter.counts == {'strong': 1, 'weak': 1}  # autoguidance: the main call is the strong one
    got = difference_guidance(r, 1., sigma_window=(1., 3.))(x, sigma)
    inside = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool)
    torch.testing.assert_close(got[inside], (2 * d_s - d_w)[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[~inside], d_s[~inside], rtol=0, atol=1e-12)
    counter.counts.clear()
    difference_guidance(r, 1., sigma_window=(1., 3.))(x[:2], sigma[:2])
    assert counter.counts == {'strong': 1}  # outside the window: D_strong only
    with pytest.raises(ValueError, match='sigma_window'):
        difference_guidance(r, 1., sigma_window=(3., 1.))
    with pytest.raises(ValueError, match='w must'):
        difference_guidance(r, float('inf'))


def test_difference_guidance_on_a_guidance_pair_is_cfg_at_twice_the_gap_in_one_forward():
    counter = CallCounter()
    cond, uncond = {'c': torch.randn(3, 4)}, {'c': torch.zeros(3, 4)}
    r = z_sampling(counter.wrap(inner, 'unet'), cond, uncond)
    x, sigma = torch.randn(3, 4), torch.full([3], 2.)
    d_c, d_u = inner(x, sigma, **cond), inner(x, sigma, **uncond)
    got = difference_guidance(r, 1.)(x, sigma, **r.extra_args)
    torch.testing.assert_close(got, d_u + (2 * 5.5 - 0) * (d_c - d_u))  # Z-Sampling's first-order twin: CFG 11
    assert counter.total == 1  # main = strong at 5.5 and weak at 0 share one batched cond/uncond forward


def test_w2sd_approaches_difference_guidance_like_one_over_t():
    # paper.md 1.8: reflection + Euler step = Euler on D_s + (D_s - D_w) up to O(h^2) per step.
    r = pairs.weights(STRONG, WEAK)
    x0 = noise(400)
    gaps, to_strong = [], []
    steps = (50, 100, 200, 400)
    for n in steps:
        sigmas = K.get_sigmas_karras(n, 0.05, 20.).double()
        w2sd = sample_w2sd_euler(r.main, x0 * sigmas[0], sigmas, extra_args=r.extra_args, disable=True, **r.w2sd())
        # W2SD never reflects the last step (into sigma = 0): guide on the same steps.
        guided = difference_guidance(r, 1., sigma_window=(float(sigmas[-3]), math.inf))
        twin = K.sample_euler(guided, x0 * sigmas[0], sigmas, disable=True)
        # The median per-sample gap: a few samples near a mode boundary may switch modes.
        gaps.append(float((w2sd - twin).norm(dim=1).median()))
        to_strong.append(float((w2sd - K.sample_euler(STRONG, x0 * sigmas[0], sigmas, disable=True))
                               .norm(dim=1).median()))
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    slope = torch.linalg.lstsq(torch.tensor([[math.log(n), 1.] for n in steps]),
                               torch.tensor(gaps).log()[:, None]).solution[0].item()
    assert all(1.6 < q < 2.4 for q in ratios), ratios
    assert -1.2 < slope < -0.8, slope
    assert min(to_strong) > 10 * gaps[-1]  # the reflection does change the samples: the agreement is not trivial


def test_z_sampling_preset_is_the_guidance_pair():
    cond, uncond = {'c': torch.randn(3, 4)}, {'c': torch.zeros(3, 4)}
    r = z_sampling(inner, cond, uncond, scale=4., weak_scale=-1.)
    assert r.extra_args['cond_scale'] == 4. and r.weak_extra_args['cond_scale'] == -1. and r.strong_is_main
    assert r.options == {}  # the sampler defaults are Z-Sampling's: every step but the last, one round


def test_resampling_nfe_and_steps():
    sigmas = K.get_sigmas_karras(7, 0.1, 10.).double()
    x = noise(32) * 10
    for lam in (None, 0, 3):
        counter = CallCounter()
        sample_resampling(counter.wrap(STRONG, 'model'), x, sigmas, disable=True, lam=lam)
        assert counter.total == len(sigmas) - 1 + sum(reflected_steps(sigmas, lam))
    # lam = 0 is k-diffusion's Euler, bit for bit.
    assert torch.equal(sample_resampling(STRONG, x, sigmas, disable=True, lam=0),
                       K.sample_euler(STRONG, x, sigmas, disable=True))
    # One re-sampled step, recomputed by hand with a known noise.
    z = noise(32, seed=1)
    got = sample_resampling(STRONG, x, sigmas[:2].clone(), disable=True, lam=1, noise_sampler=lambda s, sn: z)
    s, sn = sigmas[0], sigmas[1]
    x_down = x + (sn - s) * (x - STRONG(x, s.expand(32))) / s
    x_re = x_down + (s ** 2 - sn ** 2).sqrt() * z
    torch.testing.assert_close(got, K.sample_euler(STRONG, x_re, sigmas[:2], disable=True), rtol=0, atol=1e-12)
    assert torch.equal(x, noise(32) * 10)


def test_restart_matches_heun_segments_and_its_nfe_formula():
    sigmas = K.get_sigmas_karras(8, 0.05, 10.).double()
    x = noise(32) * 10
    zs = [noise(32, seed=s) for s in (2, 3)]
    draws = iter(zs)
    counter = CallCounter()
    got = sample_restart(counter.wrap(STRONG, 'model'), x, sigmas, disable=True, sigma_lo=0.3, sigma_hi=2.,
                         restart_k=2, restart_steps=3, noise_sampler=lambda s, sn: next(draws))
    plan = restart_plan(sigmas, sigma_lo=0.3, sigma_hi=2., restart_k=2, restart_steps=3)
    (j, [(hi, k, n)]), = plan.items()
    assert abs(float(sigmas[j]) - 0.3) == min(abs(float(s) - 0.3) for s in sigmas[1:-1]) and (k, n) == (2, 3)
    assert counter.total == restart_nfe(sigmas, plan) == 2 * 8 - 1 + 2 * 2 * 3
    # Independent reference: k-diffusion's Heun on each piece, noise added between.
    lo = sigmas[j]
    sub = torch.cat([K.get_sigmas_karras(n + 1, lo, hi).double()[:-2], lo[None]])
    want = K.sample_heun(STRONG, x, sigmas[:j + 1], disable=True)
    for z in zs:
        want = K.sample_heun(STRONG, want + z * (hi ** 2 - lo ** 2) ** 0.5, sub, disable=True)
    want = K.sample_heun(STRONG, want, sigmas[j:], disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_restart_options_are_checked():
    sigmas = K.get_sigmas_karras(8, 0.05, 10.)
    with pytest.raises(ValueError, match='restart_list'):
        restart_plan(sigmas)
    with pytest.raises(ValueError, match='sigma_hi'):
        restart_plan(sigmas, sigma_lo=1., sigma_hi=0.5)
    with pytest.raises(ValueError, match='k must'):
        restart_plan(sigmas, [(0.5, 2., 0, 3)])
    with pytest.raises(ValueError, match='not both'):
        restart_plan(sigmas, [(0.5, 2., 1, 3)], sigma_lo=0.5, sigma_hi=2.)
    plan = restart_plan(sigmas, [(0.5, 2., 1, 3), (0.5, 4., 2, 2)])
    assert [len(v) for v in plan.values()] == [2]  # two restarts at the same level run in the given order


def test_difference_guidance_on_a_prompt_pair_reuses_the_main_forward():
    counted = CallCounter()
    cond, weak_cond, uncond = {'c': torch.randn(3, 4)}, {'c': torch.randn(3, 4)}, {'c': torch.zeros(3, 4)}
    r = pairs.condition(counted.wrap(inner, 'unet'), cond, weak_cond, uncond)
    x, sigma = torch.randn(3, 4), torch.full([3], 2.)
    d_c, d_u, d_w = (inner(x, sigma, **c) for c in (cond, uncond, weak_cond))
    got = difference_guidance(r, 2.)(x, sigma, **r.extra_args)
    torch.testing.assert_close(got, d_u + 5.5 * (d_c - d_u) + 2. * (d_c - d_w))
    assert counted.total == 1  # main (cond, uncond), CFG-1 strong (= the cond branch) and weak: one forward


@pytest.mark.parametrize('lo, hi', [(math.nan, 2.), (0.5, math.inf), (0.5, math.nan)])
def test_restart_bounds_must_be_finite(lo, hi):
    sigmas = K.get_sigmas_karras(6, 0.1, 10.).double()
    with pytest.raises(ValueError, match='finite'):
        sample_restart(STRONG, noise(4) * 10, sigmas, disable=True, sigma_lo=lo, sigma_hi=hi)


def test_restart_refuses_an_overflowing_sigma_hi_and_a_nan_s_noise():
    sigmas = K.get_sigmas_karras(8, 0.05, 20.)
    x = noise(4).float() * 20
    with pytest.raises(ValueError, match=r'restart sigma_hi 1e\+30 is too large for x of dtype torch.float32'):
        sample_restart(STRONG, x, sigmas, disable=True, sigma_lo=1., sigma_hi=1e30)
    with pytest.raises(ValueError, match='s_noise must be a finite number'):
        sample_restart(STRONG, x, sigmas, disable=True, sigma_lo=1., sigma_hi=2., s_noise=math.nan)
    # a sigma_hi whose restart noise still fits float32 gives a finite sample
    assert torch.isfinite(sample_restart(STRONG, x, sigmas, disable=True, sigma_lo=1., sigma_hi=1e19)).all()


@pytest.mark.parametrize('sampler', [sample_restart, sample_resampling])
def test_relatives_name_a_bad_model_x_and_callback(sampler):
    sigmas = K.get_sigmas_karras(6, 0.1, 10.)
    kw = dict(sigma_lo=1., sigma_hi=2.) if sampler is sample_restart else {}
    with pytest.raises(TypeError, match=r'model \(the main denoiser\)'):
        sampler(None, noise(4), sigmas, disable=True, **kw)
    with pytest.raises(ValueError, match='x must have a batch dimension'):
        sampler(STRONG, torch.tensor(1.), sigmas, disable=True, **kw)
    with pytest.raises(TypeError, match='callback must be'):
        sampler(STRONG, noise(4), sigmas, disable=True, callback=5, **kw)
