"""Image suite with a known ideal: small conv UNets trained on CPU on procedural 16x16 RGB shapes.

The paper's class-balance experiment (a strong model that learned a class ratio wrongly), made exact. Every image
is one of a finite set of templates: a filled square or a plus sign of side 6 or 8, in red, green or blue, at any
even position where it fits, on black. The ideal distribution puts probability 1/2 on each class and is uniform over
colour, size and position, so every template has a known probability. A generated image is read off by its
nearest template (exact code, no learned classifier): its class, colour, size and position, and whether it is a
valid image at all (RMS distance to that template below ``VALID_RMS``).

Models: ``k_diffusion.layers.Denoiser`` around a small conv UNet (FiLM on Fourier features of log sigma, run on
2x2 pixel patches), all trained from the same initial weights and noise sequence, so that two models differ only
in what the pair is about: the strong model on 35% squares; weak models: the strong one fine-tuned on 20% squares
(aligned with the strong model's error) or on 65% squares (biased the other way), the strong run's early
checkpoint, and a smaller network trained like the strong one.
A small CNN trained on ideal images supplies features for a Frechet distance. Weights are cached as safetensors.
"""
import torch
from torch import nn
from torch.nn import functional as F

import k_diffusion as kd

from . import digits, metrics
from .methods import Pair

SIZE = 16
CLASSES = ('square', 'plus')
COLOURS = ((1., -1., -1.), (-1., 1., -1.), (-1., -1., 1.))     # red, green, blue in [-1, 1]
SIDES = (6, 8)
STRIDE = 4                       # positions on a 4-pixel grid (aligned with the UNet's 2x2 patches)
IDEAL_SQUARES = 0.5
VALID_RMS = 0.25                 # per-pixel RMS distance to the nearest template (pixel range 2)
STRONG = dict(channels=(16, 32), steps=1500, squares=0.35, lr=3e-3)
WEAK_RATIOS = {'aligned': 0.2, 'opposite': 0.65}
FINE_TUNE = dict(steps=300, lr=1e-3)      # the biased weak models: the strong one fine-tuned on another ratio
SMALL = dict(channels=(8, 16))
EARLY_FRACTION = 8               # the early checkpoint: after steps // 8 of the strong run


def _templates():
    """All templates ``[M, 3, 16, 16]`` and their attributes (class, colour, side, x, y), each ``[M]``."""
    images, attrs = [], []
    for c, _ in enumerate(CLASSES):
        for k, colour in enumerate(COLOURS):
            for side in SIDES:
                mask = torch.ones(side, side)
                if CLASSES[c] == 'plus':      # two bars of thickness 2 through the centre
                    mask = torch.zeros(side, side)
                    mid = side // 2
                    mask[mid - 1:mid + 1] = 1
                    mask[:, mid - 1:mid + 1] = 1
                for y in range(0, SIZE - side + 1, STRIDE):
                    for x in range(0, SIZE - side + 1, STRIDE):
                        m = torch.zeros(SIZE, SIZE)
                        m[y:y + side, x:x + side] = mask
                        col = torch.tensor(colour)[:, None, None]
                        images.append(m * col + (1 - m) * -1.)
                        attrs.append((c, k, side, x, y))
    return torch.stack(images), torch.tensor(attrs).T


TEMPLATES, ATTRS = _templates()


