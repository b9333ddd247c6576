"""Flow adapters on tiny random-weight diffusers models, checked against diffusers' FlowMatchEulerDiscreteScheduler."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip('diffusers')
K = pytest.importorskip('k_diffusion.sampling')

import rounding  # noqa: E402
from w2sd_samplers.adapters import flow  # noqa: E402
from w2sd_samplers.adapters.vp import cast_tree  # noqa: E402
from w2sd_samplers.cfg import CFGDenoiser  # noqa: E402
from w2sd_samplers.nfe import CallCounter  # noqa: E402
from w2sd_samplers.sampling import sample_w2sd_euler  # noqa: E402


def rel(a, b):
    return float((a - b).norm() / b.norm())


def tiny_sd3():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16).eval()
    conds = [dict(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 16))
             for _ in range(2)]
    return model, flow.sd3_denoiser(model), torch.randn(2, 4, 8, 8), conds, {}


def tiny_flux(guidance_embeds=True):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6)).eval()
    conds = [dict(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 16))
             for _ in range(2)]
    return model, flow.flux_denoiser(model), torch.randn(2, 4, 8, 8), conds, {'guidance': 3.5}


def tiny_wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32).eval()
    conds = [dict(encoder_hidden_states=torch.randn(2, 5, 32)) for _ in range(2)]
    return model, flow.wan_denoiser(model), torch.randn(2, 4, 3, 8, 8), conds, {}


def velocity(model, kind, x_t, timestep, cond, shared):
    """The transformer called exactly the way its diffusers pipeline calls it (timestep = scheduler timestep)."""
    b = x_t.shape[0]
    if kind == 'sd3':
        return model(hidden_states=x_t, timestep=timestep.expand(b), **cond, return_dict=False)[0]
    if kind == 'wan':
        return model(hidden_states=x_t, timestep=timestep.expand(b), **cond, return_dict=False)[0]
    h, w = x_t.shape[-2:]
    tokens = diffusers.FluxPipeline._pack_latents(x_t, b, x_t.shape[1], h, w)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    v = model(hidden_states=tokens, timestep=timestep.expand(b) / 1000, guidance=torch.full([b], shared['guidance']),
              encoder_hidden_states=cond['encoder_hidden_states'], pooled_projections=cond['pooled_projections'],
              txt_ids=torch.zeros(cond['encoder_hidden_states'].shape[1], 3), img_ids=img_ids, return_dict=False)[0]
    # The pipeline's unpacker works in pixels (vae factor 8 and the factor 2 of packing).
    return diffusers.FluxPipeline._unpack_latents(v, h * 8, w * 8, 8)


def diffusers_loop(model, kind, scheduler, x_t, cond, uncond, scale, shared):
    """The pipeline's denoising loop: CFG on the velocity, then scheduler.step."""
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = velocity(model, kind, x_t, t, cond, shared)
            if scale != 1:
                v_u = velocity(model, kind, x_t, t, uncond, shared)
                v = v_u + scale * (v - v_u)
            x_t = scheduler.step(v, t, x_t, return_dict=False)[0]
    return x_t


FAMILIES = {'sd3': (tiny_sd3, 3.0, 4.0), 'flux': (tiny_flux, None, 1.0), 'wan': (tiny_wan, 5.0, 4.0)}


def native_scheduler(kind, shift, n, x):
    """The scheduler as each pipeline sets it up: SD3/Wan constant shift, Flux dynamic shift on its sigma grid."""
    if kind == 'flux':
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        seq = (x.shape[-2] // 2) * (x.shape[-1] // 2)
        mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(seq)
        sched.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).tolist(), mu=mu)
        return sched, math.exp(mu)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    return sched, shift


@pytest.mark.parametrize('kind', FAMILIES)
def test_denoiser_is_x_t_minus_t_v(kind):
    make, _, _ = FAMILIES[kind]
    model, denoiser, eps, (cond, _), shared = make()
    x0 = torch.randn_like(eps)
    sigma = torch.tensor([0.5, 40.])
    t = sigma / (1 + sigma)
    t_ = t.view(-1, *[1] * (eps.ndim - 1))
    x_t = (1 - t_) * x0 + t_ * eps
    with torch.no_grad():
        v = velocity(model, kind, x_t, t * 1000, cond, shared)
        d = denoiser(x_t / (1 - t_), sigma, **cond, **shared)
    torch.testing.assert_close(d, x_t - t_ * v, rtol=1e-5, atol=1e-5)
    assert d.dtype == torch.float32 and d.shape == eps.shape


