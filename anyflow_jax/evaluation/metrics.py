"""Metrics of the evaluation harness (numpy, float64).

* :func:`frechet_distance` - the Fréchet distance between Gaussians fitted to two feature sets
  (FID's formula, here in the feature space of :mod:`~anyflow_jax.evaluation.classifier`).
* :func:`conditional_accuracy` - the fraction of predictions equal to the requested labels.
* :func:`ode_distance` - the mean over samples of each sample's RMS difference to its reference.
* :func:`first_step_shift` - how far (pixels) the content moves from frame 0 to frame 1, on
  average: the continuity of an image-to-video continuation.
"""
from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "conditional_accuracy", "ode_distance", "gaussian_stats", "frechet_from_stats",
           "intensity_centroids", "first_step_shift"]


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (ddof = 1) of features ``(N, D)``, N >= 2."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain non-finite values")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False, ddof=1))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    a = 0.5 * (a + a.T)
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))``.

    The trace term uses the symmetric form ``tr((C1 C2)^(1/2)) = tr((S C2 S)^(1/2))`` with
    ``S = C1^(1/2)``: ``S C2 S`` is symmetric PSD, so both square roots are eigendecompositions
    (``eigh``) with tiny negative eigenvalues from round-off clipped at 0. This avoids the
    complex parts and the ill-conditioning of ``scipy.linalg.sqrtm`` on the non-symmetric
    product ``C1 C2`` for singular covariances. The result is clipped at 0 (it can only be
    negative by round-off).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances {c1.shape} / {c2.shape}")
    s = _psd_sqrt(c1)
    m = s @ c2 @ s
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets
    ``(Na, D)`` and ``(Nb, D)``. Zero for identical sets; ``|d|^2`` for a set and its shift by ``d``."""
    mu_a, c_a = gaussian_stats(feats_a)
    mu_b, c_b = gaussian_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_from_stats(mu_a, c_a, mu_b, c_b)


def conditional_accuracy(logits_or_preds, labels) -> float:
    """Fraction of samples whose prediction equals the label.

    ``logits_or_preds`` is either logits ``(N, K)`` (the prediction is the argmax) or integer
    predictions ``(N,)``; ``labels`` is ``(N,)``.
    """
    labels = np.asarray(labels)
    p = np.asarray(logits_or_preds)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if p.ndim == 2:
        p = p.argmax(axis=-1)
    elif p.ndim != 1:
        raise ValueError(f"expected logits (N, K) or predictions (N,), got shape {p.shape}")
    elif not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"1-D predictions must be integers, got dtype {p.dtype}")
    if p.shape[0] != labels.shape[0] or p.shape[0] == 0:
        raise ValueError(f"{p.shape[0]} predictions for {labels.shape[0]} labels")
    return float(np.mean(p == labels))


def ode_distance(samples, reference) -> float:
    """Mean over samples of the per-sample RMS difference to the reference:
    ``mean_i sqrt(mean_j (samples[i, j] - reference[i, j])^2)``, with ``j`` over all elements of
    one sample (frames, pixels, channels). In the data's units (videos in [-1, 1]): 0 means the
    sampler reproduces the reference ODE solution from the same noise exactly."""
    a = np.asarray(samples, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"samples {a.shape} and reference {b.shape} differ in shape")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError("need at least one sample")
    d = (a - b).reshape(a.shape[0], -1)
    return float(np.mean(np.sqrt(np.mean(d * d, axis=1))))


def intensity_centroids(frames, background: float = -1.0) -> np.ndarray:
    """``(N, 2)`` (row, col) centroids of frames ``(N, H, W, C)`` weighted by their intensity above
    ``background`` (moving digits: values in [-1, 1], background -1; channels summed, values below
    the background count 0). An empty frame has the centre of the canvas."""
    f = np.asarray(frames, np.float64)
    if f.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, C), got shape {f.shape}")
    w = np.clip(f - background, 0.0, None).sum(-1)
    total = w.sum((1, 2))
    rows, cols = np.mgrid[:f.shape[1], :f.shape[2]]
    centre = np.array([(f.shape[1] - 1) / 2, (f.shape[2] - 1) / 2])
    out = np.stack([(w * rows).sum((1, 2)), (w * cols).sum((1, 2))], -1) / np.maximum(total, 1e-12)[:, None]
    return np.where(total[:, None] > 0, out, centre)


def first_step_shift(videos, background: float = -1.0) -> float:
    """Mean over videos ``(N, F, H, W, C)`` of the distance (pixels) between the intensity
    centroids of frame 0 and frame 1. Real moving digits move 1-2 pixels per frame; a
    continuation that ignores its given frame 0 lands anywhere on the canvas."""
    v = np.asarray(videos, np.float64)
    if v.ndim != 5 or v.shape[1] < 2:
        raise ValueError(f"videos must be (N, F >= 2, H, W, C), got shape {v.shape}")
    d = intensity_centroids(v[:, 1], background) - intensity_centroids(v[:, 0], background)
    return float(np.mean(np.linalg.norm(d, axis=-1)))
