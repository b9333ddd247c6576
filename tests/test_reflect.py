"""reflect(): closed forms on exact Gaussian-mixture denoisers, the schedule, and input checks."""
import math

import numpy as np
import pytest
import torch

from w2sd_samplers.reflect import WEAK_SIGMAS, reflect, reflected_steps
from w2sd_samplers.toy import GaussianMixture

# paper.md 1.5: modes +-4, component std 0.5, strong left weight 0.35, weak 0.15, at sigma = 2.
STRONG = GaussianMixture([[-4.], [4.]], 0.5, [0.35, 0.65])
WEAK = GaussianMixture([[-4.], [4.]], 0.5, [0.15, 0.85])
SIGMA = torch.tensor(2., dtype=torch.float64)
X = torch.linspace(-6, 6, 25, dtype=torch.float64)[:, None]


def first_order(h):
    # (h / sigma) (D_strong - D_weak), the paper's Theorem 1 in k-diffusion form.
    s = SIGMA * torch.ones(len(X), dtype=torch.float64)
    return h / SIGMA * (STRONG(X, s) - WEAK(X, s))


def rel_error(h, weak=WEAK, **kw):
    moved = reflect(X, SIGMA, SIGMA - h, STRONG, weak, **kw) - X
    reference = first_order(h) if weak is WEAK else torch.zeros_like(X)
    return float((moved - reference).norm() / first_order(h).norm())


@pytest.mark.parametrize('weak_sigma', ['current', 'next'])
def test_displacement_approaches_first_order_with_error_proportional_to_h(weak_sigma):
    errors = [rel_error(h, weak_sigma=weak_sigma) for h in (0.2, 0.02, 0.002)]
    assert errors[-1] < 0.01
    # linear convergence: each 10x smaller step cuts the relative error about 10x
    for coarse, fine in zip(errors, errors[1:]):
        assert 7 < coarse / fine < 13


def test_self_reflection_shrinks_like_h_squared():
    # With weak = strong the paper form is not the identity; its displacement is O(h^2).
    sizes = [float((reflect(X, SIGMA, SIGMA - h, STRONG, STRONG) - X).norm()) for h in (0.2, 0.02, 0.002)]
    for coarse, fine in zip(sizes, sizes[1:]):
        assert 70 < coarse / fine < 130


def test_anchored_form_is_exact_and_identity_for_equal_models():
    h = 0.5
    s = SIGMA * torch.ones(len(X), dtype=torch.float64)
    got = reflect(X, SIGMA, SIGMA - h, STRONG, WEAK, form='anchored')
    torch.testing.assert_close(got, X + h / (SIGMA - h) * (STRONG(X, s) - WEAK(X, s)), rtol=1e-12, atol=1e-12)
    assert torch.equal(reflect(X, SIGMA, SIGMA - h, STRONG, STRONG, form='anchored'), X)


def test_paper_form_matches_the_three_written_out_steps_and_strength_scales_it():
    sn = SIGMA - 0.3
    s = SIGMA * torch.ones(len(X), dtype=torch.float64)
    x1 = X + (sn - SIGMA) * (X - STRONG(X, s)) / SIGMA
    x2 = x1 + (SIGMA - sn) * (x1 - WEAK(x1, s)) / SIGMA
    torch.testing.assert_close(reflect(X, SIGMA, sn, STRONG, WEAK), x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reflect(X, SIGMA, sn, STRONG, WEAK, strength=0.5), X + 0.5 * (x2 - X))
    twice = reflect(reflect(X, SIGMA, sn, STRONG, WEAK), SIGMA, sn, STRONG, WEAK)
    torch.testing.assert_close(reflect(X, SIGMA, sn, STRONG, WEAK, reflections=2), twice)
    assert not torch.equal(twice, x2)


def test_extra_args_reach_each_leg():
    seen = []

    def denoiser(x, sigma, tag):
        seen.append(tag)
        return x * 0.5
    reflect(X, SIGMA, SIGMA - 0.1, denoiser, denoiser, {'tag': 'strong'}, {'tag': 'weak'})
    assert seen == ['strong', 'weak']


