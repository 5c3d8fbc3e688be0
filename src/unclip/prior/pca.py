"""PCA and uniform quantization of CLIP image embeddings for the autoregressive prior.

Paper §2.2: the AR prior reduces z_i with PCA, keeping the components that explain (here) at
least 99% of the variance, and quantizes each component into 1,024 buckets (here
`ar_prior.buckets`, 128 by default: docs/priors.md says why), so that z_i becomes
a short sequence of discrete codes. Buckets are uniform between the 0.1% and 99.9% quantiles of
each component on the fitting data; values outside are clamped to the end buckets. Decoding maps
a code to its bucket centre, so the round-trip error of a component inside its range is at most
half a bucket width.
"""

from __future__ import annotations

import torch
from torch import nn


class PCAQuantizer(nn.Module):
    """z [B, D] ↔ codes [B, K] (K kept components, values in [0, buckets))."""

    def __init__(self, *, dim: int, components: int, buckets: int):
        super().__init__()
        self.buckets = buckets
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(components, dim))  # rows: principal directions
        self.register_buffer("low", torch.zeros(components))
        self.register_buffer("high", torch.ones(components))
        self.register_buffer("explained", torch.zeros(components))  # cumulative variance ratio

    @property
    def components(self) -> int:
        return self.basis.shape[0]

    @classmethod
    def fit(cls, z: torch.Tensor, *, variance: float, buckets: int) -> PCAQuantizer:
        """Fit on embeddings z [N, D]: keep the fewest components reaching `variance`."""
        z = z.double()
        mean = z.mean(dim=0)
        _, s, vh = torch.linalg.svd(z - mean, full_matrices=False)
        ratio = (s**2).cumsum(0) / (s**2).sum()
        k = int((ratio < variance).sum()) + 1
        k = min(k, len(s))
        quantizer = cls(dim=z.shape[1], components=k, buckets=buckets)
        proj = (z - mean) @ vh[:k].t()
        quantizer.mean.copy_(mean.float())
        quantizer.basis.copy_(vh[:k].float())
        quantizer.low.copy_(torch.quantile(proj, 0.001, dim=0).float())
        quantizer.high.copy_(torch.quantile(proj, 0.999, dim=0).float())
        quantizer.explained.copy_(ratio[:k].float())
        return quantizer

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """PCA coefficients [B, K] of z [B, D]."""
        return (z.float() - self.mean) @ self.basis.t()

    def unproject(self, coeffs: torch.Tensor) -> torch.Tensor:
        """z [B, D] from coefficients [B, K] (the discarded components are zero)."""
        return coeffs @ self.basis + self.mean

    def width(self) -> torch.Tensor:
        """Bucket width per component [K]."""
        return (self.high - self.low) / self.buckets

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [B, K] (long) of z [B, D]."""
        scaled = (self.project(z) - self.low) / self.width()
        return scaled.floor().clamp(0, self.buckets - 1).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """z [B, D] from codes [B, K]: bucket centres, unprojected."""
        return self.unproject(self.low + (codes.float() + 0.5) * self.width())