@pytest.mark.parametrize('kind', FAMILIES)
def test_euler_reproduces_flow_match_euler_scheduler(kind):
    make, shift, scale = FAMILIES[kind]
    model, denoiser, eps, (cond, uncond), shared = make()
    n = 6
    native, s = native_scheduler(kind, shift, n, eps)
    sigmas = flow.scheduler_sigmas(native)
    t = sigmas / (1 + sigmas)
    # The native grid starts at t = 1 (sigma infinite): the only change is the cap there.
    assert float(native.sigmas[0]) == 1 and float(t[0]) == pytest.approx(flow.T_MAX, abs=1e-7)
    torch.testing.assert_close(t[1:], native.sigmas[1:], rtol=1e-5, atol=1e-7)
    # Our uniform grid is Flux's pipeline grid (and SD3/Wan shift the same way).
    if kind == 'flux':
        torch.testing.assert_close(flow.flow_sigmas(n, s), sigmas, rtol=1e-5, atol=0)

    if scale == 1:
        model_fn, extra_args = denoiser, {**cond, **shared}
    else:
        model_fn = CFGDenoiser(denoiser)
        extra_args = dict(cond=cond, uncond=uncond, cond_scale=scale, **shared)
    ours = K.sample_euler(model_fn, eps * sigmas[0], sigmas, extra_args=extra_args, disable=True)

    # Same grid in diffusers: its own shift applied to the un-shifted capped times.
    capped = diffusers.FlowMatchEulerDiscreteScheduler(shift=s)
    capped.set_timesteps(sigmas=(t[:-1] / (s - (s - 1) * t[:-1])).tolist())
    torch.testing.assert_close(capped.sigmas, t, rtol=1e-6, atol=1e-7)
    ref = diffusers_loop(model, kind, capped, eps * t[0], cond, uncond, scale, shared)
    assert rel(ours, ref) < 1e-4

    # Against the untouched native schedule (t = 1 start) the cap costs about 1 - T_MAX.
    ref_native = diffusers_loop(model, kind, native, eps, cond, uncond, scale, shared)
    assert rel(ours, ref_native) < 3 * (1 - flow.T_MAX)


def test_cfg_layouts_batch_like_separate_calls():
    # Flux's shared guidance and default ids must follow CFG's doubled batch; SD3's two tensors per branch batch.
    # The network runs in float64, so batched and separate forwards differ by float64 rounding only.
    for make in (tiny_flux, tiny_sd3):
        model, denoiser, eps, conds, shared = make()
        model.double()
        cond, uncond = (cast_tree(c, torch.float64) for c in conds)
        x, sigma = eps * 3, torch.tensor([3., 0.7])
        with torch.no_grad(), rounding.NetworkMagnitudes(model) as seen:
            got = CFGDenoiser(denoiser)(x, sigma, cond=cond, uncond=uncond, cond_scale=2.5, **shared)
            d_c, d_u = denoiser(x, sigma, **cond, **shared), denoiser(x, sigma, **uncond, **shared)
        # each branch: x_t - t v with t < 1; CFG's d_u + 2.5 (d_c - d_u) takes 1 + 2 x 2.5 of their errors, then
        # rounds 3 times in float32
        bound = (6 * rounding.float64_net_bound(seen, 1., x.abs() + d_c.abs(), x.abs() + d_u.abs())
                 + rounding.reorder_bound(3, got))
        torch.testing.assert_close(got, d_u + 2.5 * (d_c - d_u), rtol=0, atol=bound)
        assert (d_c - d_u).abs().max() > 1000 * bound  # a swapped or repeated branch would show


def test_flux_guidance_matches_model_kind():
    _, dev, eps, (cond, _), _ = tiny_flux(guidance_embeds=True)
    _, schnell, _, _, _ = tiny_flux(guidance_embeds=False)
    sigma = torch.ones(2)
    with pytest.raises(ValueError, match='guidance-distilled'):
        dev(eps, sigma, **cond)
    with pytest.raises(ValueError, match='no guidance embedding'):
        schnell(eps, sigma, guidance=3.5, **cond)
    with pytest.raises(ValueError, match='even height and width'):
        dev(torch.randn(2, 4, 7, 8), sigma, guidance=1., **cond)
    with torch.no_grad():
        assert not torch.equal(dev(eps, sigma, guidance=1., **cond), dev(eps, sigma, guidance=4., **cond))


def test_pack_roundtrip_and_ids_match_pipeline():
    x = torch.randn(2, 4, 6, 10)
    tokens = flow.pack(x)
    torch.testing.assert_close(tokens, diffusers.FluxPipeline._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0)
    assert torch.equal(flow.unpack(tokens, 6, 10), x)
    assert torch.equal(flow.flux_img_ids(6, 10), diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 5, 'cpu',
                                                                                                   torch.float32))


