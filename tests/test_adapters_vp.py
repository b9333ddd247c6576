"""VP-family adapters against diffusers' own schedulers, on tiny random-weight models."""
import sys

import pytest
import torch

diffusers = pytest.importorskip('diffusers')
import k_diffusion.sampling as K  # noqa: E402

from w2sd_samplers.adapters import (alphas_cumprod, alphas_cumprod_from_config, cogvideox_denoiser,  # noqa: E402
                                    dit_denoiser, ditmoe_denoiser, schedule, spaced_timesteps, timestep_sigmas,
                                    unet_denoiser)
from w2sd_samplers.adapters.vp import cast_tree  # noqa: E402
from w2sd_samplers.cfg import CFGDenoiser  # noqa: E402
from rounding import NetworkMagnitudes, float64_net_bound, reorder_bound  # noqa: E402

STEPS = 8


def tiny_sd_unet(**kw):
    torch.manual_seed(0)
    args = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32, attention_head_dim=2,
                norm_num_groups=8)
    return diffusers.UNet2DConditionModel(**{**args, **kw}).eval()


def tiny_sdxl_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        transformer_layers_per_block=(1, 2), cross_attention_dim=32, attention_head_dim=(2, 4),
        use_linear_projection=True, norm_num_groups=8, addition_embed_type='text_time', addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8).eval()


