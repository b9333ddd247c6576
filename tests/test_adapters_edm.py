"""SVD adapter on a tiny random-weight UNet, checked against diffusers' EulerDiscreteScheduler in SVD's EDM/v mode."""
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip('diffusers')
K = pytest.importorskip('k_diffusion.sampling')

from w2sd_samplers.adapters import edm  # noqa: E402
from w2sd_samplers.cfg import CFGDenoiser  # noqa: E402
from w2sd_samplers.nfe import CallCounter  # noqa: E402
from w2sd_samplers.sampling import sample_w2sd_euler  # noqa: E402

F = 4


def rel(a, b):
    return float((a - b).norm() / b.norm())


def make_svd():
    torch.manual_seed(0)
    unet = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64),
        down_block_types=('CrossAttnDownBlockSpatioTemporal', 'DownBlockSpatioTemporal'),
        up_block_types=('UpBlockSpatioTemporal', 'CrossAttnUpBlockSpatioTemporal'), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, layers_per_block=1, cross_attention_dim=32,
        num_attention_heads=(2, 4), num_frames=F).eval()
    image_latents = torch.randn(2, 1, 4, 8, 8).repeat(1, F, 1, 1, 1)
    cond = dict(image_latents=image_latents, encoder_hidden_states=torch.randn(2, 1, 32))
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    added_time_ids = torch.tensor([[6., 127., 0.02]]).repeat(2, 1)
    return unet, edm.svd_denoiser(unet), cond, uncond, added_time_ids


@pytest.fixture(scope='module')
def svd():
    return make_svd()


def svd_scheduler():
    # The scheduler_config.json of stable-video-diffusion-img2vid(-xt).
    return diffusers.EulerDiscreteScheduler(
        beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, interpolation_type='linear',
        prediction_type='v_prediction', sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing='leading', timestep_type='continuous', use_karras_sigmas=True)


def test_x0_matches_scheduler_pred_original_sample(svd):
    unet, denoiser, cond, _, ids = svd
    x = torch.randn(2, F, 4, 8, 8)
    for sigma in (700., 31., 0.002):
        sched = svd_scheduler()
        sched.set_timesteps(5)
        sched.sigmas[0] = sigma  # step() reads its sigma from this table
        t = 0.25 * torch.tensor(sigma).log()
        with torch.no_grad():
            inp = torch.cat([x / (sigma ** 2 + 1) ** 0.5, cond['image_latents']], dim=2)
            v = unet(inp, t, encoder_hidden_states=cond['encoder_hidden_states'], added_time_ids=ids).sample
            ref = sched.step(v, sched.timesteps[0], x).pred_original_sample
            d = denoiser(x, torch.full([2], sigma), **cond, added_time_ids=ids)
        torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5)
    # One image latent per video broadcasts over the frames.
    with torch.no_grad():
        single = dict(cond, image_latents=cond['image_latents'][:, :1])
        assert torch.equal(denoiser(x, torch.full([2], 3.), **single, added_time_ids=ids),
                           denoiser(x, torch.full([2], 3.), **cond, added_time_ids=ids))


def test_euler_with_frame_guidance_reproduces_pipeline_loop(svd):
    unet, denoiser, cond, uncond, ids = svd
    n = 5
    sched = svd_scheduler()
    sched.set_timesteps(n)
    sigmas = denoiser.schedule(n)
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-5, atol=0)
    scale = edm.frame_guidance(F, 1., 3.)
    noise = torch.randn(2, F, 4, 8, 8)
    ours = K.sample_euler(CFGDenoiser(denoiser), noise * sigmas[0], sigmas, disable=True,
                          extra_args=dict(cond=cond, uncond=uncond, cond_scale=scale, added_time_ids=ids))

    # StableVideoDiffusionPipeline's loop: batched uncond/cond, image latents on dim 2, per-frame guidance.
    latents = noise * sched.sigmas[0]
    guidance = torch.linspace(1., 3., F).view(1, F, 1, 1, 1)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            inp = torch.cat([inp, both['image_latents']], dim=2)
            v = unet(inp, t, encoder_hidden_states=both['encoder_hidden_states'],
                     added_time_ids=torch.cat([ids, ids])).sample
            v_u, v_c = v.chunk(2)
            latents = sched.step(v_u + guidance * (v_c - v_u), t, latents).prev_sample
    assert rel(ours, latents) < 1e-4


def test_frame_cfg_keeps_number_shortcuts():
    counter = CallCounter()

    def inner(x, sigma, c):
        return x * c[:, None, None]

    cfg = CFGDenoiser(counter.wrap(inner, 'inner'))
    x, sigma = torch.ones(1, 3, 2), torch.ones(1)
    kw = dict(cond={'c': torch.tensor([2.])}, uncond={'c': torch.tensor([1.])})
    assert torch.equal(cfg(x, sigma, cond_scale=0., **kw), x)
    assert counter.total == 1
    out = cfg(x, sigma, cond_scale=edm.frame_guidance(3, 0., 2.).view(1, 3, 1), **kw)
    assert out[0, :, 0].tolist() == [1., 2., 3.]
    with pytest.raises(ValueError, match='num_frames'):
        edm.frame_guidance(0)


def test_rejects_wrong_model_and_schedule(svd):
    with pytest.raises(TypeError, match='UNetSpatioTemporalConditionModel'):
        edm.svd_denoiser(nn.Linear(2, 2))
    with pytest.raises(ValueError, match='karras'):
        svd[1].schedule(4, 'cosine')


def test_w2sd_euler_end_to_end(svd):
    _, denoiser, cond, uncond, ids = svd
    counter = CallCounter()
    cfg = CFGDenoiser(counter.wrap(denoiser, 'unet'))
    sigmas = denoiser.schedule(4, 'exponential')
    main = dict(cond=cond, uncond=uncond, cond_scale=edm.frame_guidance(F), added_time_ids=ids)
    x = torch.randn(2, F, 4, 8, 8) * sigmas[0]

    def run(**w2sd):
        return sample_w2sd_euler(cfg, x, sigmas, extra_args=main, disable=True, weak=cfg,
                                 weak_extra_args=lambda ea: {**ea, 'cond_scale': 0.}, **w2sd)

    assert torch.equal(run(strength=0.), K.sample_euler(cfg, x, sigmas, extra_args=main, disable=True))
    counter.counts.clear()
    out = run()
    # 4 main steps + 3 reflections (strong = per-frame CFG, weak = uncond only), one batched call each.
    assert counter.total == 4 + 3 + 3
    assert torch.isfinite(out).all()
    assert rel(out, run(strength=0.)) > 1e-3


def test_half_precision_unet_gets_its_dtype_and_returns_float32():
    unet, denoiser, cond, _, ids = make_svd()
    x, sigma = torch.randn(2, F, 4, 8, 8) * 2, torch.tensor([2., 0.3])
    with torch.no_grad():
        full = denoiser(x, sigma, **cond, added_time_ids=ids)
        unet.to(torch.bfloat16)
        half = denoiser(x.double(), sigma.half(), **cond, added_time_ids=ids)
    assert half.dtype == torch.float32
    assert rel(half, full) < 0.05
