"""Evaluation metrics as pure numpy: preservation (SSIM, PSNR, L2, masked), KID, bootstrap CIs, Spearman ρ,
and the ground-truth sunglasses detector of the embedded benchmark.

Images are float arrays (H, W, 3) in [0, 1]; masks are boolean (H, W), True = pixels to score.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0  # identical images: PSNR is infinite; reported capped so JSON stays numeric


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Gaussian blur of (H, W) or (C, H, W) with reflect padding (the SSIM window of Wang et al. 2004)."""
    import torch
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = torch.from_numpy(k / k.sum())
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    t = t.reshape(-1, 1, *t.shape[-2:])  # (C, 1, H, W)
    t = torch.nn.functional.pad(t, (radius,) * 4, mode="reflect")
    t = torch.nn.functional.conv2d(t, k.view(1, 1, 1, -1))
    t = torch.nn.functional.conv2d(t, k.view(1, 1, -1, 1))
    return t.reshape(x.shape).numpy()


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004, eq. 13; Gaussian σ=1.5, K1=0.01, K2=0.03), averaged over channels: (H, W)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x, y = np.moveaxis(a, -1, 0).astype(np.float64), np.moveaxis(b, -1, 0).astype(np.float64)  # (C, H, W)
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    vx = _gaussian_filter(x * x) - mx * mx
    vy = _gaussian_filter(y * y) - my * my
    cxy = _gaussian_filter(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return m.mean(axis=0)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    m = ssim_map(a, b)
    return float(m[mask].mean() if mask is not None else m.mean())


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    return float(d[mask].mean() if mask is not None else d.mean())


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB for images in [0, 1]; identical images give PSNR_CAP."""
    e = mse(a, b, mask)
    return PSNR_CAP if e <= 10 ** (-PSNR_CAP / 10) else float(min(PSNR_CAP, 10 * np.log10(1.0 / e)))


def luminance(img: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of (H, W, 3) in [0, 1]."""
    return img @ np.array([0.299, 0.587, 0.114])


def colour_drift(out: np.ndarray, inp: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change of the mean RGB colour inside `mask`, in 0-255 units (global tint or lightening)."""
    return float(np.abs(out[mask].mean(0) - inp[mask].mean(0)).mean() * 255)


def kid(x: np.ndarray, y: np.ndarray, subset_size: int = 100, n_subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with k(a,b) = (a·b/d + 1)³.

    x (n, d), y (m, d) features. Averaged over random subsets of size min(subset_size, n, m).
    Returns (mean, std) over subsets.
    """
    rng = np.random.default_rng(seed)
    s = min(subset_size, len(x), len(y))
    if s < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    vals = []
    for _ in range(n_subsets):
        a = x[rng.choice(len(x), s, replace=False)].astype(np.float64)
        b = y[rng.choice(len(y), s, replace=False)].astype(np.float64)
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (s * (s - 1)) + (kyy.sum() - np.trace(kyy)) / (s * (s - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, stat=np.mean) -> list[float]:
    """Percentile bootstrap CI of `stat` over the first axis (images)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), (n_boot, len(v)))
    boots = np.array([stat(v[i]) for i in idx])
    return [float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))]


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation ρ (Pearson correlation of average ranks); 0 when either is constant."""
    rx, ry = _rank(np.asarray(x, float)), _rank(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(strengths: np.ndarray, per_image: np.ndarray, n_boot: int = 500, seed: int = 0) -> tuple[float, list[float]]:
    """ρ between strength and a per-image metric, with a bootstrap CI over images.

    per_image: (S, N) metric of image n at strength s. Resamples images, keeping each image's curve.
    """
    S, N = per_image.shape
    xs = np.repeat(np.asarray(strengths, float), N)
    rho = spearman(xs, per_image.reshape(-1))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, N, N)
        boots.append(spearman(xs, per_image[:, idx].reshape(-1)))
    return rho, [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
