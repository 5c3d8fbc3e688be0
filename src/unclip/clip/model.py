"""CLIP: a text tower and an image tower trained to agree in one embedding space.

Towers are `transformers` CLIPTextModelWithProjection (causal mask, pooled at the end token) and
CLIPVisionModelWithProjection (ViT), randomly initialised from `ClipConfig`. The loss is the
symmetric contrastive loss of Radford et al. 2021 with a learnable temperature; in shapes world
many captions repeat inside a batch ("a red circle"), so pairs whose captions are identical
count as positives of each other instead of as negatives (`groups`).

Under several processes (DDP) each rank encodes its slice of the global batch; `training_losses`
gathers every rank's embeddings, with their gradients, and caption ids, so each rank computes the
loss of the whole global batch, exactly what one process with that batch computes (open_clip's
`gather_with_grad`; see docs/training.md for why the gradients come out exact).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import ClipConfig
from unclip.errors import ModelFormatError
from unclip.tokenizer import TokenBatch, Tokenizer
from unclip.train.dist import rank_world

MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                     *, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs.

    image_embeds, text_embeds: [B, D] L2-normalised; logit_scale: log(1/temperature), [] or [1].
    groups: optional [B] integer ids; pairs with equal ids are all positives of each other
    (the target is uniform over them). Without groups the target is the diagonal.
    """
    logits = logit_scale.exp() * image_embeds @ text_embeds.t()  # [B, B] image i vs text j
    if groups is None:
        targets = torch.eye(len(logits), device=logits.device, dtype=logits.dtype)
    else:
        same = (groups[:, None] == groups[None, :]).to(logits.dtype)
        targets = same / same.sum(dim=1, keepdim=True)
    loss_i2t = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def caption_ids(captions: list[str], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B] int64 ids equal exactly for equal captions, the same on every process (a 64-bit hash)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little",
                                        signed=True) for c in captions], dtype=torch.int64, device=device)


class _GatherWithGrad(torch.autograd.Function):
    """[b, ...] on each of R ranks → [R·b, ...] in rank order on every rank. Backward sums the gradient
    that every rank's loss sends to a slice and hands it to the slice's owner, so a loss that reads
    the gathered tensor trains the towers of every rank."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = rank_world()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.local = rank, tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local]


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 (ranks hold equal shares), differentiable;
    the tensor itself in a single process."""
    return _GatherWithGrad.apply(tensor) if rank_world()[1] > 1 else tensor


@dataclass(frozen=True)
class TextEncoding:
    """embeds: [B, D] normalised z_t; token_states: [B, L, W] last hidden states; mask: [B, L];
    rank_embeds: [B, D] the normalised z_t of a model's ranking text tower, if it has one
    (`ranking`)."""

    embeds: torch.Tensor
    token_states: torch.Tensor
    mask: torch.Tensor
    rank_embeds: torch.Tensor | None = None

    @property
    def ranking(self) -> torch.Tensor:
        """The z_t that candidates are ranked against (paper §2.2: the higher dot product wins): the
        ranking tower's where the model has one, else the caption's own."""
        return self.embeds if self.rank_embeds is None else self.rank_embeds