def test_schedule():
    sig = torch.tensor([10., 5., 2., 1., 0.5, 0.])
    assert reflected_steps(sig) == [True, True, True, True, False]          # paper: all but the last
    assert reflected_steps(sig, lam=2) == [True, True, False, False, False]
    assert reflected_steps(sig, lam=99) == [True, True, True, True, False]  # never into sigma = 0
    assert reflected_steps(sig, lam=0) == [False] * 5
    assert reflected_steps(sig, lam=np.int64(1)) == [True] + [False] * 4
    assert reflected_steps(sig, sigma_window=(1., 5.)) == [False, True, True, True, False]
    with pytest.raises(ValueError, match='not both'):
        reflected_steps(sig, lam=2, sigma_window=(0, 1))
    with pytest.raises(ValueError, match='lam'):
        reflected_steps(sig, lam=-1)
    with pytest.raises(ValueError, match='lo <= hi'):
        reflected_steps(sig, sigma_window=(3, 1))


@pytest.mark.parametrize('kwargs, match', [
    (dict(strength=math.nan), 'strength'),
    (dict(strength='1'), 'strength'),
    (dict(weak_sigma='previous'), 'weak_sigma'),
    (dict(form='mirror'), 'form'),
    (dict(form='anchored', weak_sigma='next'), 'anchored'),
    (dict(reflections=0), 'reflections'),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reflect(X, SIGMA, SIGMA - 0.1, STRONG, WEAK, **kwargs)


def test_never_reflects_into_zero_and_checks_output_shapes():
    with pytest.raises(ValueError, match='sigma_next must be > 0'):
        reflect(X, SIGMA, 0., STRONG, WEAK)
    with pytest.raises(ValueError, match='the weak denoiser returned'):
        reflect(X, SIGMA, SIGMA - 0.1, STRONG, lambda x, s: x[:, :0])


def test_fp16_paper_form_is_finite_where_k_diffusions_plain_step_is():
    # SVD's range (sigma_max 700) with fp16 latents and a host-like denoiser that computes in float32.
    def denoiser(gain):
        def d(x, sigma):
            s = sigma.float()[:, None]
            return (x.float() / (1 + s ** 2) + gain * torch.tanh(x.float() / (1 + s))).to(x.dtype)
        return d
    strong, weak = denoiser(0.5), denoiser(0.2)
    k = pytest.importorskip('k_diffusion.sampling')
    sigmas = k.get_sigmas_karras(10, 0.002, 700.)
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 700).half()
    assert torch.isfinite(k.sample_euler(strong, x, sigmas, disable=True)).all()
    for weak_sigma in WEAK_SIGMAS:
        out = reflect(x, sigmas[0], sigmas[1], strong, weak, weak_sigma=weak_sigma)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        want = reflect(x.float(), sigmas[0], sigmas[1], strong, weak, weak_sigma=weak_sigma)
        torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=1.)


def test_anchored_form_stays_finite_when_sigma_next_is_tiny():
    x = torch.randn(6, 1)
    out = reflect(x, 1., 1e-40, STRONG, WEAK, form='anchored')
    assert torch.isfinite(out).all()
    assert torch.equal(reflect(x, 1., 1e-40, STRONG, STRONG, form='anchored'), x)  # equal legs: still the identity


@pytest.mark.parametrize('strength', [1e38, -1e6, math.inf])
def test_overflowing_strength_is_rejected(strength):
    with pytest.raises(ValueError, match='strength'):
        reflect(X, SIGMA, SIGMA - 0.1, STRONG, WEAK, strength=strength)


def test_a_zero_length_step_does_not_reflect():
    assert reflected_steps(torch.tensor([10., 5., 5., 1., 0.])) == [True, False, True, False]


def test_paper_form_with_weak_sigma_next_stays_finite_when_sigma_next_is_tiny():
    # The weak leg's inversion gain h / sigma_next is capped at 1 / eps, as the anchored form's gain.
    x = torch.randn(6, 1)
    out = reflect(x, 5., 1e-39, STRONG, WEAK, weak_sigma='next')
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    x_strong = x - (5. - 1e-39) / 5. * (x - STRONG(x, torch.full([6], 5.)))
    x_back = x_strong + 1 / torch.finfo(torch.float32).eps * (x_strong - WEAK(x_strong, torch.full([6], 1e-39)))
    assert torch.equal(out, x + 1. * (x_back - x))


def test_x_must_be_a_batched_tensor():
    with pytest.raises(TypeError, match='x must be a torch.Tensor, got list'):
        reflect(X.tolist(), SIGMA, SIGMA - 0.1, STRONG, WEAK)
    with pytest.raises(ValueError, match='x must have a batch dimension'):
        reflect(torch.tensor(1.), SIGMA, SIGMA - 0.1, STRONG, WEAK)
