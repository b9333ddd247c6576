"""W2SD twins of the webui samplers that are not k-diffusion's classic eleven.

Each mirrors the host's function line for line, with ``x = refl(x, i)`` before step i of its schedule; with
reflection off it is the host's sampler bit for bit. Read at A1111 v1.10.1 (``modules/sd_samplers_extra.py``,
k-diffusion ab527a9) and Forge dfdcbab (``k_diffusion/sampling.py``: HeunPP2, IPNDM, IPNDM_V, DEIS).
Steps, helpers and noise come from the active k-diffusion copy (the host's).
"""
import importlib

import torch
from tqdm.auto import tqdm, trange

from w2sd_samplers import _kdiff
from w2sd_samplers.guidance import _heun_step
from w2sd_samplers.reflect import check_sigmas
from w2sd_samplers.sampling import _churn, _setup, _w2sd_signature


@_w2sd_signature
@torch.no_grad()
def sample_w2sd_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                         s_noise=1., noise_sampler=None, **w2sd):
    """DPM-Solver-Fast (fixed steps, uniform in log sigma) with a reflection before each of its steps.

    ``n`` counts model calls, as in k-diffusion; the schedule is ``floor(n / 3) + 1`` steps from sigma_max to
    sigma_min (> 0), so the last step does not end at 0 and ``lam`` counts those steps.
    """
    K = _kdiff.sampling()
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError('sigma_min and sigma_max must not be 0')
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    with tqdm(total=n, disable=disable) as pbar:
        solver = K.DPMSolver(None, eps_callback=pbar.update)  # the model comes with the reflection below
        t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
        m = n // 3 + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
        solver.model, solver.extra_args, refl, _ = _setup(model, x, solver.sigma(ts), extra_args, w2sd)
        steps = {1: solver.dpm_solver_1_step, 2: solver.dpm_solver_2_step, 3: solver.dpm_solver_3_step}
        for i, order in enumerate(orders):
            x = refl(x, i)
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = K.get_ancestral_step(solver.sigma(t), solver.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, solver.t(sd))
                su = (solver.sigma(t_next) ** 2 - solver.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.
            eps, eps_cache = solver.eps({}, 'eps', x, t)
            if callback is not None:
                callback({'x': x, 'i': i, 't': t, 't_up': t, 'denoised': x - solver.sigma(t) * eps,
                          'sigma': solver.sigma(t), 'sigma_hat': solver.sigma(t)})
            x, _ = steps[order](x, t, t_next_, eps_cache=eps_cache)
            x = x + su * s_noise * noise_sampler(solver.sigma(t), solver.sigma(t_next))
    return x


def restart_schedule(sigmas, restart_list=None):
    """A1111's Restart plan: ``(sigmas, [(sigma, sigma_next, main step index or None), ...])``.

    ``restart_list=None`` with 20 or more steps swaps in a shorter Karras schedule and restarts at sigma 0.1 back
    up to 2 (A1111's automatic choice); the segments of a restart carry ``None``.
    """
    K = _kdiff.sampling()
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = K.get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(),
                                         sigmas[0].item(), device=sigmas.device)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1], i))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < i + 1:
                sigma_restart = K.get_sigmas_karras(restart_steps, sigmas[i + 1].item(), sigmas[max_idx].item(),
                                                    device=sigmas.device)[:-1]
                step_list.extend((s, s_next, None) for _ in range(restart_times)
                                 for s, s_next in zip(sigma_restart[:-1], sigma_restart[1:]))
    return sigmas, step_list


@_w2sd_signature
@torch.no_grad()
def sample_w2sd_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                        restart_list=None, **w2sd):
    """A1111's Restart sampler (Heun steps, re-noised restarts) with reflections before the steps of its main
    schedule; the restart segments are not reflected. ``lam`` counts main steps."""
    check_sigmas(sigmas)
    sigmas, step_list = restart_schedule(sigmas, restart_list)
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    last_sigma = None
    for step_id, (sigma, sigma_next, i) in enumerate(tqdm(step_list, disable=disable)):
        if last_sigma is None:
            last_sigma = sigma
        elif last_sigma < sigma:
            x = x + _kdiff.randn_like(x) * s_noise * (sigma ** 2 - last_sigma ** 2) ** 0.5
        if i is not None:
            x = refl(x, i)
        x_next, denoised = _heun_step(model, x, sigma, sigma_next, extra_args, s_in)
        if callback is not None:  # A1111 reports sigma_next as 'sigma'
            callback({'x': x, 'i': step_id, 'sigma': sigma_next, 'sigma_hat': sigma, 'denoised': denoised})
        x, last_sigma = x_next, sigma_next
    return x