def test_schedules():
    calc = diffusers.pipelines.flux.pipeline_flux.calculate_shift
    assert flow.flux_shift(128, 128) == pytest.approx(math.exp(calc(64 * 64)))
    assert flow.flux_shift(64, 64) == pytest.approx(math.exp(calc(32 * 32)))
    # The shift multiplies VE sigmas (below the cap).
    s1, s3 = flow.flow_sigmas(8, 1.), flow.flow_sigmas(8, 3.)
    torch.testing.assert_close(s3[1:], 3 * s1[1:], rtol=1e-5, atol=0)
    for kind in ('karras', 'exponential'):
        s = flow.flow_sigmas(10, 3., kind)
        assert len(s) == 11 and float(s[-1]) == 0 and torch.all(s[:-1] > s[1:])
        assert float(s[0]) == pytest.approx(flow.T_MAX / (1 - flow.T_MAX), rel=1e-5)
        assert float(s[-2]) == pytest.approx(3 * flow.T_MIN / (1 - flow.T_MIN), rel=1e-5)
    for bad in (dict(n=0), dict(n=4, shift=0.), dict(n=4, t_max=1.), dict(n=4, kind='cosine')):
        with pytest.raises(ValueError):
            flow.flow_sigmas(**bad)
    with pytest.raises(ValueError, match='set_timesteps'):
        flow.scheduler_sigmas(diffusers.EulerDiscreteScheduler())


def test_wrong_model_types_are_rejected():
    with pytest.raises(TypeError, match='SD3Transformer2DModel'):
        flow.sd3_denoiser(nn.Linear(2, 2))
    with pytest.raises(TypeError, match='FluxTransformer2DModel'):
        flow.flux_denoiser(nn.Linear(2, 2))
    with pytest.raises(TypeError, match='WanTransformer3DModel'):
        flow.wan_denoiser(nn.Linear(2, 2))
    with pytest.raises(TypeError, match='DiT-MoE'):
        flow.ditmoe_flow_denoiser(lambda x, t, y: x)


class StandInDiTMoE(nn.Module):
    """The DiT-MoE repo's calling convention ``forward(x, t, y)`` -> [B, 2C, H, W] (learned-sigma half last)."""

    def __init__(self, channels=4, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.t_embed = nn.Linear(1, 2 * channels)
        self.y_embed = nn.Embedding(num_classes + 1, 2 * channels)

    def forward(self, x, t, y):
        return self.conv(x) * (1 + self.t_embed(t[:, None]))[..., None, None] + self.y_embed(y)[..., None, None]


def test_ditmoe_rf_matches_plain_flow_euler():
    torch.manual_seed(0)
    model = StandInDiTMoE().eval()
    denoiser = flow.ditmoe_flow_denoiser(model)
    y, null = torch.tensor([1, 7]), torch.tensor([10, 10])
    eps, n, scale = torch.randn(2, 4, 8, 8), 9, 4.
    sigmas = flow.flow_sigmas(n, 1.)
    ours = K.sample_euler(CFGDenoiser(denoiser), eps * sigmas[0], sigmas, disable=True,
                          extra_args=dict(cond={'class_labels': y}, uncond={'class_labels': null}, cond_scale=scale))
    # The RF repo's sampler: z <- z + (t_next - t) v with raw t fed to the model, v from the first C channels.
    t = torch.tensor([flow.T_MAX] + [i / n for i in range(n - 1, 0, -1)] + [0.])
    z = eps * t[0]
    with torch.no_grad():
        for i in range(n):
            tt = t[i].expand(2)
            v_c, v_u = model(z, tt, y)[:, :4], model(z, tt, null)[:, :4]
            z = z + (t[i + 1] - t[i]) * (v_u + scale * (v_c - v_u))
    assert rel(ours, z) < 1e-4


@pytest.mark.parametrize('kind', FAMILIES)
def test_w2sd_euler_end_to_end(kind):
    make, shift, _ = FAMILIES[kind]
    _, denoiser, eps, (cond, uncond), shared = make()
    counter = CallCounter()
    cfg = CFGDenoiser(counter.wrap(denoiser, 'net'))
    sigmas = flow.flow_sigmas(5, shift or flow.flux_shift(*eps.shape[-2:]))
    main = dict(cond=cond, uncond=uncond, cond_scale=4., **shared)
    x = eps * sigmas[0]

    def run(**w2sd):
        return sample_w2sd_euler(cfg, x, sigmas, extra_args=main, disable=True, weak=cfg,
                                 weak_extra_args=lambda ea: {**ea, 'cond_scale': 0.}, **w2sd)

    plain = K.sample_euler(cfg, x, sigmas, extra_args=main, disable=True)
    assert torch.equal(run(lam=0), plain)
    counter.counts.clear()
    out = run()
    # 5 main steps, 4 reflections with a strong (CFG 4) and a weak (CFG 0, uncond only) leg: 13 calls.
    assert counter.counts['net'] == 13
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3


def test_wan_image_to_video_condition_and_cfg():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=9, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=32,
        added_kv_proj_dim=24).eval().double()
    denoiser = flow.wan_denoiser(model)
    x, sigma = torch.randn(2, 4, 3, 8, 8) * 5, torch.tensor([5., 5.])
    condition = torch.randn(1, 5, 3, 8, 8)  # mask + image latents, shared by the whole batch and both branches
    image = torch.randn(2, 4, 32, dtype=torch.float64)
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 32, dtype=torch.float64), encoder_hidden_states_image=image)
    uncond = dict(encoder_hidden_states=torch.randn(2, 5, 32, dtype=torch.float64), encoder_hidden_states_image=image)
    t = sigma / (1 + sigma)
    x_t = x * (1 - t[0])  # the adapter's float32 input scaling, so that both paths feed the network the same x_t
    with torch.no_grad(), rounding.NetworkMagnitudes(model) as seen:
        def v(c):  # the I2V pipeline: condition concatenated on the channels, image states in both branches
            return model(hidden_states=torch.cat([x_t, condition.repeat(2, 1, 1, 1, 1)], 1).double(),
                         timestep=1000 * t, **c, return_dict=False)[0]
        v_u, v_c = v(uncond), v(cond)
        got = CFGDenoiser(denoiser)(x, sigma, cond=cond, uncond=uncond, cond_scale=5., condition=condition)
    # The network runs in float64 and the reference stays in float64 after it: |got - want| is the float64
    # network's reorder bound and got's float32 steps per branch, taken 1 + 2 x 5 times by CFG, then CFG's 3.
    d_u, d_c, t = x_t.double() - t[0] * v_u, x_t.double() - t[0] * v_c, float(t[0])
    bound = (11 * rounding.float64_net_bound(seen, t, x_t.abs() + d_c.abs(), x_t.abs() + d_u.abs())
             + rounding.reorder_bound(3, got))
    torch.testing.assert_close(got.double(), d_u + 5 * (d_c - d_u), rtol=0, atol=bound)
    assert (d_c - d_u).abs().max() > 1000 * bound  # a swapped or repeated branch would show


