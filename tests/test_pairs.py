import threading

import pytest
import torch
from torch import nn

from w2sd_samplers import guidance, lora, moe, pairs, toy
from w2sd_samplers.cfg import CFGDenoiser
from w2sd_samplers.nfe import CallCounter
from w2sd_samplers.reflect import reflect
from w2sd_samplers.sampling import sample_w2sd_euler
from rounding import LinearMagnitudes, reorder_bound

K = pytest.importorskip('k_diffusion.sampling')


def inner(x, sigma, c, ctrl=None):
    # A conditional denoiser acting row by row; ``ctrl`` stands for an optional extra input (ControlNet residuals).
    out = x / (1 + sigma[:, None] ** 2) + torch.tanh(x) * c
    return out if ctrl is None else out + 0.3 * ctrl


class Rows:
    """Counts calls and rows (UNet passes) of a denoiser."""

    def __init__(self, denoiser):
        self.denoiser, self.calls, self.rows = denoiser, 0, 0

    def __call__(self, x, sigma, **extra_args):
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        return self.denoiser(x, sigma, **extra_args)


def conds(b=3, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'c': torch.randn(b, dim, generator=g)}, {'c': torch.zeros(b, dim)}, torch.randn(b, dim, generator=g)


def snapshot(d):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


# Rounding steps on the longest path of one call (a sum of k terms counts k, tanh/exp 4; see rounding.gamma):
# inner: sigma^2, +1, /, tanh, *, + (9); Net: x + c, fc1 (4 + bias; its LoRA branch 4 + 2 + scale + add), tanh,
# fc2 (16 + bias; LoRA 16 + 2 + 2), * 0.3, + the sigma term (36); TinyDiTMoE: the sigma scaling (4), then per
# block gate (8), softmax (4 + 6 + 1), expert (8 + bias), weight, sum of 2 experts, + shared, residual (33 x 2).
# CFG's combination adds 3; each sampler step (Euler, the anchored reflection) 10.
OPS_PER_CALL = {'guidance': 9 + 3 + 10, 'prompt': 9 + 3 + 10, 'lora': 36 + 3 + 10, 'moe': 70 + 10}


def test_guidance_roles_are_cfg_at_the_two_scales():
    cond, uncond, x = conds()
    sigma = torch.full([3], 1.7)
    r = pairs.guidance(inner, cond, uncond, strong_scale=5.5, weak_scale=-2.)
    d_c, d_u = inner(x, sigma, **cond), inner(x, sigma, **uncond)
    main, ea = r.leg('main')
    torch.testing.assert_close(main(x, sigma, **ea), d_u + 5.5 * (d_c - d_u))
    weak, ea = r.leg('weak')
    torch.testing.assert_close(weak(x, sigma, **ea), d_u - 2. * (d_c - d_u))
    assert r.strong_is_main and r.leg('strong')[0] is r.main


def test_guidance_pair_samples_like_hand_built_roles():
    cond, uncond, x = conds()
    sigmas = K.get_sigmas_karras(6, 0.1, 10., device='cpu').double()
    x = x.double() * 10
    cond, uncond = {'c': cond['c'].double()}, {'c': uncond['c'].double()}
    r = pairs.guidance(inner, cond, uncond)
    got = sample_w2sd_euler(r.main, x, sigmas, extra_args=r.extra_args, disable=True, **r.w2sd())
    cfg = CFGDenoiser(inner)
    ea = {'cond': cond, 'uncond': uncond, 'cond_scale': 5.5}
    want = sample_w2sd_euler(cfg, x, sigmas, extra_args=ea, disable=True, weak=cfg,
                             weak_extra_args={**ea, 'cond_scale': 0.})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize('form', ['paper', 'anchored'])
