"""diffusers 0.42.1 at the anchor config, in .bench-venvs/diffusers:
`.bench-venvs/diffusers/bin/python bench/anchors/worker_diffusers.py {decoder|prior} STEPS`.

Decoder: UNet2DConditionModel (the same arguments unclip's `unet_config` gives at this config,
6 output channels as in unCLIP's learned-variance decoder) + UnCLIPTextProjModel, MSE on eps,
DDIMScheduler for 50 steps. Prior: PriorTransformer (4 heads × 32, 4 layers, 64-d embeddings,
77 caption tokens) predicting the clean embedding, MSE, DDIMScheduler for 64 steps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer, UNet2DConditionModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

from _common import CLIP_DIM, DECODER, PRIOR, TIMESTEPS, TOKENS, benchmark, setup

UNET = {"sample_size": 32, "in_channels": 3, "out_channels": 6,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": (64, 128, 128), "layers_per_block": 1,
        "attention_head_dim": (2, 4, 4),  # diffusers' name for the number of heads: 32-d heads
        "cross_attention_dim": 128, "class_embed_type": "identity", "norm_num_groups": 32}


def decoder(steps: int) -> None:
    unet = UNet2DConditionModel(**UNET)
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=CLIP_DIM, time_embed_dim=256,
                               cross_attention_dim=128)
    modules = torch.nn.ModuleList([unet, proj])
    scheduler = DDIMScheduler(num_train_timesteps=TIMESTEPS, beta_schedule="squaredcos_cap_v2")

    def cond(b):
        hidden, addend = proj(image_embeddings=b["z_i"], prompt_embeds=b["z_i"],
                              text_encoder_hidden_states=b["text_states"], do_classifier_free_guidance=False)
        mask = torch.nn.functional.pad(b["text_mask"], (4, 0), value=1)  # the 4 z_i tokens come first
        return {"encoder_hidden_states": hidden, "class_labels": addend, "encoder_attention_mask": mask}

    def loss(b):
        t = torch.randint(0, TIMESTEPS, (len(b["image"]),))
        noise = torch.randn_like(b["image"])
        x_t = scheduler.add_noise(b["image"], noise, t)
        return (unet(x_t, t, **cond(b)).sample[:, :3] - noise).pow(2).mean()

    def sampler(small):
        def sample(n):
            def run():
                c = cond(small)
                x = torch.randn(DECODER["sample_batch"], 3, 32, 32, generator=torch.Generator().manual_seed(0))
                scheduler.set_timesteps(n)
                for t in scheduler.timesteps:
                    x = scheduler.step(unet(x, t, **c).sample[:, :3], t, x).prev_sample
                return x
            return run
        return sample

    benchmark("diffusers", "decoder", modules, loss, sampler, steps=steps)

def prior(steps: int) -> None:
    model = PriorTransformer(num_attention_heads=PRIOR["heads"], attention_head_dim=PRIOR["head_dim"],
                             num_layers=PRIOR["depth"], embedding_dim=CLIP_DIM, num_embeddings=TOKENS,
                             additional_embeddings=4, dropout=0.0, encoder_hid_proj_type="linear",
                             added_emb_type="prd")
    noise_sched = DDPMScheduler(num_train_timesteps=TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                                prediction_type="sample", clip_sample=False)
    sampler = DDIMScheduler(num_train_timesteps=TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                            prediction_type="sample", clip_sample=False)

    def predict(x_t, t, b):
        return model(x_t, t, proj_embedding=b["z_t"], encoder_hidden_states=b["text_states"],
                     attention_mask=b["text_mask"]).predicted_image_embedding

    def loss(b):
        t = torch.randint(0, TIMESTEPS, (len(b["z_i"]),))
        x_t = noise_sched.add_noise(b["z_i"], torch.randn_like(b["z_i"]), t)
        return (predict(x_t, t, b) - b["z_i"]).pow(2).mean()

    def make_sampler(small):
        def sample(n):
            def run():
                x = torch.randn(PRIOR["sample_batch"], CLIP_DIM, generator=torch.Generator().manual_seed(0))
                sampler.set_timesteps(n)
                for t in sampler.timesteps:
                    x = sampler.step(predict(x, t, small), t, x).prev_sample
                return model.post_process_latents(x)
            return run
        return sample

    benchmark("diffusers", "prior", model, loss, make_sampler, steps=steps)

if __name__ == "__main__":
    stage, steps = setup()
    {"decoder": decoder, "prior": prior}[stage](steps)
