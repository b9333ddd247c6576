"""The LoRA and MoE scope helpers under a KeyboardInterrupt at every line (threads: test_lora.py, test_moe.py).

An interrupt is injected as an adversarial tester would: ``sys.settrace`` raises KeyboardInterrupt at the n-th line
event in the library's LoRA/MoE frames (the helpers, their scope and the hooks running inside the block), for
every n until a run completes uninterrupted. After each, the caller's context (every context variable) and the
shared model (weights, ``top_k``) must be exactly as before.
"""
import contextvars
import sys

import pytest
import torch

from w2sd_samplers import lora, moe
from test_moe import DIM, K as MODEL_K, TinyDiTMoE
from test_pairs import conds, lora_net

LIBRARY = {lora.__file__, moe.__file__}


def run_interrupted(n, fn):
    """``fn()`` with a KeyboardInterrupt raised at the n-th line event (from 0) in the library's LoRA/MoE frames;
    returns whether it was raised."""
    count, landed = 0, False

    def local(frame, event, arg):
        nonlocal count, landed
        if event == 'line':
            if count == n:
                landed = True
                raise KeyboardInterrupt  # CPython raises it in the traced frame and stops tracing
            count += 1
        return local
    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename in LIBRARY else None)
    try:
        fn()
    except KeyboardInterrupt:
        assert landed
    finally:
        sys.settrace(None)
    return landed


def context_items():
    return {var: value for var, value in contextvars.copy_context().items()}


def model_state(model):
    state = {name: p.detach().clone() for name, p in model.state_dict().items()}
    ks = {(name, a): getattr(m, a) for name, m in model.named_modules() for a in moe.K_ATTRIBUTES if hasattr(m, a)}
    return state, ks


def assert_every_line_is_safe(model, scenario):
    """Interrupt ``scenario`` at each line event in turn; the context and the model must be left unchanged."""
    before = model_state(model)

    def attempt(n):
        context = context_items()
        landed = run_interrupted(n, scenario)
        after = context_items()
        assert after.keys() == context.keys() and all(after[v] is context[v] for v in context), n
        state, ks = model_state(model)
        assert ks == before[1] and all(torch.equal(state[k], v) for k, v in before[0].items()), n
        return landed
    n = 0
    while contextvars.copy_context().run(attempt, n):  # each attempt in a copy, so a leak cannot hide the next
        n += 1
    assert n > 10  # the interrupts did land in the library's frames
    return n


def lora_case():
    net, sl = lora_net()
    cond, _, x = conds()
    return net, sl, lambda: net(x, torch.ones(3), **cond)


@pytest.mark.parametrize('helper', ['scale', 'nested scale', 'run', 'scaled'])
def test_a_lora_scale_survives_an_interrupt_at_every_line(helper):
    net, sl, forward = lora_case()
    cond, _, x = conds()

    def scenario():
        if helper == 'scale':
            with sl.scale(0.8):
                forward()
        elif helper == 'nested scale':
            with sl.scale(0.8), sl.scale([-1.5, 0.3, 1.]):
                forward()
        elif helper == 'run':
            sl.run(0.8, forward)
        else:
            lora.scaled(net, sl, 0.8)(x, torch.ones(3), **cond)
    assert_every_line_is_safe(net, scenario)
    assert sl.current_scale == 0


@pytest.mark.parametrize('k', [None, 3])
@pytest.mark.parametrize('helper', ['mode', 'run', 'routed'])
def test_an_expert_routing_survives_an_interrupt_at_every_line(helper, k):
    torch.manual_seed(0)
    model = TinyDiTMoE().eval()
    routing = moe.ExpertRouting(model, k=k)
    x, sigma = torch.randn(1, 2, DIM), torch.ones(1)

    def scenario():
        if helper == 'mode':
            with routing.mode('bottom'):
                model(x, sigma)
        elif helper == 'run':
            routing.run(['bottom'], model, x, sigma)
        else:
            moe.routed(model, routing, 'bottom')(x, sigma)
    assert_every_line_is_safe(model, scenario)
    assert routing.current_mode == 'top' and all(b.gate.top_k == MODEL_K for b in model.blocks)


def test_a_scope_cannot_be_entered_twice_at_once():
    _, sl, _ = lora_case()
    scope = sl.scale(0.8)
    with scope:
        with pytest.raises(RuntimeError, match='already entered'):
            with scope:
                pass
        assert sl.current_scale == 0.8
    assert sl.current_scale == 0
    with scope:  # once left, it can be entered again
        assert sl.current_scale == 0.8
