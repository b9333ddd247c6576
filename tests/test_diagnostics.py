import warnings

import pytest
import torch

from w2sd_samplers import pairs, toy
from w2sd_samplers.diagnostics import PairWarning, check_pair
from w2sd_samplers.nfe import CallCounter

K = pytest.importorskip('k_diffusion.sampling')

IDEAL = toy.four_modes([.25] * 4)
SIGMAS = K.get_sigmas_karras(10, 0.05, 20.).double()


def biased(b):
    # Mode weights off the ideal by b along one direction: a weak bias r times the strong one gives r (paper.md 5.3).
    return toy.four_modes([.25 + b, .25 - b, .25 - b, .25 + b])


def start(n=256):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMAS[0]


def run(roles, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        report = check_pair(roles, start(), SIGMAS, **kw)
    return report, [str(w.message) for w in caught if issubclass(w.category, PairWarning)]


def test_gap_is_the_difference_relative_to_the_strong_step():
    strong, weak = biased(.05), biased(.1)
    x = start()
    report = check_pair(pairs.weights(strong, weak), x, SIGMAS)
    assert torch.equal(x, start())  # the caller's noise is left as it was
    for i in range(2):
        s = SIGMAS[i].expand(len(x))
        d_s, d_w = strong(x, s), weak(x, s)
        want = ((d_s - d_w).norm(dim=1) / (x - d_s).norm(dim=1)).mean()
        assert report.gap[i] == pytest.approx(float(want), rel=1e-12)
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * (x - d_s) / SIGMAS[i]  # the strong-only Euler trajectory
    assert report.sigmas == [float(s) for s in SIGMAS[:-2]]  # steps into sigma > 0 only


def test_a_good_pair_passes_and_its_bias_ratio_is_measured():
    report, caught = run(pairs.weights(biased(.05), biased(.1)), ideal=IDEAL,
                         data=IDEAL.sample(256, torch.Generator().manual_seed(1)),
                         generator=torch.Generator().manual_seed(2))
    assert caught == []
    assert 1.8 < report.median_ratio < 2.3  # weak bias twice the strong one: r = 2, strength 1 is right
    assert 0.8 < report.suggested_strength < 1.25
    assert min(report.alignment[i] for i in report.informative) > 0
    assert 'gap' in str(report) and 'NFE' in str(report)


def test_swapped_roles_warn_with_either_hint():
    roles = pairs.weights(biased(.1), biased(.05))
    _, caught = run(roles, ideal=IDEAL)
    assert len(caught) == 1 and 'swapped' in caught[0]
    _, caught = run(roles, data=IDEAL.sample(256, torch.Generator().manual_seed(1)),
                    generator=torch.Generator().manual_seed(2))
    assert len(caught) == 1 and 'swapped' in caught[0]
    _, caught = run(roles)  # no hint: the pair alone cannot say which side is better
    assert caught == []


def test_overshoot_warns_with_a_strength():
    report, caught = run(pairs.weights(biased(.03), biased(.15)), ideal=IDEAL)
    assert len(caught) == 1 and 'overshoot' in caught[0]
    assert 0.2 < report.suggested_strength < 0.3  # r = 5: strength 1/(r-1) = 1/4


def test_degenerate_pairs_warn():
    report, caught = run(pairs.weights(biased(.05), biased(.05)))
    assert set(report.gap) == {0.} and len(caught) == 1 and 'degenerate' in caught[0]
    # A guidance pair at equal scales is degenerate too; its extra args reach both legs.
    cond, uncond = {'c': torch.ones(256, 2, dtype=torch.float64)}, {'c': torch.zeros(256, 2, dtype=torch.float64)}

    def inner(x, sigma, c):
        return IDEAL(x, sigma) + 0.1 * c

    _, caught = run(pairs.guidance(inner, cond, uncond, strong_scale=2., weak_scale=2.))
    assert len(caught) == 1 and 'degenerate' in caught[0]
    _, caught = run(pairs.guidance(inner, cond, uncond, strong_scale=2., weak_scale=0.))
    assert caught == []


def test_nfe_is_counted_and_reported():
    counter = CallCounter()
    roles = pairs.weights(counter.wrap(biased(.05), 'strong'), counter.wrap(biased(.1), 'weak'))
    report = check_pair(roles, start(), SIGMAS, ideal=counter.wrap(IDEAL, 'ideal'),
                        data=IDEAL.sample(256, torch.Generator().manual_seed(1)))
    steps = len(SIGMAS) - 2
    assert counter.counts == {'strong': 2 * steps, 'weak': 2 * steps, 'ideal': steps}
    assert report.nfe == counter.total


def test_bad_arguments():
    roles = pairs.weights(biased(.05), biased(.1))
    with pytest.raises(TypeError, match='Roles'):
        check_pair(biased(.05), start(), SIGMAS)
    with pytest.raises(ValueError, match='data'):
        check_pair(roles, start(), SIGMAS, data=torch.zeros(3, 2))
    with pytest.raises(TypeError, match='ideal'):
        check_pair(roles, start(), SIGMAS, ideal=1)
    with pytest.raises(ValueError, match='non-increasing'):
        check_pair(roles, start(), SIGMAS.flip(0))
