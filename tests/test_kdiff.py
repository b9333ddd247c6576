"""The samplers draw helpers and noise from the active k-diffusion copy, so host seeds are kept."""
import types

import k_diffusion.sampling as K
import torch

import w2sd_samplers as W
from w2sd_samplers import _kdiff
from w2sd_samplers.toy import GaussianMixture

MODEL = GaussianMixture([[-1.], [2.]], 0.5, [0.5, 0.5])
WEAK = GaussianMixture([[-1.], [2.]], 0.5, [0.2, 0.8])
SIGMAS = K.get_sigmas_karras(5, 0.1, 10.)


class TorchHijack:
    """Stands in for A1111's TorchHijack: k_diffusion.sampling.torch.randn_like returns the host's seeded noise."""

    def __init__(self):
        self.generator, self.calls = torch.Generator().manual_seed(99), 0

    def randn_like(self, x):
        self.calls += 1
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


def test_noise_goes_through_the_hosts_hijacked_torch(monkeypatch):
    x = torch.ones(4, 1) * SIGMAS[0]
    results = []
    for _ in range(2):
        hijack = TorchHijack()
        monkeypatch.setattr(K, 'torch', hijack)
        torch.manual_seed(0)  # a different global seed each time must not matter
        results.append(W.sample_w2sd_euler_ancestral(MODEL, x, SIGMAS, disable=True, weak=WEAK))
        torch.manual_seed(1)
        results.append(W.sample_w2sd_euler(MODEL, x, SIGMAS, disable=True, weak=WEAK, s_churn=1.))
        assert hijack.calls == 4 + 5  # ancestral: one draw per step into sigma > 0; churn: one per step
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


def test_comfyui_copy_is_preferred_when_loaded(monkeypatch):
    fake = types.SimpleNamespace(torch=torch)
    monkeypatch.setitem(__import__('sys').modules, 'comfy.k_diffusion.sampling', fake)
    assert _kdiff.sampling() is fake
    monkeypatch.delitem(__import__('sys').modules, 'comfy.k_diffusion.sampling')
    assert _kdiff.sampling() is K


def test_explicit_backend_override():
    fake = types.SimpleNamespace()
    _kdiff.set_backend(fake)
    try:
        assert _kdiff.sampling() is fake
    finally:
        _kdiff.set_backend(None)
    assert _kdiff.sampling() is K
