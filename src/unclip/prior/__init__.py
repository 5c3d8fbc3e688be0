"""The priors (paper §2.2): caption → CLIP image embedding z_i. Diffusion and autoregressive."""
