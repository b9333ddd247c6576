"""Sample-quality metrics in a feature space: Frechet distance, class balance, k-NN precision and recall.

Energy distance, sliced Wasserstein and per-mode statistics for the Gaussian mixtures live in
:mod:`w2sd_samplers.toy`.
"""
import torch


def _psd_sqrt(m):
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_gaussians(mu1, cov1, mu2, cov2):
    """Squared 2-Wasserstein (Frechet) distance between N(mu1, cov1) and N(mu2, cov2).

    ``tr(sqrt(cov1 cov2))`` is computed as ``tr(sqrt(s cov2 s))`` with ``s = cov1^(1/2)``: the same eigenvalues,
    but a symmetric matrix, so no complex parts from round-off.
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, cov1, mu2, cov2))
    s = _psd_sqrt(cov1)
    cross = torch.linalg.eigvalsh(s @ cov2 @ s).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * cross)


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two feature sets ``[N, d]`` (FID's formula)."""
    a, b = feats_a.to(torch.float64), feats_b.to(torch.float64)
    return frechet_gaussians(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def class_balance_tv(labels, reference_labels, num_classes):
    """Total-variation distance between the class histograms of generated and reference samples."""
    p = torch.bincount(labels, minlength=num_classes).double() / len(labels)
    q = torch.bincount(reference_labels, minlength=num_classes).double() / len(reference_labels)
    return float(0.5 * (p - q).abs().sum())


def precision_recall(fake, real, k=3):
    """Kynkaanniemi et al. (2019) improved precision and recall with k-NN balls in feature space.

    Precision: the fraction of ``fake`` inside some real sample's k-NN ball; recall: the reverse.
    """
    def covered(queries, support):
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values      # +1 skips the point itself
        return (torch.cdist(queries, support) <= radii[None]).any(1).double().mean()
    fake, real = fake.to(torch.float64), real.to(torch.float64)
    return float(covered(fake, real)), float(covered(real, fake))