def test_guidance_pair_shares_the_batched_forward_when_anchored(form):
    cond, uncond, x = conds()
    sigmas = K.get_sigmas_karras(8, 0.1, 10.)
    counted = Rows(inner)
    r = pairs.guidance(counted, cond, uncond)
    got = sample_w2sd_euler(r.main, x * 10, sigmas, extra_args=r.extra_args, disable=True, **r.w2sd(form=form))
    plain = Rows(inner)
    cfg = CFGDenoiser(plain)
    ea = {'cond': cond, 'uncond': uncond, 'cond_scale': 5.5}
    want = sample_w2sd_euler(cfg, x * 10, sigmas, extra_args=ea, disable=True, weak=cfg,
                             weak_extra_args={**ea, 'cond_scale': 0.}, form=form)
    # the same sums over other batches: each of the n + 2 lam calls of `want` feeds the result (OPS_PER_CALL)
    torch.testing.assert_close(got, want, rtol=0, atol=reorder_bound(plain.calls * OPS_PER_CALL['guidance'], x * 10,
                                                                     got, want))
    n, lam, b = len(sigmas) - 1, len(sigmas) - 2, x.shape[0]
    # Without sharing: per reflected step strong (2B rows), weak (B rows), main (2B rows).
    assert (plain.calls, plain.rows) == (n + 2 * lam, 2 * b * n + 3 * b * lam)
    if form == 'anchored':  # strong and weak at the same (x, sigma): one batched forward serves both legs
        assert (counted.calls, counted.rows) == (n + lam, 2 * b * (n + lam))
    else:
        assert (counted.calls, counted.rows) == (plain.calls, plain.rows)


def test_anchored_reflection_is_identity_for_equal_roles_and_matches_its_formula():
    gmm, weak = toy.four_modes([.3, .2, .2, .3]), toy.four_modes([.1, .4, .1, .4])
    x = torch.randn(16, 2, dtype=torch.float64) * 3
    sigma, sigma_next = torch.tensor(3., dtype=torch.float64), torch.tensor(2.2, dtype=torch.float64)
    assert torch.equal(reflect(x, sigma, sigma_next, gmm, gmm, form='anchored'), x)
    s = sigma * torch.ones(16, dtype=torch.float64)
    want = x + (sigma - sigma_next) / sigma_next * (gmm(x, s) - weak(x, s))
    torch.testing.assert_close(reflect(x, sigma, sigma_next, gmm, weak, form='anchored'), want, rtol=0, atol=1e-12)
    # A guidance pair with equal scales is the same denoiser twice: the anchored reflection leaves x as it is.
    cond, uncond, xc = conds()
    r = pairs.guidance(inner, cond, uncond, strong_scale=3., weak_scale=3.)
    kw = r.w2sd()
    strong, weak_, ea_w = r.main, kw['weak'], kw['weak_extra_args']
    assert torch.equal(reflect(xc, sigma.float(), sigma_next.float(), strong, weak_, r.extra_args, ea_w,
                               form='anchored'), xc)


def test_condition_pair_runs_reflection_legs_without_uncond_198_passes():
    cond, uncond, x = conds(b=1)
    weak_cond = {'c': -cond['c']}
    counted = Rows(inner)
    r = pairs.prompt(counted, cond, weak_cond, uncond)
    sigma = torch.full([1], 2.)
    weak, ea = r.leg('weak')
    torch.testing.assert_close(weak(x, sigma, **ea), inner(x, sigma, **weak_cond))
    strong, ea = r.leg('strong')
    torch.testing.assert_close(strong(x, sigma, **ea), inner(x, sigma, **cond))
    counted.rows = 0
    sigmas = K.get_sigmas_karras(50, 0.03, 14.6)
    sample_w2sd_euler(r.main, x * 14.6, sigmas, extra_args=r.extra_args, disable=True, **r.w2sd())
    assert counted.rows == 198  # the paper's 50-step setting: 2T + 2 lambda UNet passes (the official code: 296)


def test_condition_without_uncond_is_plain_and_rejects_scales():
    cond, _, x = conds()
    weak_cond = {'c': cond['c'] * 0}
    r = pairs.condition(inner, cond, weak_cond)
    # Both legs on one network: one SharedCFG without CFG, so that they can share a forward.
    assert r.main is r.weak and r.main.inner is inner
    assert r.extra_args == {'cond': cond, 'uncond': None, 'cond_scale': 1.}
    sigma = torch.full([3], 2.)
    torch.testing.assert_close(r.main(x, sigma, **r.extra_args), inner(x, sigma, **cond))
    torch.testing.assert_close(r.weak(x, sigma, **r.weak_extra_args), inner(x, sigma, **weak_cond))
    with pytest.raises(ValueError, match='uncond'):
        pairs.condition(inner, cond, cond, main_scale=5.5)


