"""Image suite with a known ideal: small conv UNets trained on CPU on procedural 16x16 RGB shapes.

The paper's class-balance experiment (a strong model that learned a class ratio wrongly), made exact. Every image
is one of 24 templates: a filled square or a plus sign of side 8, in red, green or blue, in one of the four
quadrants, on black. The ideal distribution puts probability 1/2 on each class and is uniform over colour and
position, so every template has a known probability. A generated image is read off by its nearest template (exact
code, no learned classifier): its class, colour and position, and whether it is a valid image at all (RMS
distance to that template below ``VALID_RMS``, less than half the distance between the two closest templates).

Models (one set per training seed): ``k_diffusion.layers.Denoiser`` around a small conv UNet (FiLM on Fourier
features of log sigma, run on 2x2 pixel patches): the strong model on 35% squares; weak models: the strong one
fine-tuned on 20% squares (aligned with the strong model's error), on 65% (biased the other way) or on the same 35%
(the null control); a class-conditional UNet for a CFG pair. The exact pair
uses the closed-form denoisers of the template mixture instead. A small CNN trained on ideal images supplies features
for a Frechet distance. Weights are cached as safetensors.
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
SIDES = (8,)
STRIDE = 8                       # four positions (the quadrants), aligned with the UNet's 2x2 patches
IDEAL_SQUARES = 0.5
# a valid image is within VALID_RMS (per-pixel RMS, pixel range 2) of its nearest template; the two closest templates
# (a square and a plus at one place) are 0.433 apart, more than 2 * VALID_RMS, so a valid image's nearest template is
# unique with a margin: every other template is at least 0.433 - 0.15 = 0.283 away, and a 50/50 blend of two
# templates is invalid
VALID_RMS = 0.15
# the strong model: trained on 35% squares; noise levels log-normal around sigma = e^0.5, where these templates
# (RMS 0.43-0.82 apart) separate
STRONG = dict(channels=(16, 32), steps=5000, squares=0.35, lr=3e-3, sigma_loc=0.5, sigma_scale=1.5)
# weak models: the strong one fine-tuned on another ratio; 'null' on the strong model's own ratio (the control: what
# fine-tuning alone changes)
WEAK_RATIOS = {'aligned': 0.2, 'null': 0.35, 'opposite': 0.65}
FINE_TUNE = dict(steps=300, lr=1e-3)
LABEL_DROP = 0.2                 # the class-conditional model: its label is dropped (-> unconditional) this often
COND_STEPS = 3000                # and its training steps (fewer than the strong model's: this CPU's budget)
EXACT_STD = 0.05                 # the exact pair's templates are Gaussians of this per-pixel std
MODELS = (0, 1, 2)               # training seeds (retrained models)


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


def attribute_stats(images, labels=None):
    """Exact read-off statistics against the ideal distribution.

    class_tv (primary): TV between the frequencies of (square, plus, invalid) and the ideal (1/2, 1/2, 0); for a
    class-conditional model asked for ``labels`` (0 square, 1 plus per image), TV between the joint frequencies of
    (label asked, read-off) and the ideal (every image of its label), which is the fraction of images that are
    invalid or of the other class. ratio_err: |fraction of squares among valid images - 1/2|; valid: fraction
    of valid images; attr_tv: mean TV of the colour, x and y distributions of the valid images against the ideal.
    """
    idx, valid = read_off(images)
    n = len(images)
    outcome = torch.where(valid, ATTRS[0][idx], len(CLASSES))          # 0 square, 1 plus, 2 invalid
    if labels is None:
        freq = torch.bincount(outcome, minlength=len(CLASSES) + 1).double() / n
        ideal_freq = torch.tensor([IDEAL_SQUARES, 1 - IDEAL_SQUARES, 0.], dtype=torch.float64)
    else:
        cells = len(CLASSES) + 1
        freq = torch.bincount(labels * cells + outcome, minlength=len(CLASSES) * cells).double() / n
        ideal_freq = torch.bincount(labels * cells + labels, minlength=len(CLASSES) * cells).double() / n
    out = {'class_tv': _tv(freq, ideal_freq), 'valid': float(valid.double().mean())}
    cls = ATTRS[0][idx]
    ideal = template_probs(IDEAL_SQUARES)
    tvs = []
    if valid.any():
        out['squares'] = float((cls[valid] == 0).double().mean())
        out['ratio_err'] = abs(out['squares'] - IDEAL_SQUARES)
        for a in (1, 3, 4):
            values = ATTRS[a]
            k = int(values.max()) + 1
            got = torch.bincount(values[idx[valid]], minlength=k).double() / int(valid.sum())
            tvs.append(_tv(got, torch.zeros(k, dtype=torch.float64).index_add_(0, values, ideal)))
    else:
        out['squares'], out['ratio_err'] = float('nan'), IDEAL_SQUARES
    out['attr_tv'] = sum(tvs) / len(tvs) if tvs else 1.
    return out


class TemplateMixture:
    """The exact denoiser of a mixture of isotropic Gaussians of one std ``EXACT_STD`` around the templates, with
    template probabilities ``template_probs(squares)``: ``toy.GaussianMixture``'s posterior mean, with the squared
    distances as one matrix product (all components share the std, so the image-space sum is cheap)."""

    def __init__(self, squares, std=EXACT_STD):
        self.means = TEMPLATES.reshape(len(TEMPLATES), -1).double()
        self.log_w, self.std = template_probs(squares).log(), std

    def __call__(self, x, sigma):
        flat = x.reshape(len(x), -1).double()
        var = (self.std ** 2 + sigma.double() ** 2)[:, None]                                       # [B, 1]
        sq = (flat * flat).sum(1, keepdim=True) - 2 * flat @ self.means.T + (self.means ** 2).sum(1)[None]
        resp = torch.softmax(self.log_w[None] - 0.5 * sq / var, 1)
        shrink = self.std ** 2 / var
        return (shrink * flat + (1 - shrink) * resp @ self.means).reshape(x.shape).to(x.dtype)

    def sample(self, n, generator=None):
        idx = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        return (self.means[idx] + self.std * torch.randn(n, self.means.shape[1], generator=generator,
                                                         dtype=torch.float64)).reshape(n, 3, SIZE, SIZE)


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

    def __init__(self, channels, emb=32, classes=0):
        super().__init__()
        c0, c1 = channels
        # class-conditional: one embedding per class and one more for "no label" (index ``classes``)
        self.label = nn.Embedding(classes + 1, emb) if classes else None
        self.fourier = kd.layers.FourierFeatures(1, emb)
        self.embed = nn.Sequential(nn.Linear(emb, emb), nn.SiLU())
        self.proj_in, self.proj_out = nn.Conv2d(12, c0, 3, padding=1), nn.Conv2d(c0, 12, 3, padding=1)
        self.down0, self.down1, self.mid = _Block(c0, c0, emb), _Block(c0, c1, emb), _Block(c1, c1, emb)
        self.up1, self.up0 = _Block(2 * c1, c1, emb), _Block(c1 + c0, c0, emb)

    def forward(self, x, sigma, label=None):
        emb = self.embed(self.fourier(sigma.log()[:, None] / 4))
        if self.label is not None:
            emb = emb + self.label(label)
        h0 = self.down0(self.proj_in(F.pixel_unshuffle(x, 2)), emb)
        h1 = self.down1(F.avg_pool2d(h0, 2), emb)
        h = self.mid(F.avg_pool2d(h1, 2), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.), h1], 1), emb)
        h = self.up0(torch.cat([F.interpolate(h, scale_factor=2.), h0], 1), emb)
        return F.pixel_shuffle(self.proj_out(h), 2)


class Classifier(nn.Module):
    """Predicts the template of an image; its 64-d penultimate layer gives the Frechet features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, len(TEMPLATES))

    def forward(self, x):
        return self.head(self.features(x))


