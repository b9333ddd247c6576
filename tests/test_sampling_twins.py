"""The library's twins of host samplers that PyPI k-diffusion lacks, against closed forms (no host needed).

A denoiser that ignores x, ``D(sigma) = a + b t`` with ``t = -log sigma``, makes the probability-flow ODE
``dx/dsigma = (x - D) / sigma`` solvable by hand: ``x(s) = s (x0 / s0 - (F(s) - F(s0)))`` with
``F(s) = -a / s + b (log s + 1) / s``, the antiderivative of ``D(s) / s**2``.
"""
import k_diffusion.sampling as K
import pytest
import torch

import w2sd_samplers as W

A, B = torch.tensor([0.3, -1.2, 2.], dtype=torch.float64), torch.tensor([0.5, 0.1, -0.7], dtype=torch.float64)
SIGMAS = K.get_sigmas_karras(10, 0.1, 10., rho=7.).double()[:-1]  # end above 0: no final denoise step
X = torch.tensor([[4., -3., 7.]], dtype=torch.float64)


def linear_in_t(x, sigma):
    return (A + B * -sigma.log()[:, None]).expand_as(x)


def weak(x, sigma):
    return 0.5 * linear_in_t(x, sigma)


def exact(x, s0, s):
    F = lambda s: -A / s + B * (s.log() + 1) / s  # noqa: E731
    return s * (x / s0 - (F(s) - F(s0)))


def test_res_multistep_is_exact_for_a_denoiser_linear_in_log_sigma_after_its_euler_start():
    """Its second-order exponential-integrator step integrates D linear in t exactly; the first step is Euler."""
    x1 = X + (X - linear_in_t(X, SIGMAS[:1])) / SIGMAS[0] * (SIGMAS[1] - SIGMAS[0])
    ref = exact(x1, SIGMAS[1], SIGMAS[-1])
    out = W.sample_w2sd_res_multistep(linear_in_t, X, SIGMAS, disable=True, weak=weak, lam=0)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert (out - exact(X, SIGMAS[0], SIGMAS[-1])).abs().max() > 1e-4  # the Euler start is not exact


def test_res_multistep_two_euler_steps_are_k_diffusions_euler():
    sigmas = torch.tensor([10., 2., 0.])  # first step (no history) and the step into 0 are Euler steps
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 10
    model = lambda x, s: torch.tanh(x) * s[:, None]  # noqa: E731
    assert torch.equal(W.sample_w2sd_res_multistep(model, x, sigmas, disable=True, weak=model, lam=0),
                       K.sample_euler(model, x, sigmas, disable=True))


@pytest.mark.parametrize('name', ['ipndm', 'ipndm_v'])
def test_ipndm_is_exact_for_a_constant_derivative_and_ipndm_v_for_a_linear_one(name):
    """With D = x - sigma * f(sigma) the derivative is f, so x_N = x_0 + integral of f: Adams-Bashforth of order
    k is exact for f of degree < k on IPNDM_V's variable steps (after its lower-order start), IPNDM's fixed weights
    only on equal steps or for constant f."""
    f = (lambda s: 0.7 + 0.2 * s) if name == 'ipndm_v' else (lambda s: torch.full_like(s, 0.7))
    model = lambda x, s: x - s[:, None] * f(s)[:, None]  # noqa: E731
    fn = W.SAMPLERS[name]
    out = fn(model, X, SIGMAS, disable=True, weak=model, lam=0, max_order=2)
    x1 = X + f(SIGMAS[0]) * (SIGMAS[1] - SIGMAS[0])  # Euler start
    integral = 0.7 * (SIGMAS[-1] - SIGMAS[1]) + (0.1 * (SIGMAS[-1] ** 2 - SIGMAS[1] ** 2) if name == 'ipndm_v' else 0)
    torch.testing.assert_close(out, x1 + integral, rtol=1e-9, atol=1e-9)