def test_weights_pair_and_main_override():
    strong, weak, main = toy.four_modes([.25] * 4), toy.four_modes([.1, .4, .1, .4]), toy.four_modes([.4, .1, .4, .1])
    r = pairs.weights(strong, weak)
    assert (r.main, r.weak, r.strong_is_main, r.extra_args) == (strong, weak, True, {})
    r = pairs.weights(strong, weak, main=main)
    assert r.main is main and r.leg('strong')[0] is strong


def test_pipeline_pair_adds_the_extra_inputs_to_strong_and_main_only():
    cond, uncond, x = conds()
    ctrl = torch.randn(3, 4)
    r = pairs.pipeline(inner, {'ctrl': ctrl}, cond, uncond)
    sigma = torch.full([3], 0.9)
    d, ea = r.leg('strong')
    d_c, d_u = inner(x, sigma, **cond, ctrl=ctrl), inner(x, sigma, **uncond, ctrl=ctrl)
    torch.testing.assert_close(d(x, sigma, **ea), d_u + 0.5 * (d_c - d_u))
    torch.testing.assert_close(r.main(x, sigma, **r.extra_args), d_u + 5.5 * (d_c - d_u))
    d, ea = r.leg('weak')
    d_c, d_u = inner(x, sigma, **cond), inner(x, sigma, **uncond)
    torch.testing.assert_close(d(x, sigma, **ea), d_u + 0.5 * (d_c - d_u))


@pytest.mark.parametrize('with_uncond', [True, False])
def test_pipeline_pair_runs_anchored_and_under_difference_guidance_like_its_separate_legs(with_uncond):
    """The strong legs carry an input the weak one lacks, so their conditioning cannot share one batch: the legs run
    one forward per layout. Each forward sees the same batch as its leg alone and the same CFG arithmetic, so the
    results are equal to the separate-leg computation exactly."""
    cond, uncond, x = conds()
    uncond = uncond if with_uncond else None
    ctrl = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    counted = Rows(inner)
    r = pairs.pipeline(counted, {'ctrl': ctrl}, cond, uncond)
    cfg = CFGDenoiser(inner)
    if with_uncond:
        strong = dict(cond={**cond, 'ctrl': ctrl}, uncond={**uncond, 'ctrl': ctrl}, cond_scale=0.5)
        separate = pairs.Roles(main=cfg, extra_args={**strong, 'cond_scale': 5.5}, strong=cfg,
                               strong_extra_args=strong, weak=cfg,
                               weak_extra_args=dict(cond=cond, uncond=uncond, cond_scale=0.5))
    else:
        separate = pairs.Roles(main=inner, extra_args={**cond, 'ctrl': ctrl}, weak=inner, weak_extra_args=cond)
    sigmas = K.get_sigmas_karras(6, 0.1, 10.)
    got = sample_w2sd_euler(r.main, x * 10, sigmas, extra_args=r.extra_args, disable=True, **r.w2sd(form='anchored'))
    want = sample_w2sd_euler(separate.main, x * 10, sigmas, extra_args=separate.extra_args, disable=True,
                             **separate.w2sd(form='anchored'))
    assert torch.equal(got, want)
    sigma = torch.full([3], 2.)
    counted.calls = 0
    got = guidance.difference_guidance(r, 1.)(x, sigma, **r.extra_args)
    assert torch.equal(got, guidance.difference_guidance(separate, 1.)(x, sigma, **separate.extra_args))
    assert counted.calls == 2  # main and strong (same inputs) in one forward, the weak leg in another


