"""Operations on the bipartite latent (z_i, x_T) that the manipulations edit (paper §3, §4).

One implementation each: `slerp` (interpolations §3.2 and text diffs §3.3), `text_direction`
(§3.3) and `pca_truncate` (the PCA probe, §4). Shapes are [B, ...] or [...]; nothing here
touches a network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1), row by row.

    a, b: [..., D] (vectors; images [B, C, H, W] are treated as flattened rows by `slerp_rows`).
    The angle θ between a and b is split as sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b, so unit
    vectors stay unit vectors and the path turns at a constant rate. Nearly parallel rows
    (sin θ < 1e-7) fall back to linear interpolation; opposite rows have no one great circle
    between them, and are a DataError (a linear path runs through zero). t may be a float or a tensor
    broadcastable to a's leading shape [...], e.g. [K, 1] against a [1, D] to get [K, D].
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.ndim and t.shape[-1] != 1:
        t = t[..., None]
    a64, b64 = a.double(), b.double()
    cos = (F.normalize(a64, dim=-1) * F.normalize(b64, dim=-1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    t64 = t.double()
    linear = sin.abs() < EPS
    if (linear & (cos < 0)).any():
        from unclip.errors import DataError

        raise DataError("slerp between opposite vectors (cosine −1): every great circle joins them, so the path is "
                        "undefined; interpolate between other images or embeddings")
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, 1 - t64, torch.sin((1 - t64) * theta) / safe)
    wb = torch.where(linear, t64, torch.sin(t64 * theta) / safe)
    return (wa * a64 + wb * b64).to(a.dtype)


def slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """`slerp` of tensors [B, ...] (e.g. x_T [B, 3, R, R]) with each row flattened into one vector."""
    return slerp(a.flatten(1), b.flatten(1), t).view_as(a)


def text_direction(z_t: torch.Tensor, z_t0: torch.Tensor) -> torch.Tensor:
    """The text diff z_d = norm(z_t − z_t0) [B, D] (paper §3.3): from the caption describing the
    image (z_t0) toward the new caption (z_t)."""
    diff = z_t - z_t0
    if (diff.norm(dim=-1) < 1e-6).any():
        from unclip.errors import DataError

        raise DataError("the two captions have the same CLIP embedding, so there is no direction between them; "
                        "change one of them")
    return F.normalize(diff, dim=-1)


def pca_truncate(z: torch.Tensor, *, mean: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """z [B, D] reconstructed from its first k principal components, renormalised to unit length.

    mean: [D]; basis: [K, D] orthonormal rows, the principal directions by decreasing variance.
    k = 0 keeps only the mean direction (paper §4 decodes such truncations to show what each
    leading dimension carries).
    """
    if not 0 <= k <= basis.shape[0]:
        from unclip.errors import ConfigError

        raise ConfigError(f"k={k} PCA dimensions asked for; this basis has {basis.shape[0]} (use 0 … {basis.shape[0]})")
    centred = z - mean
    coeffs = centred @ basis[:k].T  # [B, k]
    return F.normalize(mean + coeffs @ basis[:k], dim=-1)
