"""The decoder (paper §2.1) and the ×4 upsamplers: diffusion models that turn z_i into pixels.

- `model.Decoder`: UNet2DConditionModel conditioned on z_i (added to the timestep embedding and
  projected into 4 context tokens, `text_proj.TextProj`) and the caption's CLIP token states.
- `upsampler.Upsampler`: UNet2DModel, convolutions only, conditioned on the upsampled low-res image.
- `degrade`: blur and BSR-style degradations of the upsamplers' conditioning.
- `data`: decoder and upsampler batch feeds; `metrics`: CLIP similarity, PSNR/SSIM vs bicubic.
- `stage`: train_decoder, train_upsampler, save/load as model directories.
"""