def _logit_scale_as_vector(state_dict, prefix, *args) -> None:
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class ClipModel(nn.Module):
    """The CLIP stage: `training_losses(batch)` for the trainer, `encode_*` for everything else."""

    def __init__(self, *, config: ClipConfig, tokenizer: Tokenizer):
        super().__init__()
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        self.tokenizer = tokenizer
        self.text = CLIPTextModelWithProjection(text_config(config, tokenizer))
        self.vision = CLIPVisionModelWithProjection(vision_config(config))
        # shape [1], not a 0-d scalar: FSDP2 shards no 0-d parameter; 0-d ones in older checkpoints load
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / config.init_temperature)]))
        self._register_load_state_dict_pre_hook(_logit_scale_as_vector)
        self.use_config(config)

    def use_config(self, config: ClipConfig) -> None:
        """Train as `config` says (a fine-tune's settings on a loaded CLIP of the same network): with
        train_towers="text" the image tower is frozen."""
        self.config = config
        self.vision.requires_grad_(config.train_towers == "both")

    @classmethod
    def from_config(cls, config: ClipConfig, *, tokenizer: Tokenizer) -> ClipModel:
        return cls(config=config, tokenizer=tokenizer)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, captions: str | list[str]) -> TokenBatch:
        return self.tokenizer.encode(captions)

    def encode_text(self, tokens: TokenBatch) -> TextEncoding:
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        out = self.text(input_ids=ids, attention_mask=mask)
        return TextEncoding(embeds=F.normalize(out.text_embeds.float(), dim=-1),
                            token_states=out.last_hidden_state, mask=mask)

    def load_text_tower(self, weights: Path) -> nn.Module:
        """A text tower of this CLIP's network holding the weights at `weights` (a model's ranking
        tower, `rank_text_encoder/`), in eval mode on this CLIP's device."""
        from transformers import CLIPTextModelWithProjection

        from unclip.modeldir import load_into

        tower = CLIPTextModelWithProjection(text_config(self.config, self.tokenizer))
        return load_into(tower, weights).to(self.device).eval()

    def encode_captions(self, captions: str | list[str]) -> torch.Tensor:
        """Normalised z_t [B, D] of captions.

        The batch is cut to its longest caption: under the causal mask no token sees the padding after
        it, and z_t pools at the end token, so the embeddings are those of the full context (tested)
        while a batch of 12-token captions costs 12 positions instead of the context's 32.
        """
        return self.encode_text(self.tokenize(captions).trimmed()).embeds

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised z_i [B, D] of images [B, 3, S, S] in [-1, 1] (S = config.image_size)."""
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = self.vision(pixel_values=pixels.to(self.device))
        return F.normalize(out.image_embeds.float(), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.training_losses(batch)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: image [b, 3, S, S], caption list[str] → loss and retrieval accuracies in the batch.

        Under R processes each passes its slice (b = B / R) and all compute the global batch's loss.
        """
        captions = list(batch["caption"])
        z_t = gather_batch(self.encode_captions(captions))  # [B, D]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_towers == "both"):
            z_i = gather_batch(self.encode_image(batch["image"]))  # [B, D]
        groups = caption_ids(captions, device=z_i.device)
        if rank_world()[1] > 1:
            parts = [torch.empty_like(groups) for _ in range(rank_world()[1])]
            torch.distributed.all_gather(parts, groups)
            groups = torch.cat(parts)  # [B]
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE)
        loss = contrastive_loss(z_i, z_t, scale, groups=groups)
        with torch.no_grad():
            sims = z_i @ z_t.t()
            acc_i2t = (groups[sims.argmax(dim=1)] == groups).float().mean()
            acc_t2i = (groups[sims.argmax(dim=0)] == groups).float().mean()
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "temperature": 1.0 / scale.exp().detach()}

    # --- release format (DESIGN §4): tokenizer/, text_encoder/, image_encoder/ ---------------

    def save_components(self, directory: Path) -> None:
        """Write tokenizer/, text_encoder/, image_encoder/ into `directory` (the caller makes it atomic)."""
        self.tokenizer.save(directory / "tokenizer")
        self.text.save_pretrained(directory / "text_encoder")
        self.vision.save_pretrained(directory / "image_encoder")

    @classmethod
    def load_components(cls, directory: Path, config: ClipConfig, *, logit_scale: float | None = None) -> ClipModel:
        from unclip.modeldir import load_into

        tokenizer = Tokenizer.load(directory / "tokenizer")
        model = cls(config=config, tokenizer=tokenizer)
        for module, name in ((model.text, "text_encoder"), (model.vision, "image_encoder")):
            weights = directory / name / "model.safetensors"
            if not weights.is_file():
                raise ModelFormatError(f"{weights} is missing: the model has no CLIP {name}")
            load_into(module, weights)
        if logit_scale is not None:  # else the initial temperature's (an imported CLIP records none)
            with torch.no_grad():
                model.logit_scale.fill_(logit_scale)
        return model.eval()


def text_config(config: ClipConfig, tokenizer: Tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=config.text_width,
        intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.context_length,
        projection_dim=config.embed_dim,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        hidden_act=config.activation,
        # Plain matmul-softmax attention: at these lengths (65 patches, ≤ 32 tokens, head width 32)
        # torch's fused CPU attention spends most of a bf16 training step in its backward
        # (0.38 s vs 0.22 s per step of the shapes preset, docs/clip.md); not measured on a GPU.
        attn_implementation="eager",
    )


def vision_config(config: ClipConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=config.vision_width,
        intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.embed_dim,
        num_channels=3,
        hidden_act=config.activation,
        attn_implementation="eager",  # see text_config
    )