def test_compose_sums_the_differences_at_2k_minus_1_calls():
    counter = CallCounter()
    gmm = [counter.wrap(toy.four_modes(w), str(k)) for k, w in
           enumerate(([.25] * 4, [.1, .4, .1, .4], [.3, .3, .2, .2], [.4, .1, .1, .4], [.2, .2, .3, .3]))]
    r = pairs.compose(pairs.weights(gmm[0], gmm[1]), pairs.weights(gmm[2], gmm[3]), pairs.weights(gmm[4], gmm[1]))
    x, sigma = torch.randn(5, 2, dtype=torch.float64) * 2, torch.full([5], 1.1, dtype=torch.float64)
    d = [g(x, sigma) for g in gmm]
    counter.counts.clear()
    (strong, ea_s), (weak, ea_w) = r.leg('strong'), r.leg('weak')
    diff = strong(x, sigma, **ea_s) - weak(x, sigma, **ea_w)
    torch.testing.assert_close(diff, d[0] - d[1] + d[2] - d[3] + d[4] - d[1])
    assert counter.total == 1 + (2 * 3 - 1)  # the strong leg, then the weak leg over K = 3 pairs
    assert r.main is gmm[0] and r.strong_is_main


def test_compose_successive_reflects_once_per_pair_in_order():
    gmm = [toy.four_modes(w) for w in ([.25] * 4, [.1, .4, .1, .4], [.3, .3, .2, .2], [.4, .1, .1, .4])]
    a, b = pairs.weights(gmm[0], gmm[1]), pairs.weights(gmm[2], gmm[3])
    r = pairs.compose(a, b, successive=True)
    sigmas = K.get_sigmas_karras(5, 0.1, 10.).double()
    x0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    x = x0
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        if sn > 0 and i < len(sigmas) - 2:
            x = reflect(reflect(x, s, sn, gmm[0], gmm[1]), s, sn, gmm[2], gmm[3])
        x = x + (sn - s) * (x - gmm[0](x, s * torch.ones(len(x), dtype=torch.float64))) / s
    ours = sample_w2sd_euler(r.main, x0, sigmas, extra_args=r.extra_args, disable=True, **r.w2sd())
    torch.testing.assert_close(ours, x)
    with pytest.raises(TypeError, match='then must be'):
        sample_w2sd_euler(gmm[0], x0, sigmas, disable=True, weak=gmm[1], then=[(gmm[2], gmm[3])])


def test_sampling_never_mutates_the_callers_args():
    cond, uncond, x = conds()
    before = snapshot(cond), snapshot(uncond), x.clone()
    r = pairs.guidance(inner, cond, uncond)
    ea_before = dict(r.extra_args)
    sample_w2sd_euler(r.main, x, K.get_sigmas_karras(4, 0.1, 10.), extra_args=r.extra_args, disable=True,
                      **r.w2sd(form='anchored'))
    for old, new in zip(before[:2], (cond, uncond)):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert torch.equal(before[2], x) and r.extra_args.keys() == ea_before.keys()


def test_errors_name_the_argument():
    cond, uncond, _ = conds()
    with pytest.raises(TypeError, match='model'):
        pairs.guidance(None, cond, uncond)
    with pytest.raises(TypeError, match='cond'):
        pairs.guidance(inner, [1], uncond)
    with pytest.raises(ValueError, match='strong_scale'):
        pairs.guidance(inner, cond, uncond, strong_scale=float('nan'))
    with pytest.raises(ValueError, match='roles'):
        pairs.guidance(inner, cond, uncond).w2sd(weak=inner)
    with pytest.raises(TypeError, match='Roles.weak'):
        pairs.Roles(main=inner, weak=3)
    with pytest.raises(TypeError, match='Roles'):
        pairs.compose(inner)


def test_weights_pair_with_guidance_difference_table6_and_shared_args():
    cond, uncond, x = conds()

    def strong(x, sigma, c, t):
        return inner(x, sigma, c) + t

    def other(x, sigma, c, t):  # a second "checkpoint"
        return inner(x, sigma, c) * t

    r = pairs.weights(strong, other, cond, uncond, strong_scale=5.5, weak_scale=0., shared={'t': 0.5})
    sigma = torch.full([3], 1.2)
    (s, s_ea), (w, w_ea) = r.leg('strong'), r.leg('weak')
    d_c, d_u = inner(x, sigma, **cond) + .5, inner(x, sigma, **uncond) + .5
    torch.testing.assert_close(s(x, sigma, **s_ea), d_u + 5.5 * (d_c - d_u))
    torch.testing.assert_close(w(x, sigma, **w_ea), other(x, sigma, **uncond, t=.5))
    assert r.strong_is_main  # main at 5.5 is the strong leg