def sdxl_cond(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {'encoder_hidden_states': torch.randn(batch, 5, 32, generator=g),
            'added_cond_kwargs': {'text_embeds': torch.randn(batch, 16, generator=g),
                                  'time_ids': torch.tensor([[64., 64., 0., 0., 64., 64.]]).repeat(batch, 1)}}


def ddim(beta_schedule='scaled_linear', **kw):
    """diffusers' DDIM on the SD / AnimateDiff betas as SD/SDXL ship it (set_alpha_to_one=False: the last step
    lands on abar_0), without x0 clipping (k-diffusion's Euler never clips)."""
    return diffusers.DDIMScheduler(**{'beta_schedule': beta_schedule, 'beta_start': 0.00085, 'beta_end': 0.012,
                                      'clip_sample': False, 'steps_offset': 1, 'set_alpha_to_one': False, **kw})


def ddim_reference(scheduler, net, latents, steps=STEPS):
    """diffusers' own loop: the scheduler steps on the network output."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        latents = scheduler.step(net(latents, t), t, latents).prev_sample
    return latents


def ours(denoiser, scheduler, latents, extra_args, steps=STEPS):
    """k-diffusion Euler with our adapter on the scheduler's timestep grid, mapped back to diffusers' latents."""
    scheduler.set_timesteps(steps)
    sigmas = timestep_sigmas(denoiser, scheduler.timesteps, 0. if scheduler.config.set_alpha_to_one else 'alpha0')
    x = latents * (1 + sigmas[0] ** 2).sqrt()     # the VP pure-noise latent in VE coordinates
    x = K.sample_euler(denoiser, x, sigmas, extra_args=extra_args, disable=True)
    return x / (1 + sigmas[-1] ** 2).sqrt()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_alphas_cumprod_matches_diffusers_tables():
    for kw in (dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012),
               dict(beta_schedule='linear', beta_start=0.00085, beta_end=0.012),
               dict(beta_schedule='linear', beta_start=0.0001, beta_end=0.02),
               dict(beta_schedule='squaredcos_cap_v2')):
        ref = diffusers.DDIMScheduler(**kw).alphas_cumprod
        torch.testing.assert_close(alphas_cumprod(**kw), ref, rtol=1e-5, atol=1e-7)
    cog = diffusers.CogVideoXDDIMScheduler(snr_shift_scale=3., rescale_betas_zero_snr=True).alphas_cumprod
    ours_ = alphas_cumprod(snr_shift_scale=3., zero_terminal_snr=True)
    torch.testing.assert_close(ours_[:-1], cog[:-1].float(), rtol=1e-5, atol=1e-7)
    assert cog[-1] == 0 and 0 < ours_[-1] < 1e-7       # clamped, so sigma_max is finite


def test_spaced_timesteps_match_ddim_scheduler():
    for spacing, offset, n in (('leading', 1, 50), ('trailing', 0, 7), ('linspace', 0, 9)):
        s = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        s.set_timesteps(n)
        assert spaced_timesteps(n, spacing, offset).tolist() == s.timesteps.tolist()


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_sd_unet_euler_reproduces_ddim(prediction_type):
    # SD 1.x (eps) and SD 2.x 768 (v, linear projections).
    kw = {} if prediction_type == 'epsilon' else dict(use_linear_projection=True, attention_head_dim=(2, 4))
    unet = tiny_sd_unet(**kw)
    sched = ddim(prediction_type=prediction_type)
    ehs = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ddim_reference(sched, lambda x, t: unet(x, t, encoder_hidden_states=ehs).sample, latents)
        got = ours(unet_denoiser(unet, sched), sched, latents, {'encoder_hidden_states': ehs})
    assert rel(got, ref) < 1e-4


def test_sdxl_unet_euler_reproduces_ddim_and_euler_discrete():
    unet = tiny_sdxl_unet()
    cond = sdxl_cond(2, 1)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = ddim()
    den = unet_denoiser(unet, sched)
    with torch.no_grad():
        ref = ddim_reference(sched, lambda x, t: unet(x, t, **cond).sample, latents)
        assert rel(ours(den, sched, latents, cond), ref) < 1e-4
        # EulerDiscreteScheduler works in VE coordinates already: its sigmas and steps are k-diffusion's Euler.
        eul = diffusers.EulerDiscreteScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                                               steps_offset=1, timestep_spacing='leading')
        eul.set_timesteps(STEPS)
        x = latents * eul.init_noise_sigma
        for t in eul.timesteps:
            x = eul.step(unet(eul.scale_model_input(x, t), t, **cond).sample, t, x).prev_sample
        got = K.sample_euler(den, latents * eul.init_noise_sigma, eul.sigmas, extra_args=cond, disable=True)
    assert rel(got, x) < 1e-4


def cfg_bound(seen, sigma, x, d_c, d_u, guided, cond_scale):
    """Batched CFG against separate calls of a float64 network (rounding.float64_net_bound): x + eps c_out with
    |c_out| = sigma for each branch; d_u + s (d_c - d_u) takes 1 + 2 s of their errors, then rounds 3 times."""
    return ((1 + 2 * cond_scale) * float64_net_bound(seen, float(sigma.max()), x.abs() + d_c.abs(),
                                                     x.abs() + d_u.abs())
            + reorder_bound(3, guided))


def test_sdxl_cfg_batches_the_layout_in_one_forward():
    # The network runs in float64, so batched and separate forwards differ by float64 rounding only.
    unet = tiny_sdxl_unet().double()
    den = unet_denoiser(unet, family='sdxl')
    cond, uncond = cast_tree(sdxl_cond(2, 1), torch.float64), cast_tree(sdxl_cond(2, 2), torch.float64)
    x, sigma = torch.randn(2, 4, 8, 8) * 3, torch.full([2], 3.)
    calls = []
    unet.register_forward_hook(lambda m, i, o: calls.append(1))
    with torch.no_grad(), NetworkMagnitudes(unet) as seen:
        guided = CFGDenoiser(den)(x, sigma, cond=cond, uncond=uncond, cond_scale=4.)
        assert len(calls) == 1
        d_c, d_u = den(x, sigma, **cond), den(x, sigma, **uncond)
    bound = cfg_bound(seen, sigma, x, d_c, d_u, guided, 4.)
    torch.testing.assert_close(guided, d_u + 4. * (d_c - d_u), rtol=0, atol=bound)
    assert (d_c - d_u).abs().max() > 1000 * bound  # a swapped or repeated branch would show


def tiny_animatediff():
    unet = tiny_sd_unet()
    torch.manual_seed(3)
    adapter = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_num_attention_heads=2, motion_norm_num_groups=8,
                                      motion_max_seq_length=16, use_motion_mid_block=True)
    return diffusers.UNetMotionModel.from_unet2d(unet, adapter).eval()


def test_animatediff_euler_reproduces_ddim_with_text_repeated_per_frame():
    unet = tiny_animatediff()
    sched = ddim('linear')
    ehs = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    den = unet_denoiser(unet, family='animatediff')
    assert abs(float(den.sigma_max) - 25.15) < 0.01
    with torch.no_grad():
        # The pipeline repeats the text per frame itself; our adapter takes one text per video.
        ref = ddim_reference(
            sched, lambda x, t: unet(x, t, encoder_hidden_states=ehs.repeat_interleave(3, 0)).sample, latents)
        assert rel(ours(den, sched, latents, {'encoder_hidden_states': ehs}), ref) < 1e-4
    # CFG's batched text per frame, on the network in float64 (batched and separate differ by its rounding only)
    unet = unet.double()
    x, sigma = latents * 5, torch.full([2], 5.)
    cond, uncond = {'encoder_hidden_states': ehs.double()}, {'encoder_hidden_states': torch.zeros(2, 5, 32).double()}
    with torch.no_grad(), NetworkMagnitudes(unet) as seen:
        guided = CFGDenoiser(den)(x, sigma, cond=cond, uncond=uncond, cond_scale=3.)
        d_c, d_u = den(x, sigma, **cond), den(x, sigma, **uncond)
    bound = cfg_bound(seen, sigma, x, d_c, d_u, guided, 3.)
    torch.testing.assert_close(guided, d_u + 3. * (d_c - d_u), rtol=0, atol=bound)
    assert (d_c - d_u).abs().max() > 1000 * bound


def test_modelscope_euler_reproduces_ddim():
    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=('CrossAttnDownBlock3D', 'DownBlock3D'), up_block_types=('UpBlock3D', 'CrossAttnUpBlock3D'),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    sched = ddim()
    ehs = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ddim_reference(sched, lambda x, t: unet(x, t, encoder_hidden_states=ehs).sample, latents)
        got = ours(unet_denoiser(unet, sched), sched, latents, {'encoder_hidden_states': ehs})
    assert rel(got, ref) < 1e-4


@pytest.mark.parametrize('rope', [False, True])
def test_cogvideox_euler_reproduces_cogvideox_ddim(rope):
    torch.manual_seed(0)
    tf = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if rope else 8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=rope).eval()
    sched = diffusers.CogVideoXDDIMScheduler(snr_shift_scale=1. if rope else 3., rescale_betas_zero_snr=True,
                                             prediction_type='v_prediction', timestep_spacing='trailing')
    den = cogvideox_denoiser(tf, sched)
    # Our table clamps the zero-SNR end (sigma_max 4518.8); the reference gets the same clamp.
    sched.alphas_cumprod = alphas_cumprod(snr_shift_scale=sched.config.snr_shift_scale, zero_terminal_snr=True)
    ehs = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    rot = CogVideoXNetRot(tf, latents) if rope else None

    def net(x, t):
        return tf(hidden_states=x, encoder_hidden_states=ehs, timestep=t.expand(2), image_rotary_emb=rot,
                  return_dict=False)[0]
    with torch.no_grad():
        ref = ddim_reference(sched, net, latents, steps=10)
        got = ours(den, sched, latents, {'encoder_hidden_states': ehs}, steps=10)
    assert rel(got, ref) < 1e-4
    # The variant tables without a scheduler: sigma_max is the ZSNR clamp; 2b's SNR shift scales sigma by sqrt(3).
    assert abs(float(cogvideox_denoiser(tf, variant='5b').sigma_max) - 4518.76) < 0.1
    assert abs(float(cogvideox_denoiser(tf, variant='2b').sigma_min) - 0.02917 * 3 ** 0.5) < 1e-4


def CogVideoXNetRot(tf, latents):
    # The pipeline's rotary embeddings for latents of this size (vae scale 1 in latent units).
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    grid = (latents.shape[-2] // 2, latents.shape[-1] // 2)
    crops = get_resize_crop_region_for_grid(grid, 4, 4)
    return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=crops, grid_size=grid, temporal_size=latents.shape[1])


def test_dit_euler_reproduces_ddim_on_the_eps_half():
    torch.manual_seed(0)
    tf = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():      # DiT zero-initialises its output layers; perturb so the test can fail
        for p in tf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = diffusers.DDIMScheduler(clip_sample=False, beta_schedule='linear', beta_start=0.0001, beta_end=0.02)
    labels = torch.tensor([3, 7])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    den = dit_denoiser(tf)
    assert abs(float(den.sigma_max) - 157.4) < 0.1
    with torch.no_grad():
        ref = ddim_reference(sched, lambda x, t: tf(x, t.expand(2), labels).sample[:, :4], latents)
        got = ours(den, sched, latents, {'class_labels': labels})
    assert rel(got, ref) < 1e-4


class RepoStyleDiT(torch.nn.Module):
    # The DiT-MoE repo's calling convention: forward(x, t, y) -> [B, 2C, H, W] (eps, then learned variance).
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv2d(4, 8, 1)

    def forward(self, x, t, y):
        return self.conv(x) * (t[:, None, None, None] / 1000) + self.emb(y)[:, :, None, None]


def test_ditmoe_ddim_adapter_is_the_eps_formula_on_dit_betas():
    net = RepoStyleDiT()
    den = ditmoe_denoiser(net)
    table = diffusers.DDIMScheduler(beta_schedule='linear', beta_start=0.0001, beta_end=0.02).alphas_cumprod
    t = 400
    abar = table[t]
    sigma = ((1 - abar) / abar).sqrt().reshape(1).repeat(2)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        eps = net(x * abar.sqrt(), torch.full([2], float(t)), y)[:, :4]
        torch.testing.assert_close(den(x, sigma, class_labels=y), x - sigma[:, None, None, None] * eps,
                                   rtol=1e-4, atol=1e-4)


def test_dtype_handling_and_schedules():
    unet = tiny_sd_unet().to(torch.bfloat16)
    den = unet_denoiser(unet, family='sd1')
    x, ehs = torch.randn(1, 4, 8, 8).half(), torch.randn(1, 5, 32)
    before = x.clone()
    with torch.no_grad():
        out = den(x, torch.tensor([2.], dtype=torch.float16), encoder_hidden_states=ehs)
    assert out.dtype == torch.float32 and unet.dtype == torch.bfloat16 and torch.equal(x, before)
    karras, expo, native = schedule(den, 6, 'karras'), schedule(den, 6, 'exponential'), den.schedule(6, 'native')
    for s in (karras, expo):
        assert len(s) == 7 and s[-1] == 0
        assert abs(float(s[0]) - 14.6146) < 1e-3 and abs(float(s[-2]) - 0.02917) < 1e-4
    assert native[0] == den.sigmas[830] and native[-2] == den.sigmas[0]
    with pytest.raises(ValueError, match='kind'):
        schedule(den, 6, 'cosine')


def test_adapters_say_which_extra_to_install(monkeypatch):
    for name in [m for m in sys.modules if m.startswith('w2sd_samplers.adapters.') or m == 'w2sd_samplers.generate']:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'diffusers', None)
    import w2sd_samplers.adapters as adapters
    import w2sd_samplers.generate as w2sd_generate
    assert adapters.alphas_cumprod()[0] > 0           # the schedule math needs no diffusers
    with pytest.raises(ImportError, match=r'pip install -e "\.\[diffusers\]"'):
        adapters.unet_denoiser(torch.nn.Linear(1, 1), family='sd1')
    with pytest.raises(ImportError, match=r'pip install -e "\.\[diffusers\]"'):
        w2sd_generate.generate(object(), 'a prompt')


@pytest.mark.parametrize('config', [dict(beta_schedule='linear', beta_start=0.1, beta_end=1.5),
                                    dict(beta_schedule='scaled_linear', beta_start=float('nan'), beta_end=0.012),
                                    dict(trained_betas=[0.1, -0.2, 0.3])])
def test_betas_that_give_nan_sigmas_are_rejected(config):
    with pytest.raises(ValueError, match='betas'):
        alphas_cumprod_from_config(config)
