import pytest
import torch

from w2sd_samplers.cfg import CFGDenoiser, cat_conds
from w2sd_samplers.nfe import CallCounter


def inner(x, sigma, c, extra):
    # A conditional denoiser whose output depends on the cond tensor, a nested dict and the batch row.
    return x / (1 + sigma[:, None] ** 2) + c * extra['w'][:, None]


def test_cfg_matches_two_separate_calls_and_batches_them():
    torch.manual_seed(0)
    x, sigma = torch.randn(3, 4), torch.rand(3) + 0.5
    cond = {'c': torch.randn(3, 4), 'extra': {'w': torch.rand(3)}}
    uncond = {'c': torch.zeros(3, 4), 'extra': {'w': torch.rand(3)}}
    counter = CallCounter()
    cfg = CFGDenoiser(counter.wrap(inner, 'inner'))
    for scale in (-2., 0., 1., 5.5):
        expected = inner(x, sigma, **uncond) + (inner(x, sigma, **cond) - inner(x, sigma, **uncond)) * scale
        torch.testing.assert_close(cfg(x, sigma, cond=cond, uncond=uncond, cond_scale=scale), expected)
    # 5.5 and -2 take one batched call each; 0 and 1 take a single unbatched call.
    assert counter.counts['inner'] == 4


def test_cat_conds_rejects_mismatched_layouts():
    with pytest.raises(ValueError, match='same keys'):
        cat_conds({'a': torch.zeros(1)}, {'b': torch.zeros(1)})
    with pytest.raises(ValueError, match='beyond the batch'):
        cat_conds(torch.zeros(1, 77, 8), torch.zeros(1, 75, 8))
    assert cat_conds({'n': 3, 't': [torch.ones(1)]}, {'n': 3, 't': [torch.zeros(1)]})['t'][0].tolist() == [1., 0.]


def test_tensor_scale_broadcasts_per_frame():
    # SVD's pipeline guides each frame with its own scale: [1, F, 1, 1, 1] against [B, F, C, H, W].
    x, sigma = torch.randn(2, 3, 4), torch.ones(2)
    cond, uncond = {'c': torch.randn(2, 3, 4), 'extra': {'w': torch.ones(2)}}, {'c': torch.zeros(2, 3, 4),
                                                                                 'extra': {'w': torch.ones(2)}}
    scale = torch.tensor([1., 2., 0.]).reshape(1, 3, 1)
    inner3 = lambda x, sigma, c, extra: x / (1 + sigma[:, None, None] ** 2) + c  # noqa: E731
    got = CFGDenoiser(inner3)(x, sigma, cond=cond, uncond=uncond, cond_scale=scale)
    d_c, d_u = inner3(x, sigma, **cond), inner3(x, sigma, **uncond)
    for f, s in enumerate([1., 2., 0.]):
        torch.testing.assert_close(got[:, f], d_u[:, f] + s * (d_c[:, f] - d_u[:, f]))
