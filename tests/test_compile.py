"""A ``torch.compile``d network through the samplers, the pairs and the batched legs: graph breaks and
recompilations counted with ``torch._dynamo.utils.counters``.

Graph breaks and recompilations are decided by dynamo's tracing and guards, the same for every backend, so the
whole family runs with ``backend='eager'`` (seconds); one test runs inductor on a representative subset (Euler and
the anchored form's batched legs on a CFG prompt pair: the two batch sizes a W2SD run feeds the network), since an
inductor compile costs about half a minute here. docs/devices.md has the numbers of the whole family once with
inductor on a diffusers UNet.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from test_device_dtype import TinyEps, lora_state
from w2sd_samplers import lora, moe, pairs, sampling
import k_diffusion as kd

KINDS = ('prompt', 'guidance', 'lora', 'moe')


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_pair(kind, batch=1, **compile_options):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    model = kd.external.DiscreteEpsDDPMDenoiser(TinyEps().requires_grad_(False),
                                                torch.cumprod(1 - betas, 0).float(), quantize=True)
    net = model.inner_model
    g = torch.Generator().manual_seed(2)
    c, w, u = ({'cond': torch.randn(batch, 4, generator=g)} for _ in range(3))
    roles = {'prompt': lambda: pairs.prompt(model, c, w, u), 'guidance': lambda: pairs.guidance(model, c, u),
             'lora': lambda: pairs.lora(model, lora.SwitchableLoRA(net, lora_state(net)), c, u),
             'moe': lambda: pairs.moe(model, moe.ExpertRouting(net), c, u)}[kind]()
    model.inner_model = torch.compile(net, **compile_options)    # hooks attached first, as a user would
    return model, roles


def image(roles, sigmas, seed, samplers=sampling.SAMPLERS, forms=('paper', 'anchored'), batch=1):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    for name in samplers:
        for form in forms:
            sampling.SAMPLERS[name](roles.main, x, sigmas, extra_args=roles.extra_args, disable=True,
                                    **roles.w2sd(form=form))
    return x


def compiled():
    """(frames compiled, graphs, graph breaks) so far."""
    return counters['frames']['total'], counters['stats']['unique_graphs'], dict(counters['graph_break'])


@pytest.mark.parametrize('kind', KINDS)
def test_every_sampler_and_form_compiles_once_per_shape_and_never_again(kind):
    """Image 1 compiles (one graph per batch size the pair feeds the network, and for LoRA/MoE one per scale or
    routing it reads in its hooks); image 2, with new noise, compiles nothing; nothing breaks the graph (the LoRA
    branches and gate flips run inside it)."""
    model, roles = compiled_pair(kind, backend='eager')
    sigmas = model.get_sigmas(4)
    image(roles, sigmas, 0)
    first = compiled()
    assert first[0] >= 1 and first[2] == {}
    image(roles, sigmas, 1)
    assert compiled() == first


@pytest.mark.parametrize('kind', ['prompt', 'lora'])
def test_dynamic_batch_compiles_the_batched_legs_into_the_same_graph(kind):
    """The anchored form's batched legs double the batch and CFG doubles it again. At batch 2 the default
    ``dynamic=None`` compiles the first batch size static, then recompiles once with a dynamic batch;
    ``torch.compile(net, dynamic=True)`` compiles one graph for every batch size. At batch 1 both give 2 graphs:
    dynamo always specializes a size of 1. A LoRA pair adds graphs for what its hooks read (a scale, or one per
    row): fewer with ``dynamic=True``, which also leaves the scale's value unspecialized."""
    graphs = {}
    for batch, dynamic in ((2, None), (2, True), (1, True)):
        torch._dynamo.reset()
        counters.clear()
        model, roles = compiled_pair(kind, batch, backend='eager', dynamic=dynamic)
        image(roles, model.get_sigmas(4), 0, samplers=['euler'], batch=batch)
        graphs[batch, dynamic] = compiled()[1]
    if kind == 'prompt':
        assert graphs == {(2, None): 2, (2, True): 1, (1, True): 2}
    else:
        assert graphs[2, True] < graphs[2, None] and graphs[2, True] < graphs[1, True]


def test_inductor_subset_matches_eager_and_does_not_recompile():
    """Inductor on Euler and dpmpp_2m, paper and anchored forms, prompt pair with CFG (batch 1, 2 and 3 rows):
    compiles on image 1 only; its result equals the eager network's up to float32 rounding: a fused kernel may
    reorder the network's sums, at most ~ 16 roundings per network output (its widest sum), each u = 2^-24 relative,
    and the sampler adds the NFE's errors with the ODE's contraction (< 1 per step): bound 16 u NFE max|x|."""
    model, roles = compiled_pair('prompt', dynamic=None)
    sigmas = model.get_sigmas(4)
    samplers = ['euler', 'dpmpp_2m']
    image(roles, sigmas, 0, samplers)
    first = compiled()
    assert first[2] == {}
    x = image(roles, sigmas, 1, samplers, forms=())
    assert compiled() == first
    out = sampling.sample_w2sd_euler(roles.main, x, sigmas, extra_args=roles.extra_args, disable=True,
                                     **roles.w2sd(form='anchored'))
    assert compiled() == first
    eager = model.inner_model._orig_mod
    model.inner_model = eager
    ref = sampling.sample_w2sd_euler(roles.main, x, sigmas, extra_args=roles.extra_args, disable=True,
                                     **roles.w2sd(form='anchored'))
    nfe = 3 * (len(sigmas) - 1)
    assert (out - ref).abs().max() <= 16 * 2 ** -24 * nfe * ref.abs().max()