def _train_classifier(model, steps):
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            x, idx = sample(128, IDEAL_SQUARES, g)
            loss = F.cross_entropy(model(x + 0.2 * torch.randn_like(x)), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()


def models(cache_dir, seed=0, quick=False, conditional=True):
    """Trained (or cached) denoisers {'strong', 'aligned', 'null', 'opposite'} and, if ``conditional``, the
    class-conditional one, from training seed ``seed`` (initial weights, training set and noise), and the
    classifier (one for every seed)."""
    scale = 10 if quick else 1
    steps = STRONG['steps'] // scale
    data = {}

    def training_set(squares):       # the same draws for every ratio: the images differ only where the class does
        if squares not in data:
            data[squares] = sample(20000 // scale, squares, torch.Generator().manual_seed(1 + seed))
        return data[squares]

    def denoiser(channels, classes=0):
        return lambda: kd.layers.Denoiser(UNet(channels, classes=classes), sigma_data=0.8)

    def config(**kw):
        return {**STRONG, 'steps': steps, **kw, 'suite': 'shapes', 'version': 3, 'seed': seed}

    snapshots = {}

    def trained(name, cfg, start=None, classes=0):
        def train(m):
            if start is not None:
                m.load_state_dict(start.state_dict())
            images, idx = training_set(cfg['squares'])
            extra = None
            if classes:                 # the class label, dropped to "no label" (index ``classes``) at random
                def extra(rows):
                    label = ATTRS[0][idx[rows]]
                    return {'label': torch.where(torch.rand(len(rows)) < LABEL_DROP, classes, label)}
            digits.train_denoiser(m, images, cfg['steps'], 1 + seed, batch=64, lr=cfg['lr'],
                                  sigma_loc=cfg['sigma_loc'], sigma_scale=cfg['sigma_scale'], extra=extra)
        return digits.cached_module(cache_dir, name, cfg, denoiser(cfg['channels'], classes), train,
                                    prefix='shapes', seed=seed)

    out = {'strong': trained('strong', config())}
    if conditional:
        out['conditional'] = trained('conditional', config(label_drop=LABEL_DROP, steps=COND_STEPS // scale),
                                     classes=len(CLASSES))
    for name, squares in WEAK_RATIOS.items():
        tune = dict(steps=FINE_TUNE['steps'] // scale, lr=FINE_TUNE['lr'])
        out[name] = trained(name, config(squares=squares, fine_tuned=tune, **tune), start=out['strong'])
    classifier = digits.cached_module(cache_dir, 'classifier', dict(steps=600 // scale, version=3), Classifier,
                                      lambda m: _train_classifier(m, 600 // scale), prefix='shapes')
    return out, classifier


def asked_labels(n):
    """The labels a class-conditional pair asks for: square, plus, square, ... (half each for even ``n``)."""
    return torch.arange(n) % len(CLASSES)


def _conditional(model, labels):
    """The model as a denoiser of the labels ``labels(batch size)``."""
    def denoiser(x, sigma):
        return model(x, sigma, label=labels(len(x)))
    return denoiser


class ShapesMetric:
    """Exact read-off statistics (``attribute_stats``; for a class-conditional pair against the labels it asked
    for) and the Frechet distance in the classifier's features against as many ideal images, drawn afresh for each
    seed (so tuning and evaluation references are disjoint)."""

    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, pair, samples, seed):
        ref, _ = sample(len(samples), IDEAL_SQUARES, torch.Generator().manual_seed(seed + 7))
        x = samples.clamp(-1, 1).float()
        labels = asked_labels(len(x)) if pair is not None and pair.kind.startswith('class-conditional') else None
        return {**attribute_stats(x, labels),
                'fd': metrics.frechet_distance(self.classifier.features(x), self.classifier.features(ref))}


def cases(cache_dir, seeds=MODELS, quick=False, exact_cells=None, conditional_seeds=(0,)):
    """The pairs of every training seed in ``seeds`` (named ``<pair>/m<seed>``; the class-conditional pair for
    ``conditional_seeds`` only), then the exact pair."""
    shape = (3, SIZE, SIZE)
    s = f'{STRONG["squares"]:.0%} squares'
    pairs = []
    for seed in seeds:
        m, classifier = models(cache_dir, seed, quick, conditional=seed in conditional_seeds)

        def pair(group, strong, weak, kind, note):
            return Pair(f'{group}/m{seed}', strong, weak, shape, note=note, kind=kind, group=group, model=seed)
        pairs += [pair('shapes-aligned', m['strong'], m['aligned'], 'aligned',
                       f'strong on {s}, weak fine-tuned on {WEAK_RATIOS["aligned"]:.0%} (the same error, larger); '
                       'ideal 50%'),
                  pair('shapes-null', m['strong'], m['null'], 'null control (weak fine-tuned on the same ratio)',
                       f'strong on {s}, weak fine-tuned like the aligned one but on the same {s}'),
                  pair('shapes-opposite', m['strong'], m['opposite'], 'opposite',
                       f'strong on {s}, weak fine-tuned on {WEAK_RATIOS["opposite"]:.0%} (biased the other way)')]
        if 'conditional' in m:
            pairs.append(pair('shapes-cfg', _conditional(m['conditional'], asked_labels),
                              _conditional(m['conditional'], lambda n: torch.full([n], len(CLASSES))),
                              'class-conditional: CFG pair (W2SD = Z-Sampling)',
                              f'one class-conditional UNet trained on {s} (label dropped {LABEL_DROP:.0%} of the '
                              'time): strong = conditional on the asked label (square, plus alternately), weak = '
                              'unconditional; autoguidance on this pair is CFG at scale 1 + w, W2SD is Z-Sampling'))
    pairs.append(Pair('shapes-exact', TemplateMixture(STRONG['squares']), TemplateMixture(WEAK_RATIOS['aligned']),
                      shape, TemplateMixture(IDEAL_SQUARES), kind='aligned, exact denoisers', cells=exact_cells,
                      note=f'exact denoisers of the template mixture (Gaussians of std {EXACT_STD} per pixel): '
                           f'strong {s}, weak {WEAK_RATIOS["aligned"]:.0%}, ideal 50%: the class-balance mechanism '
                           'without model error'))
    return pairs, ShapesMetric(classifier), classifier
