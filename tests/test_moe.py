import copy

import pytest
import torch
from torch import nn

from w2sd_samplers.moe import MODES, ExpertRouting, find_gates, routed
from w2sd_samplers.reflect import reflect
from rounding import LinearMagnitudes, reorder_bound
from test_lora import in_scope

DIM, EXPERTS, K = 8, 6, 2


class Gate(nn.Module):
    """DiT-MoE-style gate: a bare weight [E, dim], softmax scores, unsorted top-k, raw probabilities as weights."""

    def __init__(self):
        super().__init__()
        self.top_k = K
        self.weight = nn.Parameter(torch.randn(EXPERTS, DIM))

    def forward(self, h):
        scores = nn.functional.linear(h.reshape(-1, h.shape[-1]), self.weight).softmax(-1)
        weight, idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return idx, weight, None


class SparseMoe(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_experts_per_tok = K
        self.gate = Gate()
        self.experts = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(EXPERTS))
        self.shared_experts = nn.Linear(DIM, DIM)

    def forward(self, h):
        idx, weight, _ = self.gate(h)
        flat = h.reshape(-1, DIM)
        assert idx.shape[1] == self.num_experts_per_tok
        out = torch.stack([sum(w * self.experts[int(e)](flat[t]) for e, w in zip(idx[t], weight[t]))
                           for t in range(flat.shape[0])])
        return out.reshape(h.shape) + self.shared_experts(h)


class TinyDiTMoE(nn.Module):
    """Two residual MoE blocks on [B, tokens, DIM], conditioned on sigma, as a k-diffusion denoiser."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(SparseMoe() for _ in range(2))

    def forward(self, x, sigma):
        h = x / (1 + sigma[:, None, None] ** 2) ** .5
        for block in self.blocks:
            h = h + block(h)
        return h


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyDiTMoE().eval()


def snapshot(model):
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


def assert_restored(model, snap):
    params = dict(model.named_parameters())
    assert params.keys() == snap.keys()
    for name, (obj, value) in snap.items():
        assert params[name] is obj and torch.equal(obj, value), name
    for block in model.blocks:
        assert block.gate.top_k == K and block.num_experts_per_tok == K


def record_gates(model):
    """Hooks that record each gate's input (before any routing hook) and chosen indices."""
    seen, inputs = [], []
    hooks = [h for b in model.blocks for h in (
        b.gate.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, DIM)), prepend=True),
        b.gate.register_forward_hook(lambda m, a, out: seen.append((inputs.pop(0), out[0]))))]
    return seen, hooks


def test_bottom_routes_to_lowest_scored_experts(model):
    weights = [b.gate.weight.detach().clone() for b in model.blocks]
    x, sigma = torch.randn(2, 5, DIM), torch.full([2], 2.)
    routing = ExpertRouting(model)
    assert routing.gates == ['blocks.0.gate', 'blocks.1.gate']
    for mode, largest in (('bottom', False), ('top', True)):
        seen, hooks = record_gates(model)
        with routing.mode(mode):
            model(x, sigma)
        for h in hooks:
            h.remove()
        for (h, idx), w in zip(seen, weights):
            scores = (h @ w.T).softmax(-1)
            expected = torch.topk(scores, K, dim=-1, largest=largest).indices
            assert torch.equal(idx.sort(-1).values, expected.sort(-1).values)


def test_bottom_differs_from_top_and_top_is_the_model(model):
    x, sigma = torch.randn(2, 5, DIM), torch.full([2], 1.)
    base = model(x, sigma)
    routing = ExpertRouting(model)
    with routing.mode('top'):
        assert torch.equal(model(x, sigma), base)
    with routing.mode('bottom'):
        bottom = model(x, sigma)
        assert routing.current_mode == 'bottom'
        with routing.mode('top'):  # nested: back to the usual routing, bit for bit
            assert torch.equal(model(x, sigma), base)
        with routing.mode('bottom'):  # nested same mode: no double flip
            assert torch.equal(model(x, sigma), bottom)
    assert routing.current_mode == 'top'
    assert (bottom - base).abs().max() > 1e-3
    assert torch.equal(model(x, sigma), base)


def test_state_restored_after_exceptions(model):
    snap = snapshot(model)
    routing = ExpertRouting(model, k=3)
    for _ in range(5):
        with pytest.raises(KeyboardInterrupt):
            with routing.mode('bottom'):
                assert all(b.gate.top_k == 3 and b.num_experts_per_tok == 3 for b in model.blocks)
                raise KeyboardInterrupt
        assert_restored(model, snap)
    denoiser = routed(model, routing, 'bottom')

    def failing(x, sigma):
        denoiser(x, sigma)
        raise RuntimeError('host interrupt')
    with pytest.raises(RuntimeError, match='host interrupt'):
        routed(failing, routing, 'top')(torch.randn(1, 3, DIM), torch.ones(1))
    assert_restored(model, snap)
    assert routing.current_mode == 'top'


def test_k_override_routes_to_k_experts(model):
    seen, hooks = record_gates(model)
    with ExpertRouting(model, k=1).mode('bottom'):
        model(torch.randn(1, 4, DIM), torch.ones(1))
    assert all(idx.shape == (4, 1) for _, idx in seen)
    with pytest.raises(ValueError, match='exceeds'):
        ExpertRouting(model, k=EXPERTS + 1)


