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

Two modes reproduce diffusers' UnCLIPTextProjModel (Karlo) exactly, for imported models:

- `time_text="pooled"`: the pooled caption embedding z_t is projected (`embedding_proj`) and
  added to the timestep embedding too;
- `text_null="empty_prompt"`: a dropped caption becomes the CLIP encoding of the empty prompt
  (states, mask and z_t; set with `set_empty_prompt`) instead of a learned token.
"""

from __future__ import annotations

import torch
from torch import nn

TIME_TEXT = ("none", "pooled")
TEXT_NULL = ("learned", "empty_prompt")


class TextProj(nn.Module):
    """z_i [B, D] and text states [B, L, W] → time-embedding addend and cross-attention context.

    clip_dim D: CLIP embedding width; text_width W: CLIP text tower width; time_embed_dim: the
    UNet's timestep-embedding width; cross_attention_dim C; clip_tokens K extra context tokens;
    time_text, text_null: the modes above (defaults: unclip's own conditioning).
    """

    def __init__(self, *, clip_dim: int, text_width: int, time_embed_dim: int, cross_attention_dim: int,
                 clip_tokens: int, time_text: str = "none", text_null: str = "learned"):
        super().__init__()
        if time_text not in TIME_TEXT or text_null not in TEXT_NULL:
            raise ValueError(f"time_text must be one of {TIME_TEXT} and text_null one of {TEXT_NULL}; "
                             f"got {time_text!r}, {text_null!r}")
        self.config = {"clip_dim": clip_dim, "text_width": text_width, "time_embed_dim": time_embed_dim,
                       "cross_attention_dim": cross_attention_dim, "clip_tokens": clip_tokens}
        if (time_text, text_null) != ("none", "learned"):  # the default config.json stays as it was
            self.config.update(time_text=time_text, text_null=text_null)
        self.clip_tokens, self.time_text, self.text_null = clip_tokens, time_text, text_null
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_dim))
        if text_null == "learned":
            self.learned_null_text_token = nn.Parameter(torch.zeros(cross_attention_dim))
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_dim, time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(clip_dim, clip_tokens * cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(text_width, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)
        if time_text == "pooled":  # created last, so the default mode's initialisation is unchanged
            self.embedding_proj = nn.Linear(clip_dim, time_embed_dim)
        if text_null == "empty_prompt":  # derived from the CLIP at load time, never saved
            self.register_buffer("empty_states", torch.zeros(1, 0, text_width), persistent=False)
            self.register_buffer("empty_mask", torch.zeros(1, 0, dtype=torch.long), persistent=False)
            self.register_buffer("empty_embeds", torch.zeros(1, clip_dim), persistent=False)

    def set_empty_prompt(self, states: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor) -> None:
        """The null caption of `text_null="empty_prompt"`: the CLIP encoding of "" — states
        [1, L, W], mask [1, L] and pooled embedding [1, D]."""
        if self.text_null != "empty_prompt":
            raise ValueError("set_empty_prompt needs text_null='empty_prompt'")
        device = self.learned_classifier_free_guidance_embeddings.device
        self.empty_states = states.detach().float().to(device)
        self.empty_mask = mask.detach().to(device)
        self.empty_embeds = embeds.detach().float().to(device)

    def _null_caption(self, like: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Null caption states [B, L, C] and mask [B, L], shaped like the projected caption `like`."""
        if self.text_null == "learned":
            null = torch.zeros_like(like)
            null[:, 0] = self.learned_null_text_token.to(like.dtype)  # one null token, the rest masked
            null_mask = torch.zeros_like(text_mask)
            null_mask[:, 0] = 1
            return null, null_mask
        empty = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(self.empty_states))
        return empty.to(like.dtype).expand_as(like), self.empty_mask.to(text_mask.dtype).expand_as(text_mask)

    def forward(self, z_i: torch.Tensor, text_states: torch.Tensor | None, text_mask: torch.Tensor | None, *,
                keep_z: torch.Tensor, keep_text: torch.Tensor,
                text_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """UNet keyword arguments for a batch.

        z_i [B, D]; text_states [B, L, W] and text_mask [B, L] (1 = token), or None for no caption
        (every row then takes the null caption); keep_z, keep_text [B] bool: False replaces that
        row's z_i / caption by its null; text_embeds [B, D]: the captions' pooled z_t (used with
        time_text="pooled" only). Returns class_labels [B, time_embed_dim], encoder_hidden_states
        [B, K + L, C] and encoder_attention_mask [B, K + L].
        """
        batch = z_i.shape[0]
        null_z = self.learned_classifier_free_guidance_embeddings.to(z_i.dtype).expand(batch, -1)
        z = torch.where(keep_z[:, None], z_i, null_z)  # [B, D]
        time_addend = self.clip_image_embeddings_project_to_time_embeddings(z)  # [B, T_emb]
        tokens = self.clip_extra_context_tokens_proj(z)  # [B, K·C]
        tokens = tokens.reshape(batch, -1, self.clip_tokens).permute(0, 2, 1)  # [B, C, K] → [B, K, C] (diffusers layout)

        if text_states is None:
            if self.text_null == "learned":
                text_states = z_i.new_zeros(batch, 1, self.encoder_hidden_states_proj.in_features)
                text_mask = torch.ones(batch, 1, dtype=torch.long, device=z_i.device)
            else:
                text_states = self.empty_states.to(z_i.dtype).expand(batch, -1, -1)
                text_mask = self.empty_mask.expand(batch, -1)
            keep_text = torch.zeros_like(keep_text)
        if self.text_null == "empty_prompt" and self.empty_mask.shape[1] != text_mask.shape[1]:
            raise ValueError(f"captions have {text_mask.shape[1]} tokens but the empty prompt has "
                             f"{self.empty_mask.shape[1]}: call set_empty_prompt with the same tokenizer")
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_states))  # [B, L, C]
        null, null_mask = self._null_caption(text, text_mask)
        text = torch.where(keep_text[:, None, None], text, null)
        mask = torch.where(keep_text[:, None], text_mask, null_mask)  # [B, L]

        if self.time_text == "pooled":
            if text_embeds is None and bool(keep_text.any()):
                raise ValueError("time_text='pooled' needs the captions' pooled embeddings: pass text_embeds [B, D]")
            null_pooled = (self.empty_embeds if self.text_null == "empty_prompt" else z_i.new_zeros(1, z_i.shape[1]))
            null_pooled = null_pooled.to(z_i.dtype).expand(batch, -1)  # [B, D]
            pooled = null_pooled if text_embeds is None else torch.where(keep_text[:, None], text_embeds.to(z_i.dtype),
                                                                         null_pooled)
            time_addend = time_addend + self.embedding_proj(pooled)  # [B, T_emb]

        context = torch.cat([tokens, text], dim=1)  # [B, K + L, C]
        context_mask = torch.cat([torch.ones(batch, self.clip_tokens, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return {"class_labels": time_addend, "encoder_hidden_states": context, "encoder_attention_mask": context_mask}
