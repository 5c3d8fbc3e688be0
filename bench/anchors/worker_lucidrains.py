"""lucidrains' dalle2-pytorch 1.15.6 at the anchor config, in .bench-venvs/lucidrains:
`.bench-venvs/lucidrains/bin/python bench/anchors/worker_lucidrains.py {decoder|prior} STEPS`.

Decoder: Unet(dim 64, mults (1, 2, 2), one res block, self-attention 4 × 32 at 16², cross-attention
width 128 on the 64-d image embedding and 77 text encodings) in Decoder(32², 1000 steps, learned
variance, 50-step DDIM, η = 0), images passed in [-1, 1]. Prior: DiffusionPriorNetwork(width 64,
the embedding dim it requires; 4 heads × 32 and feed-forward ×8 so attention and MLP are as wide as
a width-128 transformer's), depth 4, predicting x_start, 64-step DDIM, one sample per caption.
"""

from __future__ import annotations

import torch

# The torchvision wheels reachable here are CUDA builds; with CPU torch its import fails with
# "operator torchvision::nms does not exist" unless the two op schemas exist first.
_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

from dalle2_pytorch import Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet  # noqa: E402

from _common import CLIP_DIM, DECODER, PRIOR, TEXT_WIDTH, TIMESTEPS, TOKENS, benchmark, setup  # noqa: E402


def decoder(steps: int) -> None:
    unet = Unet(dim=64, dim_mults=(1, 2, 2), num_resnet_blocks=1, image_embed_dim=CLIP_DIM,
                text_embed_dim=TEXT_WIDTH, cond_dim=128, attn_heads=4, attn_dim_head=32,
                self_attn=(False, True, False), cond_on_text_encodings=True, max_text_len=TOKENS, channels=3)
    model = Decoder(unet=unet, image_size=32, timesteps=TIMESTEPS, sample_timesteps=DECODER["sample_steps"],
                    learned_variance=True, auto_normalize_img=False, ddim_sampling_eta=0.0)

    def sampler(small):
        def sample(n):
            def run():
                model.sample_timesteps = (n,)  # one entry per unet
                return model.sample(image_embed=small["z_i"], text_encodings=small["text_states"])
            return run
        return sample

    benchmark("lucidrains", "decoder", model,
              lambda b: model(b["image"], image_embed=b["z_i"], text_encodings=b["text_states"]), sampler, steps=steps)

def prior(steps: int) -> None:
    net = DiffusionPriorNetwork(dim=CLIP_DIM, depth=PRIOR["depth"], dim_head=PRIOR["head_dim"], heads=PRIOR["heads"],
                                ff_mult=8, num_timesteps=TIMESTEPS, max_text_len=TOKENS)
    model = DiffusionPrior(net=net, image_embed_dim=CLIP_DIM, timesteps=TIMESTEPS, cond_drop_prob=0.1,
                           condition_on_text_encodings=True)

    def sampler(small):
        cond = {"text_embed": small["z_t"], "text_encodings": small["text_states"]}
        return lambda n: lambda: model.p_sample_loop((PRIOR["sample_batch"], CLIP_DIM), text_cond=cond, timesteps=n)

    benchmark("lucidrains", "prior", model,  # the prior scales image_embed in place: pass a copy
              lambda b: model(text_embed=b["z_t"], image_embed=b["z_i"].clone(), text_encodings=b["text_states"]),
              sampler, steps=steps)

if __name__ == "__main__":
    stage, steps = setup()
    {"decoder": decoder, "prior": prior}[stage](steps)