def test_roles_take_host_style_extra_args_functions():
    cond, uncond, x = conds()
    cfg = CFGDenoiser(inner)
    r = pairs.Roles(main=cfg, weak=cfg, extra_args={'cond': cond, 'uncond': uncond, 'cond_scale': 3.},
                    weak_extra_args=lambda ea: {**ea, 'cond_scale': 0.})
    swapped = {'cond': uncond, 'uncond': cond, 'cond_scale': 3.}  # a host swapping conds mid-run
    weak, ea = r.leg('weak', swapped)
    sigma = torch.full([3], 1.)
    torch.testing.assert_close(weak(x, sigma, **ea), inner(x, sigma, **cond))
    assert r.leg('strong', swapped) == (cfg, swapped) and swapped['cond_scale'] == 3.


def test_shared_cfg_joint_is_one_forward_over_distinct_branches_and_keeps_no_state():
    cond, uncond, x = conds()
    weak_cond = {'c': -cond['c']}
    counted = Rows(inner)
    cfg = pairs.SharedCFG(counted)
    sigma = torch.full([3], 1.)
    legs = [dict(cond=cond, uncond=uncond, cond_scale=5.5), dict(cond=cond, uncond=uncond, cond_scale=0.),
            dict(cond=weak_cond, uncond=uncond, cond_scale=1.)]
    got = cfg.joint(x, sigma, legs)
    d_c, d_u, d_w = (inner(x, sigma, **c) for c in (cond, uncond, weak_cond))
    for out, want in zip(got, (d_u + 5.5 * (d_c - d_u), d_u, d_w)):
        # inner's operations (9) on another batch, then CFG's (3)
        torch.testing.assert_close(out, want, rtol=0, atol=reorder_bound(9 + 3, x, d_c, d_u, d_w, out))
    assert (counted.calls, counted.rows) == (1, 9)  # branches uncond, cond, weak cond: 3B rows in one forward
    assert vars(cfg).keys() == {'inner', 'variants'}
    with pytest.raises(ValueError, match='uncond'):
        cfg(x, sigma, cond=cond, uncond=None, cond_scale=2.)


