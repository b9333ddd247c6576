"""Overhead and scale: wall time per NFE of every W2SD sampler against bare denoiser calls, UNet passes per image
at the paper's settings, forward launches and batch rows of each shared-network pair with its legs batched or not,
the parameter memory of a LoRA pair against its base model, and wall time and peak memory per image of each method
as a ratio to plain sampling (``per_image``, for benchmarks/gpu/run.sh).

Runs a random-weight ``diffusers.UNet2DConditionModel`` built from a config: 'tiny' or 'tiny-xl' (CPU, CI), or 'sd15' / 'sdxl'
(the real architectures' sizes, for a GPU: ``w2sd bench overhead --unet sdxl --device cuda --dtype float16``).
"""
import statistics
import time

import torch

from .. import guidance, lora, moe, pairs, sampling
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
    cuda = torch.device(device).type == 'cuda'
    # built on the device: SDXL's 2.6 B parameters take a minute to initialize on a CPU
    with torch.random.fork_rng(devices=[device] if cuda else []), torch.device(device):
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
    """The UNet as an eps model ``(x, t, **cond)``, counting forward launches and UNet passes (batch rows)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.rows, self.calls = unet, 0, 0

    def forward(self, x, t, **cond):
        self.rows, self.calls = self.rows + x.shape[0], self.calls + 1
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


class _MoEEps(torch.nn.Module):
    """The UNet's eps plus a small mixture of experts over its pixels (top-2 of 4 per-pixel experts), so that the
    MoE pair runs on a network of the same size as the others."""

    def __init__(self, eps, channels=4, experts=4):
        super().__init__()
        self.eps, self.top_k = eps, 2
        self.gate = torch.nn.Linear(channels, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(channels, channels) for _ in range(experts))

    def forward(self, x, t, **cond):
        h = x.movedim(1, -1).reshape(-1, x.shape[1])             # pixels as tokens, batch-major
        weight, idx = self.gate(h).softmax(-1).topk(self.top_k, -1)
        mixed = sum(w[:, None] * torch.stack([e(h) for e in self.experts], 1)[torch.arange(len(h)), i]
                    for w, i in zip(weight.T, idx.T))
        return self.eps(x, t, **cond) + 0.1 * mixed.reshape(x.movedim(1, -1).shape).movedim(-1, 1)


def _pair_roles(kind, model, eps, cond, weak_cond, uncond):
    """(batched, unbatched) roles of one pair kind: pair builders vs the same legs as separate denoisers."""
    cfg = CFGDenoiser(model)
    main = dict(cond=cond, uncond=uncond, cond_scale=5.5)
    if kind == 'guidance':
        return pairs.guidance(model, cond, uncond), pairs.Roles(main=cfg, extra_args=main, weak=cfg,
                                                               weak_extra_args={**main, 'cond_scale': 0.})
    if kind == 'prompt':
        legs = dict(strong=cfg, strong_extra_args={**main, 'cond_scale': 1.}, weak=cfg,
                    weak_extra_args=dict(cond=weak_cond, uncond=uncond, cond_scale=1.))
        return pairs.prompt(model, cond, weak_cond, uncond), pairs.Roles(main=cfg, extra_args=main, **legs)
    if kind == 'lora':
        targets = [n for n, m in eps.named_modules() if n.rpartition('.')[2] in ('to_q', 'to_v')]
        g = torch.Generator().manual_seed(3)
        layers = dict(eps.named_modules())
        state = {f'{n}.lora_{p}.weight': torch.randn(shape, generator=g) * 0.1 for n in targets for p, shape in
                 (('A', (4, layers[n].in_features)), ('B', (layers[n].out_features, 4)))}
        sl = lora.SwitchableLoRA(eps, state)
        strong, weak = lora.scaled(model, sl, 0.8), lora.scaled(model, sl, -1.5)
        return pairs.lora(model, sl, cond, uncond), pairs.weights(strong, weak, cond, uncond)
    routing = moe.ExpertRouting(eps)
    top, bottom = moe.routed(model, routing, 'top'), moe.routed(model, routing, 'bottom')
    return pairs.moe(model, routing, cond, uncond), pairs.weights(top, bottom, cond, uncond, main_scale=1.5,
                                                                 strong_scale=1.5, weak_scale=1.5)


PAIR_KINDS = ('guidance', 'prompt', 'lora', 'moe')


def pair_batching(size='tiny', steps=10, batch=1, device='cpu', dtype=torch.float32, kinds=PAIR_KINDS):
    """Rows ``(kind, form, launches, launches batched, rows per image, rows per image batched, wall time batched /
    unbatched)`` of W2SD Euler (every step but the last reflects) on each pair kind with its legs as separate
    denoisers and as built by :mod:`w2sd_samplers.pairs` (legs on one network batched where they meet at one
    point). One timed run each after an untimed warm-up."""
    unet = build_unet(size, device, dtype)
    model = denoiser(unet)
    eps = model.inner_model
    cond, weak_cond, uncond = conds(unet, batch, 1), conds(unet, batch, 2), conds(unet, batch, 0)
    sigmas = model.get_sigmas(steps).to(device)
    x = torch.randn(batch, 4, unet.config.sample_size, unet.config.sample_size,
                    generator=torch.Generator().manual_seed(0)).to(device, dtype) * sigmas[0]
    rows = []
    with torch.no_grad():
        for kind in kinds:
            if kind == 'moe':
                model.inner_model = _MoEEps(eps).to(device, dtype)
            roles = _pair_roles(kind, model, model.inner_model, cond, weak_cond, uncond)
            for form in ('paper', 'anchored'):
                counts = []
                for r in roles[::-1]:                   # unbatched first
                    run = lambda s: sampling.sample_w2sd_euler(  # noqa: E731
                        r.main, x, s, extra_args=r.extra_args, disable=True, **r.w2sd(form=form))
                    run(sigmas[-3:])
                    counter = model.inner_model.eps if kind == 'moe' else model.inner_model
                    counter.calls = counter.rows = 0
                    _sync(device)
                    start = time.perf_counter()
                    run(sigmas)
                    _sync(device)
                    counts.append((counter.calls, counter.rows / batch, time.perf_counter() - start))
                (n, r_n, t), (n_b, r_b, t_b) = counts
                rows.append((kind, form, n, n_b, r_n, r_b, t_b / t))
            model.inner_model = eps
    return rows


def pair_batching_table(size='tiny', steps=10, device='cpu', dtype=torch.float32):
    """Markdown lines for :func:`pair_batching`."""
    lam = steps - 1
    text = [f'Forward launches and UNet passes (batch rows) per image of W2SD Euler, T={steps}, λ={lam}, batch 1, on '
            'each shared-network pair: legs as separate denoisers vs built by `w2sd_samplers.pairs`, whose '
            '`SharedCFG` runs the legs that meet at one point (the anchored form\'s strong and weak) as one '
            f'forward: T + λ = {steps + lam} launches instead of T + 2λ = {steps + 2 * lam}. Main step CFG 5.5; '
            'legs CFG 5.5 vs 0 (guidance), 1 (prompt, LoRA 0.8 vs -1.5), 1.5 everywhere (MoE: the UNet plus a '
            'per-pixel top-2 of 4 mixture). Wall time: one timed run each, batched / unbatched.', '',
            '| pair | form | launches | launches batched | passes per image | passes batched | wall batched / '
            'unbatched |', '|---|---|---|---|---|---|---|']
    text += [f'| {kind} | {form} | {n} | {n_b} | {r:g} | {r_b:g} | {ratio:.2f} |'
             for kind, form, n, n_b, r, r_b, ratio in pair_batching(size, steps, device=device, dtype=dtype)]
    return text + ['']


METHODS = ('plain', 'autoguidance', 'w2sd paper', 'w2sd anchored, separate legs', 'w2sd anchored, batched legs')


def _peak_reset(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    return torch.cuda.max_memory_allocated() if torch.device(device).type == 'cuda' else None


def per_image(unet, batch=1, steps=10, lam=6, repeats=3):
    """Rows ``(method, seconds per image, peak bytes or None, UNet passes per image, forward launches)`` of Euler at
    ``steps`` on a prompt pair (main step CFG 5.5, reflection legs CFG 1; ``lam`` reflected steps) with ``unet``
    (from :func:`build_unet`, or ``torch.compile`` of one): plain Euler, autoguidance
    (``guidance.difference_guidance``, every step), W2SD paper, and W2SD anchored with its legs as separate
    denoisers or batched into one forward. Methods run round-robin ``repeats`` times after one untimed warm-up each
    (where a compiled UNet compiles); the median is reported. Peak memory (CUDA only) is ``max_memory_allocated``
    over the last timed run, weights included.
    """
    model = denoiser(unet)
    eps = model.inner_model
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    cond, weak_cond, uncond = (conds(unet, batch, s) for s in (1, 2, 0))
    batched, separate = _pair_roles('prompt', model, eps, cond, weak_cond, uncond)
    sigmas = model.get_sigmas(steps).to(device)
    n = unet.config.sample_size
    x = torch.randn(batch, 4, n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype) * sigmas[0]
    guided = guidance.difference_guidance(batched)

    def euler(roles, main=None, **options):
        # lam=0: k-diffusion's Euler (bit for bit in float32) that keeps half-precision latents in their dtype
        return sampling.sample_w2sd_euler(main or roles.main, x, sigmas, extra_args=roles.extra_args, disable=True,
                                          **roles.w2sd(**options))
    runs = {'plain': lambda: euler(batched, lam=0), 'autoguidance': lambda: euler(batched, guided, lam=0),
            'w2sd paper': lambda: euler(batched, lam=lam),
            'w2sd anchored, separate legs': lambda: euler(separate, lam=lam, form='anchored'),
            'w2sd anchored, batched legs': lambda: euler(batched, lam=lam, form='anchored')}
    times, peaks, counts = {m: [] for m in METHODS}, {}, {}
    with torch.no_grad():
        for m in METHODS:
            runs[m]()
        for r in range(repeats):
            for m in METHODS:
                eps.calls = eps.rows = 0
                _peak_reset(device)
                start = time.perf_counter()
                runs[m]()
                _sync(device)
                times[m].append(time.perf_counter() - start)
                peaks[m], counts[m] = _peak(device), (eps.rows / batch, eps.calls)
    return [(m, statistics.median(times[m]) / batch, peaks[m], *counts[m]) for m in METHODS]


def per_image_table(rows):
    """Markdown lines for :func:`per_image` rows, each method as a ratio to plain from the same run."""
    plain_t, plain_m = rows[0][1], rows[0][2]
    text = ['| method | UNet passes per image | launches | s per image | × plain | peak MiB | × plain |',
            '|---|---|---|---|---|---|---|']
    for m, t, peak, passes, launches in rows:
        mem = ('n/a', 'n/a') if peak is None else (f'{peak / 2**20:.0f}', f'{peak / plain_m:.2f}')
        text.append(f'| {m} | {passes:g} | {launches} | {t:.3f} | {t / plain_t:.2f} | {mem[0]} | {mem[1]} |')
    return text
