"""Gaussian-mixture suite: exact strong, weak and ideal denoisers (``toy.GaussianMixture``), so the target is known.

Mode weights are set through log-weights: with ideal log-weights ``a``, strong ``a + b`` and weak ``a + r b``,
r is the weak model's bias in units of the strong one's (for the paper's current-sigma form, whose reflection moves x by
(h / sigma)(D_strong - D_weak) to first order, W2SD corrects the bias at r = 2, overshoots for r > 3 and harms for
r < 1; the `next` and anchored forms move x by (h / sigma_next)(...), 2-10x more at 10 Karras steps).
The 2-D alignment cases use a weak-to-strong difference aligned with, orthogonal to or opposite to the
strong-to-ideal gap in log-weight space.
"""
import math

import torch

from .. import toy
from .methods import Pair

STD = 0.5


def _mixture(means, logw):
    return toy.GaussianMixture(means, STD, torch.softmax(torch.as_tensor(logw, dtype=torch.float64), 0))


def _pair(name, means, ideal, strong, weak, note, kind):
    means = torch.as_tensor(means, dtype=torch.float64)
    return Pair(name, _mixture(means, strong), _mixture(means, weak), (means.shape[1],), _mixture(means, ideal), note,
                kind)


def _logit(p):
    return math.log(p / (1 - p))


def cases():
    """The suite's pairs (strong and weak mixtures, the ideal one), each with a one-line description."""
    one_d = [[-4.], [4.]]
    b = _logit(0.35)                               # strong: 35% left, ideal 50%
    pairs = [_pair(f'1d-r{r:g}', one_d, [0., 0.], [b, 0.], [r * b, 0.],
                   f'1-D, modes +-4; strong 35% left, weak {torch.sigmoid(torch.tensor(r * b)):.1%} left '
                   f'(bias ratio r = {r:g}: {verdict})', kind)
             for r, verdict, kind in ((2, 'first-order exact for the paper form', 'aligned (r = 2)'),
                                       (5, 'overshoots', 'aligned, weak far worse (r = 5)'),
                                       (0.5, 'weak better than strong', 'weak better than strong'))]
    four = [[-4., -4.], [-4., 4.], [4., -4.], [4., 4.]]
    gap = torch.tensor([-1., 1 / 3, 1 / 3, 1 / 3])        # strong under-weights (-4, -4): 8% instead of 25%
    ortho = torch.tensor([0., 1., -1., 0.])                 # orthogonal to gap, and to the constant direction
    pairs.append(Pair('2d-missing', *(toy.four_modes(w, STD) for w in ([.1, .3, .3, .3], [0., 1 / 3, 1 / 3, 1 / 3])),
                      (2,), toy.four_modes([.25] * 4, STD),
                      '2-D (+-4, +-4); strong 10% at (-4,-4), weak misses that mode (the paper\'s Fig. 5)',
                      'missing mode'))
    for name, diff in (('aligned', gap), ('orthogonal', ortho), ('opposite', -gap)):
        pairs.append(_pair(f'2d-{name}', four, [0.] * 4, gap, gap + diff,
                           f'2-D; weak - strong {name} to strong - ideal in log-weights', name))
    pairs.append(_pair('2d-control', four, [0.] * 4, [0.] * 4, gap,
                       '2-D control: strong equals ideal, weak biased', 'strong already ideal'))
    g = torch.Generator().manual_seed(16)
    means16 = 4 * torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0][:4]
    pairs.append(_pair('16d-aligned', means16, [0.] * 4, gap, 2 * gap,
                       '16-D, 4 orthogonal modes at radius 4; weak bias twice the strong one (r = 2)',
                       'aligned (16-D, r = 2)'))
    return pairs


def metric(pair, samples, seed):
    """Energy distance (primary), sliced W2, mode-weight TV and mean mode-location error against ideal samples."""
    n = len(samples)
    ref = pair.ideal.sample(n, torch.Generator().manual_seed(seed + 7))
    samples = samples.reshape(n, -1).to(torch.float64)
    weights, errors = toy.mode_stats(samples, pair.ideal.means)
    target = pair.ideal.weights.tolist()
    errors = [e for e in errors if e == e]
    return {
        'energy': toy.energy_distance(samples, ref),
        'sw2': toy.sliced_wasserstein(samples, ref, generator=torch.Generator().manual_seed(seed)),
        'mode_tv': 0.5 * sum(abs(w - t) for w, t in zip(weights, target)),
        'loc_err': sum(errors) / len(errors),
        **{f'w{k}': w for k, w in enumerate(weights)},
    }
