"""The autoregressive prior (paper §2.2): z_i as a sequence of quantized PCA codes.

Sequence, one token per row:

    [caption token states (L) | z_t | dot-product bucket | code_0 ... code_{K-2}]
                                      └ predicts code_0    └ predict code_1 ... code_{K-1}

A causal transformer reads it left to right; the output at the dot-product token predicts the
first code, the output at code j predicts code j+1. The dot product z_i·z_t is quantized into
equal-mass buckets fitted on training data; at sampling time it is drawn from the top half of its
distribution (paper §2.2), which steers samples toward embeddings that match the caption well.
Classifier-free guidance: with probability `cond_drop` the caption states, z_t and the dot token
are replaced by learned null tokens; sampling mixes conditional and unconditional logits, both
computed in one batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import ARPriorConfig, check_guidance_scale, is_real
from unclip.errors import ConfigError
from unclip.prior.pca import PCAQuantizer

DOT_BUCKETS = 32


def top_half_dot_buckets(n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dot-product tokens for sampling [n] (paper §2.2: from the top half of the distribution).

    The buckets are equal-mass quantiles of the training dot products, so the top half of the
    distribution is a uniform draw from the upper half of the buckets.
    """
    return torch.randint(DOT_BUCKETS // 2, DOT_BUCKETS, (n,), generator=generator)


class ARPrior(nn.Module):
    """Batch in: text_states [B, L, W], text_mask [B, L], z_t [B, D], z_i [B, D]."""

    def __init__(self, *, config: ARPriorConfig, text_width: int, context_length: int, quantizer: PCAQuantizer,
                 dot_edges: torch.Tensor):
        super().__init__()
        width, dim = config.width, quantizer.mean.shape[0]
        self.config = config
        self.quantizer = quantizer
        self.register_buffer("dot_edges", dot_edges.float().clone())  # [DOT_BUCKETS - 1] ascending
        self.text_in = nn.Linear(text_width, width)
        self.z_t_in = nn.Linear(dim, width)
        self.dot_embed = nn.Embedding(DOT_BUCKETS + 1, width)  # last row: the null dot token
        self.code_embed = nn.Embedding(quantizer.buckets, width)
        self.null_text = nn.Parameter(torch.zeros(context_length, width))
        self.null_z_t = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.randn(context_length + 2 + quantizer.components, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, config.heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, quantizer.buckets)

    @classmethod
    def from_data(cls, config: ARPriorConfig, *, z_i: torch.Tensor, z_t: torch.Tensor, text_width: int,
                  context_length: int) -> ARPrior:
        """Fit the PCA quantizer and the dot-product buckets on embeddings [N, D], then build."""
        quantizer = PCAQuantizer.fit(z_i, variance=config.pca_variance, buckets=config.buckets)
        dots = (z_i * z_t).sum(dim=1)
        edges = torch.quantile(dots.float(), torch.linspace(0, 1, DOT_BUCKETS + 1)[1:-1])
        return cls(config=config, text_width=text_width, context_length=context_length, quantizer=quantizer,
                   dot_edges=edges)

    def dot_bucket(self, z_i: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        return torch.bucketize((z_i * z_t).sum(dim=1).contiguous(), self.dot_edges)

    def _logits(self, text_states, text_mask, z_t, dot, codes, keep) -> torch.Tensor:
        """Logits [B, n+1, buckets] for codes 0..n given codes [B, n] (n may be 0).

        keep: bool [B], False where the conditioning is replaced by the null tokens.
        """
        batch, length = text_mask.shape
        text = torch.where(keep[:, None, None], self.text_in(text_states), self.null_text[:length])
        mask = torch.where(keep[:, None], text_mask.bool(), torch.ones_like(text_mask, dtype=torch.bool))
        cond = torch.where(keep[:, None], self.z_t_in(z_t), self.null_z_t)
        dot = torch.where(keep, dot, torch.full_like(dot, DOT_BUCKETS))
        seq = torch.cat([text, cond[:, None], self.dot_embed(dot)[:, None], self.code_embed(codes)], dim=1)
        n = seq.shape[1]  # L + 2 + codes
        seq = seq + self.pos[:n]
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).triu(1)
        pad = torch.cat([~mask, torch.zeros(batch, n - length, dtype=torch.bool, device=seq.device)], dim=1)
        out = self.blocks(seq, mask=causal, src_key_padding_mask=pad)
        return self.head(self.norm(out[:, length + 1:]))  # from the dot token on

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_losses(batch)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        z_i, z_t = batch["z_i"], batch["z_t"]
        codes = self.quantizer.encode(z_i)  # [B, K]
        keep = torch.rand(len(z_i), device=z_i.device) >= self.config.cond_drop
        logits = self._logits(batch["text_states"], batch["text_mask"], z_t, self.dot_bucket(z_i, z_t),
                              codes[:, :-1], keep)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))
        return {"loss": loss, "keep_rate": keep.float().mean()}

    @torch.no_grad()
    def sample(self, text_states: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor, *,
               guidance_scale: float = 1.0, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Normalised z_i [B, D] for captions given as CLIP text states [B, L, W], mask, z_t [B, D]."""
        if not (is_real(temperature) and 0 < temperature < math.inf):
            raise ConfigError(f"temperature={temperature!r}: give a number above 0 (1 samples the model's own "
                              "distribution; lower is greedier)")
        batch = len(z_t)
        device = z_t.device
        dot = top_half_dot_buckets(batch, generator=generator).to(device)
        guidance_scale = check_guidance_scale(guidance_scale)  # a float: Fraction or numpy scales mix too
        guided = guidance_scale != 1.0
        if guided:
            text_states, text_mask = torch.cat([text_states] * 2), torch.cat([text_mask] * 2)
            z_t, dot = torch.cat([z_t] * 2), torch.cat([dot] * 2)
        keep = torch.ones(len(z_t), dtype=torch.bool, device=device)
        if guided:
            keep[batch:] = False
        codes = torch.zeros(len(z_t), 0, dtype=torch.long, device=device)
        for _ in range(self.quantizer.components):
            logits = self._logits(text_states, text_mask, z_t, dot, codes, keep)[:, -1].float()
            if guided:
                cond, uncond = logits[:batch], logits[batch:]
                logits = uncond + guidance_scale * (cond - uncond)
            probs = (logits / temperature).softmax(dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)  # [B, 1]
            codes = torch.cat([codes, torch.cat([nxt] * 2) if guided else nxt], dim=1)
        return F.normalize(self.quantizer.decode(codes[:batch]), dim=-1)
