"""Reconstruction metrics for image tokenizers, in torch: PSNR, SSIM, codebook usage, code perplexity, FID.

* PSNR and SSIM are per image (the mean over a set is the reported figure). SSIM is Wang et al. 2004 with an 11x11
  Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, "valid" filtering, computed per channel and averaged (the
  convention of scikit-image's ``channel_axis`` mode and pytorch-msssim); ``luminance=True`` instead computes it on
  ITU-R BT.601 luma. Pass images in the same range and give that range as ``data_range`` (255 for uint8 values).
* Codebook statistics come from a histogram per level (:class:`CodeStats` accumulates them batch by batch): usage =
  fraction of codes used at least once, perplexity = ``exp(entropy)`` of the code distribution (natural log), which
  equals K for a uniform use of K codes.
* FID is the Frechet distance between Gaussians fitted to features of real and reconstructed images
  (:func:`frechet_distance`); the feature extractor is supplied by the caller (see ``data_process/eval_recon.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def psnr(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(range^2 / MSE)``; ``inf`` for identical images."""
    if a_BCHW.shape != b_BCHW.shape:
        raise ValueError(f"shape mismatch: {tuple(a_BCHW.shape)} vs {tuple(b_BCHW.shape)}")
    mse_B = (a_BCHW.double() - b_BCHW.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / mse_B)).float()  # mse 0 -> inf


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter(x_BCHW: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter per channel."""
    c = x_BCHW.shape[1]
    x = F.conv2d(x_BCHW, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along width
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along height


def ssim(
    a_BCHW: torch.Tensor,
    b_BCHW: torch.Tensor,
    data_range: float = 255.0,
    window: int = 11,
    sigma: float = 1.5,
    luminance: bool = False,
) -> torch.Tensor:
    """Per-image SSIM (mean of the SSIM map over positions and channels); 1 for identical images."""
    if a_BCHW.shape != b_BCHW.shape:
        raise ValueError(f"shape mismatch: {tuple(a_BCHW.shape)} vs {tuple(b_BCHW.shape)}")
    if min(a_BCHW.shape[-2:]) < window:
        raise ValueError(f"images smaller than the SSIM window ({window}): {tuple(a_BCHW.shape)}")
    a, b = a_BCHW.double(), b_BCHW.double()
    if luminance:
        if a.shape[1] != 3:
            raise ValueError(f"luminance SSIM needs RGB input, got {a.shape[1]} channels")
        w = torch.tensor(_LUMA, dtype=torch.float64).view(1, 3, 1, 1)
        a, b = (a * w).sum(1, keepdim=True), (b * w).sum(1, keepdim=True)
    g = gaussian_window(window, sigma).to(a.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1).float()


def usage_from_counts(counts_K: torch.Tensor) -> float:
    """Fraction of the K codes used at least once."""
    return float((counts_K > 0).sum()) / counts_K.numel()


def perplexity_from_counts(counts_K: torch.Tensor) -> float:
    """``exp(-sum p log p)`` of the empirical code distribution; 0 when nothing was counted."""
    total = counts_K.sum()
    if total == 0:
        return 0.0
    p = counts_K[counts_K > 0].double() / total
    return math.exp(float(-(p * p.log()).sum()))


class CodeStats:
    """Per-level code histograms accumulated over batches of serialised codes."""

    def __init__(self, level_sizes: Sequence[int]) -> None:
        self.level_sizes = tuple(int(k) for k in level_sizes)
        self.counts = [torch.zeros(k, dtype=torch.long) for k in self.level_sizes]

    def update(self, codes_BN: torch.Tensor, levels_N: torch.Tensor) -> None:
        codes_BN, levels_N = codes_BN.cpu().long(), levels_N.cpu().long()
        for level, k in enumerate(self.level_sizes):
            codes = codes_BN[:, levels_N == level].reshape(-1)
            if codes.numel() and (codes.min() < 0 or codes.max() >= k):
                raise ValueError(f"level {level} codes out of range [0, {k}): min {int(codes.min())}, "
                                 f"max {int(codes.max())}")
            self.counts[level] += torch.bincount(codes, minlength=k)

    def usage(self) -> list[float]:
        return [usage_from_counts(c) for c in self.counts]

    def perplexity(self) -> list[float]:
        return [perplexity_from_counts(c) for c in self.counts]


class FeatureMoments:
    """Running sums of feature vectors and their outer products (float64), enough for a Gaussian fit.

    Sums are taken around a shift (the first vector seen) so the covariance does not come from subtracting two
    large, nearly equal numbers (Inception features have means far from 0).
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift_D: torch.Tensor | None = None
        self.sum_D: torch.Tensor | None = None
        self.outer_DD: torch.Tensor | None = None

    def update(self, features_BD: torch.Tensor) -> None:
        f = features_BD.detach().double().cpu().reshape(features_BD.shape[0], -1)
        if self.shift_D is None:
            d = f.shape[1]
            self.shift_D = f[0].clone()
            self.sum_D, self.outer_DD = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        f = f - self.shift_D
        self.n += f.shape[0]
        self.sum_D += f.sum(0)
        self.outer_DD += f.T @ f

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance (``np.cov`` convention, as pytorch-fid uses)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mean_shifted = self.sum_D / self.n
        cov = (self.outer_DD - self.n * torch.outer(mean_shifted, mean_shifted)) / (self.n - 1)
        return mean_shifted + self.shift_D, cov


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))``, in float64.

    ``tr((C1 C2)^(1/2))`` is the sum of the square roots of the eigenvalues of ``C1 C2`` (real and >= 0 in exact
    arithmetic, as ``C1 C2`` is similar to the PSD ``C1^(1/2) C2 C1^(1/2)``): no matrix square root is formed, and
    tiny negative eigenvalues of rank-deficient covariances (fewer images than feature dimensions) give tiny
    imaginary roots that the real part drops, instead of the sqrt(eps) errors a clamped ``sqrtm`` would add.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    tr_covmean = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean)
