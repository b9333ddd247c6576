"""Device and dtype discipline: no tensor made off the sampling state's device or dtype (tests/device_audit.py), and
half-precision runs against float32 runs.

The device side runs with meta as the default device (x and the model on the CPU): a real second device is not
needed to catch a tensor made without ``device=``. ``W2SD_TEST_DEVICE=cuda`` runs the same checks with x and the
models on that device (benchmarks/gpu/run.sh does, in float16 and bfloat16).
"""
import os

import k_diffusion as kd
import pytest
import torch

from device_audit import Audit
from w2sd_samplers import guidance, lora, moe, pairs, sampling

DEVICE = torch.device(os.environ.get('W2SD_TEST_DEVICE', 'cpu'))
HALF = (torch.bfloat16, torch.float16)
FORMS = {'paper': {}, 'next': {'weak_sigma': 'next'}, 'anchored': {'form': 'anchored'}}
SIGMAS = kd.sampling.get_sigmas_karras(6, 0.03, 14.6)


@pytest.fixture
def audit_brownian(monkeypatch):
    """k-diffusion's Brownian tree is third-party code: built and queried as the user's (its noise is still
    checked where the library uses it)."""
    K = kd.sampling
    made = K.BrownianTreeNoiseSampler
    audits = []

    def tree(*args, **kwargs):
        sampler = audits[-1].user(made)(*args, **kwargs)
        return audits[-1].user(sampler)
    monkeypatch.setattr(K, 'BrownianTreeNoiseSampler', tree)
    return audits


class Gauss(torch.nn.Module):
    """The exact denoiser of N(mu, var) data, in its parameters' dtype: D = (var x + sigma^2 mu) / (var + sigma^2)."""

    def __init__(self, mu, var):
        super().__init__()
        self.register_buffer('mu', torch.full([1, 4, 1, 1], mu))
        self.register_buffer('var', torch.tensor(var))

    def forward(self, x, sigma):
        s2 = sigma.reshape(-1, 1, 1, 1).to(self.mu) ** 2
        return (self.var * x + s2 * self.mu) / (self.var + s2)


def latents(dtype, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g) * SIGMAS[0]).to(DEVICE, dtype)


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_every_sampler_keeps_x_device_and_dtype(dtype, form, audit_brownian):
    x, sigmas = latents(dtype), SIGMAS.to(DEVICE)
    strong, weak = Gauss(0.5, 1.).to(DEVICE, dtype), Gauss(0.3, 0.6).to(DEVICE, dtype)
    flagged = {}
    for name, sample in sampling.SAMPLERS.items():
        audit = Audit(x, sigmas)
        audit_brownian.append(audit)
        with audit:
            out = sample(audit.user(strong), x, sigmas, disable=True, weak=audit.user(weak), **FORMS[form])
        assert audit.seen > 50                       # the mode saw the sampler's own ops
        if audit.findings or out.dtype != dtype or out.device != x.device:
            flagged[name] = audit.report()[:3] + [f'out {out.dtype} {out.device}']
    assert flagged == {}


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_resampling_and_restart_keep_x_device_and_dtype(dtype, monkeypatch):
    x, sigmas = latents(dtype), SIGMAS.to(DEVICE)
    made, audits = kd.sampling.get_sigmas_karras, []   # Restart's sub-schedule: k-diffusion's code, as the user's
    monkeypatch.setattr(kd.sampling, 'get_sigmas_karras', lambda *a, **k: audits[-1].user(made)(*a, **k))
    strong = Gauss(0.5, 1.).to(DEVICE, dtype)
    runs = {'resampling': (guidance.sample_resampling, {}),
            'restart': (guidance.sample_restart, {'sigma_lo': float(SIGMAS[3]), 'sigma_hi': float(SIGMAS[1])})}
    flagged = {}
    for name, (sample, options) in runs.items():
        audit = Audit(x, sigmas)
        audits.append(audit)
        with audit:
            out = sample(audit.user(strong), x, sigmas, disable=True, **options)
        assert audit.seen > 50
        if audit.findings or out.dtype != dtype or out.device != x.device:
            flagged[name] = audit.report()[:3] + [f'out {out.dtype} {out.device}']
    assert flagged == {}