@_w2sd_signature
@torch.no_grad()
def sample_w2sd_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                        s_tmax=float('inf'), s_noise=1., **w2sd):
    """Forge's HeunPP2 (Heun, then a third-order rule using sigma_{i+2}) with W2SD reflections."""
    K = _kdiff.sampling()
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    s_end = sigmas[-1]
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = K.to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat, 'denoised': denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = K.to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
        d_3 = K.to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
        w = 3 * sigmas[0]
        w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _ipndm_step(order, i, sigmas, x, d, b):
    """IPNDM's fixed-step Adams-Bashforth step from the derivative ``d`` and the history ``b`` (newest last), in the
    host's operation order, so that off is bit for bit."""
    h = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return x + h * d
    if order == 2:
        return x + h * (3 * d - b[-1]) / 2
    if order == 3:
        return x + h * (23 * d - 16 * b[-1] + 5 * b[-2]) / 12
    return x + h * (55 * d - 59 * b[-1] + 37 * b[-2] - 9 * b[-3]) / 24


def _ipndm_v_step(order, i, sigmas, x, d, b):
    """IPNDM_V's variable-step step (zju-pi diff-solvers, as Forge ships it)."""
    h_n = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return x + h_n * d
    h_n_1 = sigmas[i] - sigmas[i - 1]
    if order == 2:
        return x + h_n * ((2 + (h_n / h_n_1)) / 2 * d + -(h_n / h_n_1) / 2 * b[-1])
    h_n_2 = sigmas[i - 1] - sigmas[i - 2]
    temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return x + h_n * (((2 + (h_n / h_n_1)) / 2 + temp) * d
                          + (-(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp) * b[-1] + temp * h_n_1 / h_n_2 * b[-2])
    h_n_3 = sigmas[i - 2] - sigmas[i - 3]
    weight = (1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
    temp2 = weight * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    r = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return x + h_n * (((2 + (h_n / h_n_1)) / 2 + temp + temp2) * d
                      + (-(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp - (1 + (h_n_1 / h_n_2) + r) * temp2) * b[-1]
                      + (temp * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + r * (1 + h_n_2 / h_n_3)) * temp2) * b[-2]
                      + -temp2 * r * h_n_1 / h_n_2 * b[-3])


def _multistep(step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd):
    """The loop of Forge's IPNDM, IPNDM_V and DEIS: ``x = step(order, i, sigmas, x, d, history)``, with the
    derivative history carried across reflections, as in ``sample_w2sd_lms``."""
    model, extra_args, refl, s_in = _setup(model, x, sigmas, extra_args, w2sd)
    buffer = []  # previous derivatives, newest last
    for i in trange(len(sigmas) - 1, disable=disable):
        x = refl(x, i)
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        d = (x - denoised) / sigmas[i]
        x = step(min(max_order, i + 1), i, sigmas, x, d, buffer)
        buffer = (buffer + [d])[-(max_order - 1):]
    return x


@_w2sd_signature
@torch.no_grad()
def sample_w2sd_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, **w2sd):
    """Forge's IPNDM (fixed-step Adams-Bashforth on the derivative, up to 4th order) with W2SD reflections."""
    return _multistep(_ipndm_step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd)


@_w2sd_signature
@torch.no_grad()
def sample_w2sd_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, **w2sd):
    """Forge's IPNDM_V (variable-step Adams-Bashforth, up to 4th order) with W2SD reflections."""
    return _multistep(_ipndm_v_step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd)


@_w2sd_signature
@torch.no_grad()
def sample_w2sd_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode='tab',
                     **w2sd):
    """Forge's DEIS (exponential-integrator multistep, coefficients from the host's ``k_diffusion.deis``) with W2SD
    reflections; the derivative history carries across reflections."""
    check_sigmas(sigmas)  # before the host's coefficient code sees them
    K = _kdiff.sampling()
    deis = importlib.import_module(K.__name__.rpartition('.')[0] + '.deis')
    coeff_list = deis.get_deis_coeff_list(sigmas, max_order, deis_mode=deis_mode)

    def step(order, i, sigmas, x, d, b):
        if order == 1 or sigmas[i + 1] <= 0:
            return x + (sigmas[i + 1] - sigmas[i]) * d
        x = x + coeff_list[i][0] * d
        for c, b_j in zip(coeff_list[i][1:], reversed(b)):
            x = x + c * b_j
        return x
    return _multistep(step, model, x, sigmas, extra_args, callback, disable, max_order, w2sd)


# Host function name -> twin. A1111's Restart is a callable in the host's table, keyed by its __name__.
TWINS = {'sample_dpm_fast': sample_w2sd_dpm_fast, 'restart_sampler': sample_w2sd_restart,
         'sample_heunpp2': sample_w2sd_heunpp2, 'sample_ipndm': sample_w2sd_ipndm,
         'sample_ipndm_v': sample_w2sd_ipndm_v, 'sample_deis': sample_w2sd_deis}

# Host samplers W2SD cannot wrap, and why (shown in the console at startup and in docs/sd_webui.md).
REFUSED = {
    'sample_dpm_adaptive': 'adaptive step size: error control picks the steps from the trajectory, so there is no '
                           'fixed schedule to reflect on, and a reflected x would change which steps are taken',
}
