"""A UNet2DConditionModel that reads diffusers' UnCLIPPipeline caption mask as a cross-attention mask.

`unclip export-diffusers` copies this file into the exported `decoder/` folder (as
`unclip_unet.py`) and names it in `model_index.json`, so that diffusers loads it as a custom
component: `UnCLIPPipeline.from_pretrained(path, trust_remote_code=True)`. It imports only
diffusers.

Why: UnCLIPPipeline passes the decoder's caption mask [B, K + L] as `attention_mask`. Karlo's
SimpleCrossAttn blocks read that argument as the cross-attention mask, but the CrossAttn blocks
of unclip's decoder (Transformer2DModel) apply `attention_mask` to self-attention over pixels,
where a [B, K + L] mask fails. This subclass hands the mask on as `encoder_attention_mask`, which
every block type reads as the cross-attention mask; nothing else changes.
"""

from diffusers import UNet2DConditionModel


class UnclipUNet2DConditionModel(UNet2DConditionModel):
    """UNet2DConditionModel whose `attention_mask` (when no encoder mask is given) masks the caption."""

    def forward(self, sample, timestep, encoder_hidden_states, *args, attention_mask=None,
                encoder_attention_mask=None, **kwargs):
        if attention_mask is not None and encoder_attention_mask is None:
            attention_mask, encoder_attention_mask = None, attention_mask  # [B, K + L]: 1 = attend
        return super().forward(sample, timestep, encoder_hidden_states, *args, attention_mask=attention_mask,
                               encoder_attention_mask=encoder_attention_mask, **kwargs)
