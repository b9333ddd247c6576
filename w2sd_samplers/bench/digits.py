"""Real-data suite: small denoisers trained on CPU on scikit-learn's 8x8 handwritten digits.

Data: ``data/digits.npz`` is ``sklearn.datasets.load_digits()`` (1797 images, pixel values 0..16), a copy of the
test set of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998;
https://archive.ics.uci.edu/dataset/80, CC BY 4.0), written once with
``d = load_digits(); np.savez_compressed(path, images=d.images.astype(np.uint8), target=d.target.astype(np.uint8))``.
600 images are held out as references: 300 for scoring the tuning seeds, the other 300 for the evaluation seeds
(so hyperparameters are never chosen on the digits they are reported against); the rest train.

Models (one set per training seed): a strong MLP denoiser with Karras et al.'s preconditioning
(``k_diffusion.layers.Denoiser``), and two weak ones: the strong model's early checkpoint and a small model. A
classifier (64-256-64-10) supplies the 64-d features for the Frechet distance, the class balance and k-NN
precision/recall. Weights are cached as safetensors under ``cache_dir``, keyed by their training configuration.
"""
import hashlib
import json
import os
import pathlib

import k_diffusion as kd
import numpy as np
import torch
from torch import nn

from . import metrics
from .methods import Pair

DATA = pathlib.Path(__file__).parent / 'data' / 'digits.npz'
N_HELD_OUT = 600
STRONG = dict(width=256, depth=3, steps=4000)
EARLY_STEP = 400                  # the weak "earlier checkpoint" of the strong run
SMALL = dict(width=32, depth=2, steps=4000)


def load(split):
    """Digits as ``[N, 64]`` floats in [-1, 1] and labels; ``split`` is 'train' or 'held_out' (a fixed shuffle)."""
    with np.load(DATA) as f:
        images, labels = torch.from_numpy(f['images']).float(), torch.from_numpy(f['target']).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    idx = order[N_HELD_OUT:] if split == 'train' else order[:N_HELD_OUT]
    return images[idx].reshape(-1, 64) / 8 - 1, labels[idx]


class MLP(nn.Module):
    """The denoiser's inner network: pixels and Fourier features of log sigma in, preconditioned output out."""

    def __init__(self, width, depth, dim=64, freqs=8):
        super().__init__()
        self.register_buffer('freqs', torch.randn(freqs, generator=torch.Generator().manual_seed(1)) * 4)
        layers, d = [], dim + 2 * freqs
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, dim))

    def forward(self, x, sigma):
        angle = sigma.log()[:, None] / 4 * self.freqs[None]
        return self.net(torch.cat([x, angle.cos(), angle.sin()], 1))


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def cached_module(cache_dir, name, config, build, train, prefix='digits', seed=0):
    """``build()`` (initial weights from ``seed``) with weights loaded from the cache, or trained by
    ``train(module)`` and saved."""
    from safetensors.torch import load_file, save_file
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = pathlib.Path(cache_dir) / f'{prefix}-{name}-{key}.safetensors'
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)       # the initial weights are part of the configuration
        module = build()
    if path.exists():
        module.load_state_dict(load_file(path))
    else:
        train(module)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix('.tmp')
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp)
        os.replace(tmp, path)
    return module.eval().requires_grad_(False)