def template_probs(squares):
    """Probability of every template when a fraction ``squares`` of images are squares (the rest uniform)."""
    cls, _, side, _, _ = ATTRS
    p_cls = torch.where(cls == 0, squares, 1 - squares).double()
    positions = ((SIZE - side) // STRIDE + 1).double() ** 2
    return p_cls / len(COLOURS) / len(SIDES) / positions


def sample(n, squares, generator):
    """``n`` images ``[n, 3, 16, 16]`` drawn exactly from the generator, and their template indices."""
    idx = torch.multinomial(template_probs(squares), n, replacement=True, generator=generator)
    return TEMPLATES[idx], idx


def read_off(images):
    """Nearest template index and validity of each image (clamped to the pixel range first, as saved)."""
    x = images.reshape(len(images), -1).clamp(-1, 1).double()
    t = TEMPLATES.reshape(len(TEMPLATES), -1).double()
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ t.T + (t * t).sum(1)[None]
    best, idx = d2.min(1)
    return idx, (best.clamp(min=0) / x.shape[1]).sqrt() < VALID_RMS


def _tv(p, q):
    return float(0.5 * (p - q).abs().sum())


def attribute_stats(images):
    """Exact read-off statistics against the ideal distribution.

    class_tv: TV between the (square, plus, invalid) frequencies and the ideal (1/2, 1/2, 0);
    ratio_err: |fraction of squares among valid images - 1/2|; valid: fraction of valid images;
    attr_tv: mean TV of the colour, side, x and y distributions of the valid images against the ideal.
    """
    idx, valid = read_off(images)
    n = len(images)
    cls = ATTRS[0][idx]
    freq = torch.stack([((cls == c) & valid).double().sum() / n for c in range(len(CLASSES))]
                       + [1 - valid.double().mean()])
    out = {'class_tv': _tv(freq, torch.tensor([IDEAL_SQUARES, 1 - IDEAL_SQUARES, 0.], dtype=torch.float64)),
           'valid': float(valid.double().mean())}
    ideal = template_probs(IDEAL_SQUARES)
    tvs = []
    if valid.any():
        out['ratio_err'] = abs(float((cls[valid] == 0).double().mean()) - IDEAL_SQUARES)
        for a in range(1, 5):
            values = ATTRS[a]
            k = int(values.max()) + 1
            got = torch.bincount(values[idx[valid]], minlength=k).double() / int(valid.sum())
            tvs.append(_tv(got, torch.zeros(k, dtype=torch.float64).index_add_(0, values, ideal)))
    else:
        out['ratio_err'] = IDEAL_SQUARES
    out['attr_tv'] = sum(tvs) / len(tvs) if tvs else 1.
    return out


class _Block(nn.Module):
    """Two 3x3 convolutions with a FiLM of the noise-level embedding between them, and a residual."""

    def __init__(self, c_in, c_out, emb):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.film = nn.Linear(emb, 2 * c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, 1)
        h = F.silu(F.silu(self.conv1(x)) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class UNet(nn.Module):
    """A two-level UNet on 2x2 pixel patches (8x8 then 4x4): small enough to train in minutes on a CPU."""

    def __init__(self, channels, emb=32):
        super().__init__()
        c0, c1 = channels
        self.fourier = kd.layers.FourierFeatures(1, emb)
        self.embed = nn.Sequential(nn.Linear(emb, emb), nn.SiLU())
        self.proj_in, self.proj_out = nn.Conv2d(12, c0, 3, padding=1), nn.Conv2d(c0, 12, 3, padding=1)
        self.down0, self.down1, self.mid = _Block(c0, c0, emb), _Block(c0, c1, emb), _Block(c1, c1, emb)
        self.up1, self.up0 = _Block(2 * c1, c1, emb), _Block(c1 + c0, c0, emb)

    def forward(self, x, sigma):
        emb = self.embed(self.fourier(sigma.log()[:, None] / 4))
        h0 = self.down0(self.proj_in(F.pixel_unshuffle(x, 2)), emb)
        h1 = self.down1(F.avg_pool2d(h0, 2), emb)
        h = self.mid(F.avg_pool2d(h1, 2), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.), h1], 1), emb)
        h = self.up0(torch.cat([F.interpolate(h, scale_factor=2.), h0], 1), emb)
        return F.pixel_shuffle(self.proj_out(h), 2)