@pytest.mark.parametrize('kind', FAMILIES)
def test_half_precision_model_gets_its_dtype_and_returns_float32(kind):
    model, denoiser, eps, (cond, _), shared = FAMILIES[kind][0]()
    x, sigma = eps * 2, torch.tensor([2., 0.3])
    with torch.no_grad():
        full = denoiser(x, sigma, **cond, **shared)
        model.to(torch.bfloat16)
        half = denoiser(x.double(), sigma.half(), **cond, **shared)
    assert half.dtype == torch.float32
    assert rel(half, full) < 0.05


def test_missing_diffusers_names_the_extra():
    # Importing the adapters needs no diffusers; using one says which extra to install.
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from w2sd_samplers.adapters import edm, flow\n"
            "try:\n    flow.sd3_denoiser(None)\nexcept ImportError as e:\n    print(e)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert 'pip install -e ".[diffusers]"' in out.stdout


def test_flow_conversion_matches_closed_form_gaussian_and_drives_stochastic_samplers():
    # Data N(m, s^2 I): in flow time the exact velocity E[eps - x0 | x_t] has its own closed form, independent
    # of the VE denoiser of toy.GaussianMixture; the adapter must turn one into the other.
    from w2sd_samplers.toy import GaussianMixture
    m, s = torch.tensor([1.5, -0.5]), 0.6

    def velocity_net(x_t, timestep):
        t = timestep[:, None]
        x0 = m + (1 - t) * s ** 2 / ((1 - t) ** 2 * s ** 2 + t ** 2) * (x_t - (1 - t) * m)
        return (x_t - (1 - t) * x0) / t - x0

    denoiser, exact = flow.FlowDenoiser(velocity_net, timestep_scale=1.), GaussianMixture(m[None], s, [1.])
    torch.manual_seed(0)
    for sigma in (0.01, 1., 30., 9999.):
        x = m + torch.randn(64, 2) * (s ** 2 + sigma ** 2) ** 0.5
        sig = torch.full([64], sigma)
        torch.testing.assert_close(denoiser(x, sig), exact(x, sig), rtol=1e-4, atol=1e-4)
    # Stochastic samplers: the flow model follows the exact VE model noise draw for noise draw, and lands on
    # the data distribution (2M SDE: second order, small bias at 20 steps).
    sigmas = flow.flow_sigmas(20, 3.)
    for sampler in (K.sample_euler_ancestral, K.sample_dpmpp_2m_sde):
        x = torch.randn(4000, 2) * sigmas[0]
        torch.manual_seed(1)
        out = sampler(denoiser, x, sigmas, disable=True)
        torch.manual_seed(1)
        torch.testing.assert_close(out, sampler(exact, x, sigmas, disable=True), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mean(0), m, rtol=0, atol=0.05)
    torch.testing.assert_close(out.std(0), torch.full([2], s), rtol=0, atol=0.05)