def train_denoiser(model, data, steps, seed, snapshot_at=None, stop_at_snapshot=False, batch=256, lr=2e-3,
                    sigma_loc=-1.2, sigma_scale=1.2, extra=None):
    """Karras et al.'s loss with log-normal sigmas; returns a copy of the weights after ``snapshot_at`` steps.

    ``extra(indices)`` (optional) gives the model's extra args for a batch of ``data`` rows (e.g. class labels).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    snapshot = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(1, steps + 1):
            idx = torch.randint(len(data), (batch,))
            sigma = kd.utils.rand_log_normal([batch], loc=sigma_loc, scale=sigma_scale)
            loss = model.loss(data[idx], torch.randn_like(data[idx]), sigma, **(extra(idx) if extra else {})).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step == snapshot_at:
                snapshot = {k: v.clone() for k, v in model.state_dict().items()}
                if stop_at_snapshot:
                    break
    return snapshot


def _train_classifier(model, x, y, epochs=400):
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(epochs):
            loss = nn.functional.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def models(cache_dir, seed=0, quick=False):
    """Trained (or cached) strong, early-checkpoint and small denoisers from training seed ``seed`` (initial weights
    and training noise), and the classifier (one for every seed)."""
    x, y = load('train')
    sigma_data = float(x.std())
    scale = 8 if quick else 1
    strong_cfg = dict(STRONG, steps=STRONG['steps'] // scale, sigma_data=sigma_data, version=2, seed=seed)
    small_cfg = dict(SMALL, steps=SMALL['steps'] // scale, sigma_data=sigma_data, version=2, seed=seed)
    early_cfg = dict(strong_cfg, early=EARLY_STEP // scale)

    def denoiser(cfg):
        return lambda: kd.layers.Denoiser(MLP(cfg['width'], cfg['depth']), sigma_data)

    snapshot = {}

    def train_strong(m):
        snapshot['early'] = train_denoiser(m, x, strong_cfg['steps'], 1 + 10 * seed, early_cfg['early'])
    strong = cached_module(cache_dir, 'strong', strong_cfg, denoiser(strong_cfg), train_strong, seed=seed)

    def train_early(m):
        if 'early' not in snapshot:   # strong came from the cache: replay its run up to the snapshot
            snapshot['early'] = train_denoiser(m, x, strong_cfg['steps'], 1 + 10 * seed, early_cfg['early'],
                                               stop_at_snapshot=True)
        m.load_state_dict(snapshot['early'])
    early = cached_module(cache_dir, 'early', early_cfg, denoiser(strong_cfg), train_early, seed=seed)
    small = cached_module(cache_dir, 'small', small_cfg, denoiser(small_cfg),
                          lambda m: train_denoiser(m, x, small_cfg['steps'], seed=2 + 10 * seed), seed=seed)
    classifier = cached_module(cache_dir, 'classifier', dict(epochs=400 // scale, version=2), Classifier,
                               lambda m: _train_classifier(m, x, y, 400 // scale))
    return strong, early, small, classifier


class DigitsMetric:
    """Frechet distance in the classifier's feature space (primary), class-balance TV, precision and recall,
    against the held-out digits: the first half for ``tune_seeds``, the second half for every other seed. Samples
    are clamped to the pixel range first, as an image would be saved."""

    def __init__(self, classifier, tune_seeds):
        self.classifier, self.tune_seeds = classifier, set(tune_seeds)
        ref, labels = load('held_out')
        half = N_HELD_OUT // 2
        self.refs = {True: (classifier.features(ref[:half]), labels[:half]),
                     False: (classifier.features(ref[half:]), labels[half:])}

    def __call__(self, pair, samples, seed):
        ref_feats, ref_labels = self.refs[seed in self.tune_seeds]
        x = samples.reshape(len(samples), -1).clamp(-1, 1).float()
        feats = self.classifier.features(x)
        labels = self.classifier.head(feats).argmax(1)
        precision, recall = metrics.precision_recall(feats, ref_feats)
        return {
            'fd': metrics.frechet_distance(feats, ref_feats),
            'class_tv': metrics.class_balance_tv(labels, ref_labels, 10),
            'precision': precision,
            'recall': recall,
        }

    def floor(self):
        """The metrics of real training digits (as many as the evaluation reference) against the evaluation
        reference: what a perfect model would score."""
        x, _ = load('train')
        return self(None, x[:N_HELD_OUT // 2], -1)


def classifier_accuracy(classifier):
    x, y = load('held_out')
    return float((classifier(x).argmax(1) == y).double().mean())


def cases(cache_dir, tune_seeds, seeds=(0, 1, 2), quick=False):
    """The pairs of every training seed in ``seeds`` (named ``<pair>/m<seed>``), the metric and the classifier."""
    pairs = []
    for seed in seeds:
        strong, early, small, classifier = models(cache_dir, seed, quick)
        pairs += [Pair(f'digits-small/m{seed}', strong, small, (64,), note='strong MLP (256x3) vs a small MLP (32x2)',
                       kind='quality gap (smaller network)', group='digits-small', model=seed),
                  Pair(f'digits-early/m{seed}', strong, early, (64,), kind='quality gap (early checkpoint)',
                       note=f'strong MLP vs its own checkpoint after {EARLY_STEP // (8 if quick else 1)} steps',
                       group='digits-early', model=seed)]
    return pairs, DigitsMetric(classifier, tune_seeds), classifier