class Net(nn.Module):
    """A conditional denoiser with Linear layers acting row by row (a LoRA target)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, x, sigma, c):
        return x / (1 + sigma[:, None] ** 2) + 0.3 * self.fc2(torch.tanh(self.fc1(x + c)))


def lora_net():
    net = Net()
    g = torch.Generator().manual_seed(1)
    state = {f'lora_unet_{n}.lora_{p}.weight': torch.randn(*shape, generator=g) * 0.5 for n, p, shape in
             (('fc1', 'down', (2, 4)), ('fc1', 'up', (16, 2)), ('fc2', 'down', (2, 16)), ('fc2', 'up', (4, 2)))}
    return net, lora.SwitchableLoRA(net, state)


def batched_and_unbatched(kind, b=3):
    """(batched roles, unbatched roles with the same legs, counted network) for one shared-network pair."""
    cond, uncond, x = conds(b)
    if kind == 'lora':
        net, sl = lora_net()
        counted = Rows(net)
        legs = [lora.scaled(counted, sl, s) for s in (0.8, -1.5)]
        return (pairs.lora(counted, sl, cond, uncond),
                pairs.weights(legs[0], legs[1], cond, uncond, main=legs[0]), counted, x)
    if kind == 'moe':
        from test_moe import TinyDiTMoE, DIM
        torch.manual_seed(0)
        model = TinyDiTMoE().eval()
        routing = moe.ExpertRouting(model)
        counted = Rows(model)
        legs = [moe.routed(counted, routing, m) for m in ('top', 'bottom')]
        return pairs.moe(counted, routing), pairs.weights(*legs), counted, torch.randn(b, 2, DIM)
    counted = Rows(inner)
    if kind == 'prompt':
        weak_cond = {'c': -cond['c']}
        cfg = CFGDenoiser(counted)
        ea = dict(cond=cond, uncond=uncond, cond_scale=5.5)
        unbatched = pairs.Roles(main=cfg, extra_args=ea, strong=cfg, strong_extra_args={**ea, 'cond_scale': 1.},
                                weak=cfg, weak_extra_args=dict(cond=weak_cond, uncond=uncond, cond_scale=1.))
        return pairs.prompt(counted, cond, weak_cond, uncond), unbatched, counted, x
    cfg = CFGDenoiser(counted)
    ea = dict(cond=cond, uncond=uncond, cond_scale=5.5)
    return (pairs.guidance(counted, cond, uncond),
            pairs.Roles(main=cfg, extra_args=ea, weak=cfg, weak_extra_args={**ea, 'cond_scale': 0.}), counted, x)


@pytest.mark.parametrize('kind', ['guidance', 'prompt', 'lora', 'moe'])
def test_anchored_legs_on_one_network_run_as_one_forward_equal_to_separate_legs(kind):
    batched, unbatched, counted, x = batched_and_unbatched(kind)
    sigmas = K.get_sigmas_karras(6, 0.1, 10.)
    n, lam = len(sigmas) - 1, len(sigmas) - 2
    runs, seen = {}, []
    network = counted.denoiser if isinstance(counted.denoiser, nn.Module) else nn.Module()
    with LinearMagnitudes(network) as sums:
        for name, r in (('unbatched', unbatched), ('batched', batched)):
            counted.calls = counted.rows = 0
            runs[name] = sample_w2sd_euler(r.main, x * 10, sigmas, extra_args=r.extra_args, disable=True,
                                           callback=lambda d: seen.extend((d['x'], d['denoised'])),
                                           **r.w2sd(form='anchored'))
            runs[name + ' calls'] = counted.calls
    # every call of the unbatched run feeds the result: its n + 2 lam calls in sequence at most
    bound = reorder_bound(runs['unbatched calls'] * OPS_PER_CALL[kind], *seen, *sums, runs['unbatched'])
    torch.testing.assert_close(runs['batched'], runs['unbatched'], rtol=0, atol=bound)
    plain = K.sample_euler(unbatched.main, x * 10, sigmas, extra_args=unbatched.extra_args, disable=True)
    assert (plain - runs['unbatched']).abs().max() > 100 * bound     # a lost or swapped leg would show
    assert runs['unbatched calls'] == n + 2 * lam
    assert runs['batched calls'] == n + lam  # T + lambda forward launches, not T + 2 lambda
    # ... and difference guidance: all its legs in one forward
    counted.calls = 0
    sigma = torch.full([len(x)], 2.)
    with LinearMagnitudes(network) as sums:
        got = guidance.difference_guidance(batched, 1.)(x, sigma, **batched.extra_args)
        assert counted.calls == 1
        want = guidance.difference_guidance(unbatched, 1.)(x, sigma, **unbatched.extra_args)
    # one call per leg, then D_main + (D_strong - D_weak): 3 more
    torch.testing.assert_close(got, want, rtol=0, atol=reorder_bound(OPS_PER_CALL[kind] + 3, x, want, *sums))


def test_a_lora_pair_shared_by_two_threads_gives_each_its_single_thread_result():
    r, _, _, x = batched_and_unbatched('lora')
    sigmas = K.get_sigmas_karras(4, 0.1, 10.)
    options = {'paper': r.w2sd(), 'anchored': r.w2sd(form='anchored')}

    def run(form):
        return sample_w2sd_euler(r.main, x * 10, sigmas, extra_args=r.extra_args, disable=True, **options[form])
    alone = {form: run(form) for form in options}
    results, barrier = {form: [] for form in options}, threading.Barrier(2)

    def work(form):
        barrier.wait()
        results[form] += [torch.equal(run(form), alone[form]) for _ in range(20)]
    threads = [threading.Thread(target=work, args=(f,)) for f in options]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results['paper']) and all(results['anchored']) and len(results['paper']) == 20