def test_gate_selection_by_name_predicate_and_linear_gates():
    class MixtralLike(nn.Module):  # gate: an nn.Linear with bias; top-k in the parent; experts fused in one module
        def __init__(self):
            super().__init__()
            self.top_k = K
            self.gate = nn.Linear(DIM, EXPERTS)
            self.experts = nn.Module()
            self.experts.weight = nn.Parameter(torch.randn(EXPERTS, DIM, DIM))

        def forward(self, h):
            return self.gate(h).topk(self.top_k, -1).indices

    torch.manual_seed(1)
    m = nn.Sequential(MixtralLike())
    h = torch.randn(7, DIM)
    logits = m[0].gate(h).detach()
    assert find_gates(m) == ['0.gate']
    for routing in (ExpertRouting(m), ExpertRouting(m, ['0.gate']),
                    ExpertRouting(m, lambda name, mod: isinstance(mod, nn.Linear) and mod.out_features == EXPERTS)):
        with routing.mode('bottom'):
            idx = m(h)
        assert torch.equal(idx.sort(-1).values, logits.topk(K, -1, largest=False).indices.sort(-1).values)
        assert torch.equal(m[0].gate(h), logits)


def test_bad_input(model):
    with pytest.raises(ValueError, match='no MoE gate'):
        ExpertRouting(nn.Linear(2, 2))
    with pytest.raises(ValueError, match='blocks.7.gate'):
        ExpertRouting(model, ['blocks.7.gate'])
    with pytest.raises(ValueError, match='weight'):
        ExpertRouting(model, ['blocks.0'])
    with pytest.raises(ValueError, match='mode must be'):
        with ExpertRouting(model).mode('worst'):
            pass
    with pytest.raises(ValueError, match='mode must be'):
        routed(model, ExpertRouting(model), 'weak')


def test_moe_pair_in_a_reflection(model):
    # The paper's MoE pair: strong = top-k, weak = bottom-k of the same network.
    snap = snapshot(model)
    routing = ExpertRouting(model)
    flipped = copy.deepcopy(model)  # reference weak model: a copy with negated gate weights
    with torch.no_grad():
        for block in flipped.blocks:
            block.gate.weight.neg_()
    x, sigma, sigma_next = torch.randn(2, 4, DIM), torch.tensor(2.), torch.tensor(1.5)
    out = reflect(x, sigma, sigma_next, routed(model, routing, 'top'), routed(model, routing, 'bottom'))
    torch.testing.assert_close(out, reflect(x, sigma, sigma_next, model, flipped), atol=0, rtol=0)
    assert (out - reflect(x, sigma, sigma_next, model, model)).abs().max() > 1e-4
    assert_restored(model, snap)


def flipped_copy(model):
    """Reference bottom-k model: a copy without routing hooks whose gate weights are negated."""
    flipped = copy.deepcopy(model)
    for m in flipped.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    with torch.no_grad():
        for gate in {id(b.gate): b.gate for b in flipped.blocks}.values():  # a shared gate is negated once
            gate.weight.neg_()
    return flipped


@pytest.mark.parametrize('form', [routed, lambda model, routing, mode: in_scope(model, routing.mode, mode)])
def test_two_threads_with_different_routings_get_exactly_their_own_outputs(model, form):
    import threading
    snap = snapshot(model)
    routing = ExpertRouting(model)
    x, sigma = torch.randn(1, 3, DIM), torch.ones(1)
    legs = {m: form(model, routing, m) for m in MODES}
    alone = {m: d(x, sigma) for m, d in legs.items()}
    barrier, mismatches = threading.Barrier(2), []

    def work(mode):
        barrier.wait()
        for _ in range(50):
            if not torch.equal(legs[mode](x, sigma), alone[mode]):
                mismatches.append(mode)
    threads = [threading.Thread(target=work, args=(m,)) for m in MODES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == [] and routing.current_mode == 'top'
    assert_restored(model, snap)


def test_per_row_routing_equals_separate_calls(model):
    routing = ExpertRouting(model)
    x, sigma = torch.randn(2, 3, DIM), torch.ones(2)
    with LinearMagnitudes(model) as sums:
        rows = routing.run(['top', 'top', 'bottom', 'bottom'], model, torch.cat([x, x]), torch.cat([sigma, sigma]))
    want = torch.cat([model(x, sigma), flipped_copy(model)(x, sigma)])
    # the gate and shared-expert sums run over another batch: rounding steps of one call as counted in
    # test_pairs.OPS_PER_CALL (the sigma scaling, then two blocks of 33)
    torch.testing.assert_close(rows, want, rtol=0, atol=reorder_bound(4 + 2 * 33, x, want, *sums))


def test_duplicate_gate_names_are_rejected_and_a_gate_under_two_names_flips_once(model):
    with pytest.raises(ValueError, match='more than once'):
        ExpertRouting(model, ['blocks.0.gate', 'blocks.0.gate'])
    model.blocks[1].gate = model.blocks[0].gate  # one gate module registered under two names
    x, sigma = torch.randn(1, 3, DIM), torch.ones(1)
    want = flipped_copy(model)(x, sigma)
    for gates in (None, ['blocks.0.gate', 'blocks.1.gate']):
        routing = ExpertRouting(model, gates)
        torch.testing.assert_close(routed(model, routing, 'bottom')(x, sigma), want, rtol=0, atol=0)
        routing.remove()