class TinyEps(torch.nn.Module):
    """An eps network over pixels as tokens: attention-style projections (LoRA targets), a top-2-of-4 mixture of
    experts with a DiT-MoE-style gate, and an optional extra input (the pipeline pair's)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.to_q, self.to_v = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.block = torch.nn.Module()
        self.block.gate = torch.nn.Linear(4, 4, bias=False)
        self.block.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
        self.block.top_k = 2

    def forward(self, x, t, cond, hint=None):
        h = x.movedim(1, -1) + cond[:, None, None, :] * (t.to(x.dtype) / 1000)[:, None, None, None]
        h = h if hint is None else h + hint[:, None, None, :]         # a ControlNet-like extra input
        h = self.to_v(torch.tanh(self.to_q(h)))
        tokens = h.reshape(-1, 4)
        weight, idx = self.block.gate(tokens).softmax(-1).topk(self.block.top_k, -1)
        experts = torch.stack([e(tokens) for e in self.block.experts], 1)
        rows = torch.arange(len(tokens), device=tokens.device)
        mixed = sum(w[:, None] * experts[rows, i] for w, i in zip(weight.T, idx.T))
        return (h + 0.1 * mixed.reshape(h.shape)).movedim(-1, 1)


def tiny_denoiser(dtype):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0).float().to(DEVICE)
    return kd.external.DiscreteEpsDDPMDenoiser(TinyEps().to(DEVICE, dtype), ac, quantize=True)


def lora_state(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f'{n}.lora_{p}.weight': torch.randn(shape, generator=g) * 0.3
            for n in ('to_q', 'to_v') for p, shape in (('A', (2, 4)), ('B', (4, 2)))}


def pair_roles(kind, model, net, conds):
    c, w, u = conds
    if kind == 'guidance':
        return pairs.guidance(model, c, u)
    if kind == 'prompt':
        return pairs.prompt(model, c, w, u)
    if kind == 'weights':
        return pairs.weights(model, tiny_weak, c, u)
    if kind == 'pipeline':
        return pairs.pipeline(model, {'hint': w['cond']}, c, u)
    if kind == 'lora':
        return pairs.lora(model, lora.SwitchableLoRA(net, lora_state(net)), c, u)
    return pairs.moe(model, moe.ExpertRouting(net), c, u)


def tiny_weak(x, sigma, cond):
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + 0 * cond.sum()


@pytest.mark.parametrize('kind', ['guidance', 'prompt', 'weights', 'pipeline', 'lora', 'moe'])
@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_pair_builders_lora_branches_and_moe_hooks_keep_device_and_dtype(kind, dtype, monkeypatch):
    x = latents(dtype)
    model = tiny_denoiser(dtype)
    sigmas = model.get_sigmas(5).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    conds = [{'cond': torch.randn(2, 4, generator=g).to(DEVICE, dtype)} for _ in range(3)]
    audit = Audit(x, sigmas)
    # library code the network runs (LoRA branches, gate flips) is audited again inside the user's model
    monkeypatch.setattr(lora._Branch, 'hook', audit.library(lora._Branch.hook))
    for name in ('_flip_input', '_flip_output'):
        monkeypatch.setattr(moe.ExpertRouting, name, audit.library(getattr(moe.ExpertRouting, name)))
    monkeypatch.setitem(globals(), 'tiny_weak', audit.user(tiny_weak))
    roles = pair_roles(kind, audit.user(model), model.inner_model, conds)
    with audit:
        for form in ('paper', 'anchored'):
            out = sampling.sample_w2sd_euler(roles.main, x, sigmas, extra_args=roles.extra_args, disable=True,
                                             **roles.w2sd(form=form))
            assert out.dtype == dtype and out.device == x.device
        guided = guidance.difference_guidance(roles)         # autoguidance, any sampler's denoiser
        syncs = audit.syncs
        out = guided(x, sigmas[1] * x.new_ones([len(x)]), **roles.extra_args)
        assert out.dtype == dtype and out.device == x.device and audit.syncs == syncs
    assert audit.report() == []


@pytest.mark.parametrize('form', ['paper', 'anchored'])
def test_reflections_read_no_values_back_to_the_host(form):
    """A reflection adds no ``.item()`` / ``float(t)`` to a step (each is a device sync on a GPU): the samplers'
    own syncs (k-diffusion's branches on schedule values, listed in docs/devices.md) are the same with every step
    reflected as with none (``lam=0``)."""
    x, sigmas = latents(torch.float32), SIGMAS.to(DEVICE)
    strong, weak = Gauss(0.5, 1.).to(DEVICE), Gauss(0.3, 0.6).to(DEVICE)
    extra = {}
    for name, sample in sampling.SAMPLERS.items():
        counts = []
        for lam in (0, None):
            audit = Audit(x, sigmas)
            with audit:
                sample(audit.user(strong), x, sigmas, disable=True, weak=audit.user(weak), lam=lam, form=form,
                       noise_sampler=audit.user(lambda s, s_next: torch.zeros_like(x))) \
                    if 'noise_sampler' in sampling.inspect.signature(sample).parameters else \
                    sample(audit.user(strong), x, sigmas, disable=True, weak=audit.user(weak), lam=lam, form=form)
            counts.append(audit.syncs)
        if counts[0] != counts[1]:
            extra[name] = counts
    assert extra == {}


def fixed_noise(x):
    """A noise sampler of float32 draws keyed by the step's sigmas, cast to x's dtype: the same noise in every
    dtype's run (the samplers' sigma arithmetic is in the schedule's float32 whatever x's dtype)."""
    def noise(sigma, sigma_next):
        seed = int(float(sigma) * 1e6) * 7919 + int(float(sigma_next) * 1e6)
        g = torch.Generator().manual_seed(seed % 2 ** 62)
        return torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    return noise


@pytest.mark.parametrize('form', ['paper', 'anchored'])
@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_half_precision_runs_match_float32_within_the_rounding_bound(dtype, form):
    """Every sampler in bfloat16 / float16 against the same run in float32 (same starting point: the half noise;
    same ancestral noise). Bound, derived: each denoiser call and the step arithmetic around it round at most
    C = 8 times (the closed-form denoiser's 5 ops and at most 3 sampler ops per call), each by at most the unit
    roundoff u = eps / 2 of the format, relative to the values at hand. For Gaussian data the probability-flow map
    scales deviations by sqrt(var + sigma_end^2) / sqrt(var + sigma_i^2), so an error made at step i arrives at the
    end no larger relative to the final |x| than it was relative to |x_i|: the errors add up to at most
    C u NFE max|x_end| per element. A reflection multiplies a leg's error by at most 1 + G, G = max h / sigma_next
    over the schedule (its step ratio or the anchored gain)."""
    sigmas = SIGMAS.to(DEVICE)
    u = torch.finfo(dtype).eps / 2
    gain = float(((sigmas[:-2] - sigmas[1:-1]) / sigmas[1:-1]).max())
    x_half = latents(dtype, seed=5)
    flagged = {}
    for name, sample in sampling.SAMPLERS.items():
        outs, nfe = {}, []
        for dt in (dtype, torch.float32):
            x = x_half.to(dt)
            strong, weak = Gauss(0.5, 1.).to(DEVICE, dt), Gauss(0.3, 0.6).to(DEVICE, dt)
            calls = []

            def counted(d):
                return lambda x, s, **ea: calls.append(1) or d(x, s, **ea)
            kw = {'noise_sampler': fixed_noise(x)} if 'noise_sampler' in \
                sampling.inspect.signature(sample).parameters else {}
            torch.manual_seed(0)
            outs[dt] = sample(counted(strong), x, sigmas, disable=True, weak=counted(weak), form=form, **kw)
            nfe.append(len(calls))
        ref = outs[torch.float32]
        bound = 8 * u * nfe[1] * (1 + gain) * max(1., float(ref.abs().max()))
        err = float((outs[dtype].float() - ref).abs().max())
        if not (outs[dtype].dtype == dtype and err <= bound):
            flagged[name] = (outs[dtype].dtype, err, bound)
    assert flagged == {}


def to_device(value):
    """Tensors, inside nested dicts too, moved to DEVICE (float32 kept: the adapters cast for the network)."""
    return {k: to_device(v) for k, v in value.items()} if isinstance(value, dict) else value.to(DEVICE)


def net_dtype_check(audit, module, dtype, seen):
    """Run ``module`` as the user's code and record the dtype of every floating tensor it is given but the
    timestep (diffusers networks take it in float32 and embed it in float32)."""
    forward = module.forward

    def checked(*args, **kwargs):
        seen.update(str(v.dtype) for k, v in list(enumerate(args)) + list(kwargs.items())
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and k != 'timestep')
        return forward(*args, **kwargs)
    module.forward = audit.user(checked)


@pytest.mark.parametrize('family', ['sd', 'sdxl', 'sd3'])
def test_adapters_keep_the_state_on_its_device_and_the_network_in_its_dtype(family):
    """The adapters keep k-diffusion's state and sigma math in float32 by design (docs/devices.md) and call the
    network in its own dtype (bfloat16 here); nothing of theirs lands on the default device or in float64."""
    diffusers = pytest.importorskip('diffusers')
    from test_adapters_flow import tiny_sd3
    from test_adapters_vp import ddim, sdxl_cond, tiny_sd_unet, tiny_sdxl_unet
    from w2sd_samplers.adapters import unet_denoiser
    if family == 'sd3':
        net, den, x, (c, w), _ = tiny_sd3()
        sigmas = kd.sampling.get_sigmas_karras(4, 0.05, 20.)
        net.to(DEVICE, torch.bfloat16)
    else:
        net = (tiny_sd_unet() if family == 'sd' else tiny_sdxl_unet()).to(DEVICE, torch.bfloat16)
        den = unet_denoiser(net, ddim())
        c, w = ([{'encoder_hidden_states': torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(s))}
                 for s in (1, 2)] if family == 'sd' else [sdxl_cond(2, s) for s in (1, 2)])
        sigmas = den.schedule(4)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0].cpu()
    assert isinstance(net, diffusers.ModelMixin)
    x, sigmas, c, w = (to_device(v) for v in (x, sigmas, c, w))
    audit, seen = Audit(x, sigmas, torch.bfloat16), set()
    net_dtype_check(audit, net, torch.bfloat16, seen)
    roles = pairs.prompt(den, c, w)
    with audit:
        for form in ('paper', 'anchored'):
            out = sampling.sample_w2sd_dpmpp_2m(roles.main, x, sigmas, extra_args=roles.extra_args, disable=True,
                                                **roles.w2sd(form=form))
            assert out.dtype == torch.float32 and out.device == x.device and torch.isfinite(out).all()
    assert audit.report() == [] and seen == {'torch.bfloat16'}


def test_generate_keeps_device_and_dtypes(tmp_path):
    """generate() on a bfloat16 pipeline: float32 state, the UNet in bfloat16, nothing on the default device."""
    pytest.importorskip('transformers')
    from test_generate import PROMPT, sd_pipe
    from w2sd_samplers.generate import generate
    pipe = sd_pipe(tmp_path).to(DEVICE, torch.bfloat16)
    x = torch.zeros(1, device=DEVICE)
    audit, seen = Audit(x, network_dtype=torch.bfloat16, table_len=1000), set()
    net_dtype_check(audit, pipe.unet, torch.bfloat16, seen)
    pipe.encode_prompt = audit.user(pipe.encode_prompt)
    pipe.vae.decode = audit.user(pipe.vae.decode)
    with audit:
        result = generate(pipe, PROMPT, steps=3, weak_cfg=1., form='anchored', output_type='latent',
                          progress=False)
    assert result.latents.dtype == torch.bfloat16 and torch.isfinite(result.latents).all()
    assert audit.report() == [] and seen == {'torch.bfloat16'}