class Classifier(nn.Module):
    """Predicts (class, colour, side) of an image; its 64-d penultimate layer gives the Frechet features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, len(CLASSES) * len(COLOURS) * len(SIDES))

    def forward(self, x):
        return self.head(self.features(x))


def _label(idx):
    cls, colour, side, _, _ = ATTRS[:, idx]
    return (cls * len(COLOURS) + colour) * len(SIDES) + (side == SIDES[1]).long()


def _train_classifier(model, steps):
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            x, idx = sample(128, IDEAL_SQUARES, g)
            loss = F.cross_entropy(model(x + 0.2 * torch.randn_like(x)), _label(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()


def models(cache_dir, quick=False):
    """Trained (or cached) denoisers {'strong', 'aligned', 'opposite', 'early', 'small'} and the classifier."""
    scale = 10 if quick else 1
    steps = STRONG['steps'] // scale
    data = {}

    def training_set(squares):       # the same draws for every ratio: the images differ only where the class does
        if squares not in data:
            data[squares] = sample(20000 // scale, squares, torch.Generator().manual_seed(1))[0]
        return data[squares]

    def denoiser(channels):
        return lambda: kd.layers.Denoiser(UNet(channels), sigma_data=0.8)

    def config(**kw):
        return {**STRONG, 'steps': steps, **kw, 'suite': 'shapes', 'version': 1}

    def trained(name, cfg, snapshot=None, start=None):
        def train(m):
            if start is not None:
                m.load_state_dict(start.state_dict())
            out = digits.train_denoiser(m, training_set(cfg['squares']), cfg['steps'], 1, snapshot_at=snapshot,
                                         stop_at_snapshot=snapshot is not None, batch=64, lr=cfg['lr'])
            if snapshot is not None:
                m.load_state_dict(out)
        return digits.cached_module(cache_dir, name, cfg, denoiser(cfg['channels']), train, prefix='shapes')

    early_at = max(1, steps // EARLY_FRACTION)
    out = {'strong': trained('strong', config()),
           'early': trained('early', config(early=early_at), snapshot=early_at),
           'small': trained('small', config(channels=SMALL['channels']))}
    for name, squares in WEAK_RATIOS.items():
        tune = dict(steps=FINE_TUNE['steps'] // scale, lr=FINE_TUNE['lr'])
        out[name] = trained(name, config(squares=squares, fine_tuned=tune, **tune), start=out['strong'])
    classifier = digits.cached_module(cache_dir, 'classifier', dict(steps=600 // scale, version=1), Classifier,
                                lambda m: _train_classifier(m, 600 // scale), prefix='shapes')
    return out, classifier


class ShapesMetric:
    """Exact read-off statistics (``attribute_stats``) and the Frechet distance in the classifier's features
    against as many ideal images, drawn afresh for each seed (so tuning and evaluation references are disjoint)."""

    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, pair, samples, seed):
        ref, _ = sample(len(samples), IDEAL_SQUARES, torch.Generator().manual_seed(seed + 7))
        x = samples.clamp(-1, 1).float()
        return {**attribute_stats(x),
                'fd': metrics.frechet_distance(self.classifier.features(x), self.classifier.features(ref))}


def cases(cache_dir, quick=False):
    m, classifier = models(cache_dir, quick)
    shape = (3, SIZE, SIZE)
    s = f'{STRONG["squares"]:.0%} squares'
    pairs = [Pair('shapes-aligned', m['strong'], m['aligned'], shape, kind='aligned',
                  note=f'strong on {s}, weak on {WEAK_RATIOS["aligned"]:.0%} (the same error, larger); ideal 50%'),
             Pair('shapes-opposite', m['strong'], m['opposite'], shape, kind='opposite',
                  note=f'strong on {s}, weak on {WEAK_RATIOS["opposite"]:.0%} (biased the other way)'),
             Pair('shapes-early', m['strong'], m['early'], shape, kind='quality gap (early checkpoint)',
                  note=f'strong vs its own checkpoint after 1/{EARLY_FRACTION} of training, both on {s}'),
             Pair('shapes-small', m['strong'], m['small'], shape, kind='quality gap (smaller network)',
                  note=f'strong UNet {STRONG["channels"]} vs a smaller one {SMALL["channels"]}, both on {s}')]
    return pairs, ShapesMetric(classifier), classifier
