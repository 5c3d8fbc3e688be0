"""The decoder's conditioning: z_i and the caption's token states → UNet inputs (paper §2.1).

"We modify the architecture described in Nichol et al. (2021) by projecting and adding CLIP
embeddings to the existing timestep embedding, and by projecting CLIP embeddings into four
extra tokens of context that are concatenated to the sequence of outputs from the GLIDE text
encoder." Here the text encoder is the frozen CLIP text tower: its last hidden states are
projected to the UNet's cross-attention width and layer-normed, as in diffusers'
UnCLIPTextProjModel, whose parameter names this module keeps where the meaning is the same.

Classifier-free guidance (paper §2.1) replaces only the conditioning by learned null
embeddings: a dropped z_i becomes `learned_classifier_free_guidance_embeddings` before both
projections; a dropped caption becomes one learned null token with the caption's other
positions masked out. The noised image never passes through here.
"""

from __future__ import annotations

import torch
from torch import nn


class TextProj(nn.Module):
    """z_i [B, D] and text states [B, L, W] → time-embedding addend and cross-attention context.

    clip_dim D: CLIP embedding width; text_width W: CLIP text tower width; time_embed_dim: the
    UNet's timestep-embedding width; cross_attention_dim C; clip_tokens K extra context tokens.
    """

    def __init__(self, *, clip_dim: int, text_width: int, time_embed_dim: int, cross_attention_dim: int,
                 clip_tokens: int):
        super().__init__()
        self.config = {"clip_dim": clip_dim, "text_width": text_width, "time_embed_dim": time_embed_dim,
                       "cross_attention_dim": cross_attention_dim, "clip_tokens": clip_tokens}
        self.clip_tokens = clip_tokens
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_dim))
        self.learned_null_text_token = nn.Parameter(torch.zeros(cross_attention_dim))
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_dim, time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(clip_dim, clip_tokens * cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(text_width, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, z_i: torch.Tensor, text_states: torch.Tensor | None, text_mask: torch.Tensor | None, *,
                keep_z: torch.Tensor, keep_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet keyword arguments for a batch.

        z_i [B, D]; text_states [B, L, W] and text_mask [B, L] (1 = token), or None for no caption
        (every row then takes the null caption); keep_z, keep_text [B] bool: False replaces that
        row's z_i / caption by its learned null. Returns class_labels [B, time_embed_dim],
        encoder_hidden_states [B, K + L, C] and encoder_attention_mask [B, K + L].
        """
        batch = z_i.shape[0]
        null_z = self.learned_classifier_free_guidance_embeddings.to(z_i.dtype).expand(batch, -1)
        z = torch.where(keep_z[:, None], z_i, null_z)  # [B, D]
        time_addend = self.clip_image_embeddings_project_to_time_embeddings(z)  # [B, T_emb]
        tokens = self.clip_extra_context_tokens_proj(z)  # [B, K·C]
        tokens = tokens.reshape(batch, -1, self.clip_tokens).permute(0, 2, 1)  # [B, C, K] → [B, K, C] (diffusers layout)

        if text_states is None:
            width = self.encoder_hidden_states_proj.in_features
            text_states = z_i.new_zeros(batch, 1, width)
            text_mask = torch.ones(batch, 1, dtype=torch.long, device=z_i.device)
            keep_text = torch.zeros_like(keep_text)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_states))  # [B, L, C]
        null = torch.zeros_like(text)
        null[:, 0] = self.learned_null_text_token.to(text.dtype)  # one null token, the rest masked
        text = torch.where(keep_text[:, None, None], text, null)
        null_mask = torch.zeros_like(text_mask)
        null_mask[:, 0] = 1
        mask = torch.where(keep_text[:, None], text_mask, null_mask)  # [B, L]

        context = torch.cat([tokens, text], dim=1)  # [B, K + L, C]
        context_mask = torch.cat([torch.ones(batch, self.clip_tokens, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return {"class_labels": time_addend, "encoder_hidden_states": context, "encoder_attention_mask": context_mask}
