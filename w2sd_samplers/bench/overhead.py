"""Overhead and scale: wall time per NFE of every W2SD sampler against bare denoiser calls, UNet passes per image
at the paper's settings, and the parameter memory of a LoRA pair against its base model.

Runs a random-weight ``diffusers.UNet2DConditionModel`` built from a config: 'tiny' or 'tiny-xl' (CPU, CI), or 'sd15' / 'sdxl'
(the real architectures' sizes, for a GPU: ``w2sd bench overhead --unet sdxl --device cuda --dtype float16``).
"""
import time

import torch

from .. import sampling
from ..cfg import CFGDenoiser
from ..nfe import CallCounter

UNETS = {
    'tiny': dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                 up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=16),
    # SDXL's conditioning (pooled text embedding and size ids through 'text_time') at tiny size, for CI
    'tiny-xl': dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), transformer_layers_per_block=(1, 2),
                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16, use_linear_projection=True,
                    addition_embed_type='text_time', addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=16 + 6 * 8),
    'sd15': dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    'sdxl': dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
TOKENS = 77
LORA_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0']


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError('the overhead benchmark needs diffusers: pip install "diffusers>=0.40" peft (in a '
                          'w2sd-samplers checkout: pip install -e ".[bench]")') from e
    return diffusers


def build_unet(size, device='cpu', dtype=torch.float32, seed=0):
    """A random-weight UNet of the named size (weights from a fixed seed; nothing is downloaded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _diffusers().UNet2DConditionModel(**UNETS[size])
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    return unet.eval().requires_grad_(False)


def conds(unet, batch, seed):
    """Random text conditioning of the UNet's shape (SDXL's pooled embedding and time ids included)."""
    g = torch.Generator().manual_seed(seed)
    cfg, p = unet.config, next(unet.parameters())
    c = {'encoder_hidden_states': torch.randn(batch, TOKENS, cfg.cross_attention_dim, generator=g)}
    if cfg.addition_embed_type == 'text_time':
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        c['added_cond_kwargs'] = {'text_embeds': torch.randn(batch, pooled, generator=g),
                                  'time_ids': torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]]).repeat(batch, 1)}
    return _to(c, p.device, p.dtype)


def _to(c, device, dtype):
    if isinstance(c, dict):
        return {k: _to(v, device, dtype) for k, v in c.items()}
    return c.to(device, dtype)


class _Eps(torch.nn.Module):
    """The UNet as an eps model ``(x, t, **cond)``, counting UNet passes per image (batch rows)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.rows = unet, 0

    def forward(self, x, t, **cond):
        self.rows += x.shape[0]
        return self.unet(x, t, **cond).sample


def denoiser(unet):
    """A k-diffusion denoiser for the eps UNet with SD's scaled-linear schedule (k-diffusion's own wrapper)."""
    import k_diffusion as kd
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(next(unet.parameters()).device)
    return kd.external.DiscreteEpsDDPMDenoiser(_Eps(unet), alphas_cumprod, quantize=True)


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def time_per_nfe(size='tiny', steps=10, batch=1, device='cpu', dtype=torch.float32, samplers=None, progress=True):
    """Rows ``(sampler, NFE, seconds per NFE, ratio to as many bare denoiser calls)``; one timed run each, the bare
    calls timed right after it (a shared machine's load drifts).

    The main and strong roles are the UNet on one prompt, the weak role the same UNet on another (a prompt
    pair), so every call is one UNet pass and the ratio isolates the sampler's own overhead.
    """
    from tqdm.auto import tqdm
    unet = build_unet(size, device, dtype)
    model = denoiser(unet)
    cond, weak_cond = conds(unet, batch, 1), conds(unet, batch, 2)
    sigmas = model.get_sigmas(steps).to(device)
    size = unet.config.sample_size
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def bare(calls):
        _sync(device)
        start = time.perf_counter()
        for i in range(calls):
            model(x * sigmas[0], sigmas[i % steps].expand(batch), **cond)
        _sync(device)
        return time.perf_counter() - start

    rows = []
    with torch.no_grad():
        bare(2)
        for name in tqdm(samplers or list(sampling.SAMPLERS), desc='overhead', disable=not progress):
            counter = CallCounter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                # untimed warm-up: the first run of a code path pays one-off costs (lazy imports, allocator)
                sampling.SAMPLERS[name](model, x * sigmas[0], sigmas[-3:], extra_args=cond, disable=True,
                                        weak=model, weak_extra_args=weak_cond)
                _sync(device)
                start = time.perf_counter()
                sampling.SAMPLERS[name](counter.wrap(model, 'main'), x * sigmas[0], sigmas, extra_args=cond,
                                        disable=True, weak=counter.wrap(model, 'weak'), weak_extra_args=weak_cond)
                _sync(device)
                took = time.perf_counter() - start
            rows.append((name, counter.total, took / counter.total, took / bare(counter.total)))
    return rows


def unet_passes(size='tiny', steps=50, lam=49, cfg_scale=5.5, device='cpu', dtype=torch.float32):
    """UNet passes per image: W2SD Euler with the main step at CFG ``cfg_scale`` and both reflection legs at CFG 1
    (the paper's weight/prompt-pair setting), against plain Euler at the same CFG. Counted, not computed."""
    unet = build_unet(size, device, dtype)
    model = denoiser(unet)
    eps, cfg = model.inner_model, CFGDenoiser(model)
    c, u, w = conds(unet, 1, 1), conds(unet, 1, 0), conds(unet, 1, 2)
    main = dict(cond=c, uncond=u, cond_scale=cfg_scale)
    sigmas = model.get_sigmas(steps).to(device)
    size = unet.config.sample_size
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype) * sigmas[0]
    import k_diffusion as kd
    kd.sampling.sample_euler(cfg, x, sigmas, extra_args=main, disable=True)
    plain, eps.rows = eps.rows, 0
    sampling.sample_w2sd_euler(cfg, x, sigmas, extra_args=main, disable=True, lam=lam,
                               strong_extra_args=dict(main, cond_scale=1.), weak=cfg,
                               weak_extra_args=dict(cond=w, uncond=u, cond_scale=1.))
    return plain, eps.rows


def lora_memory(size='tiny', rank=4):
    """Parameter bytes of the base UNet and of base + LoRA side branches (float32; built on the meta device, so
    SD 1.5 and SDXL sizes cost no memory). Returns (base_bytes, lora_bytes)."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError('the LoRA memory benchmark needs peft: pip install peft (in a w2sd-samplers checkout: '
                          'pip install -e ".[bench]")') from e
    with torch.device('meta'):
        unet = _diffusers().UNet2DConditionModel(**UNETS[size])
        base = sum(p.numel() * p.element_size() for p in unet.parameters())
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
        total = sum(p.numel() * p.element_size() for p in unet.parameters())
    return base, total - base
