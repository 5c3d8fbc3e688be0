"""Interop with diffusers' unCLIP: import a Karlo-layout directory, export to UnCLIPPipeline.

Both directions are tested against diffusers itself: a tiny random-init UnCLIPPipeline built
and saved by diffusers is imported and its stages compared number for number with diffusers'
own pipeline; a tiny unclip model is exported and loaded by `UnCLIPPipeline.from_pretrained`,
and each of its networks compared with unclip's.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unclip.errors import ConfigError, ModelFormatError

CONTEXT, WIDTH = 20, 32  # tokenizer context and CLIP width of the tiny diffusers model
PROMPT = "a red circle"


# --- a tiny Karlo, built and saved by diffusers -----------------------------------------------


def _clip_tokenizer(root):
    """A CLIP BPE without merges: every byte a token (as in CLIP's base vocabulary), specials last."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    root.mkdir()
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(root), model_max_length=CONTEXT)


def _karlo(root):
    """diffusers' UnCLIPPipeline with tiny random networks (the shapes of diffusers' own unCLIP tests),
    plus the image-variation layout's image encoder and feature extractor."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    tokenizer = _clip_tokenizer(root / "vocab")
    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, projection_dim=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=WIDTH, num_layers=1,
                             num_embeddings=CONTEXT)
    with torch.no_grad():  # diffusers starts these at zero, which would hide the latent (de)normalisation
        prior.clip_mean.normal_()
        prior.clip_std.uniform_(0.5, 1.5)
        prior.prd_embedding.normal_()
        prior.positional_embedding.normal_(std=0.1)
    decoder = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=WIDTH, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    super_res = {"sample_size": 64, "layers_per_block": 1, "block_out_channels": (16, 32), "in_channels": 6,
                 "out_channels": 3, "norm_num_groups": 8,
                 "down_block_types": ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                 "up_block_types": ("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D")}
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text, tokenizer=tokenizer,
        text_proj=UnCLIPTextProjModel(clip_embeddings_dim=WIDTH, time_embed_dim=128, cross_attention_dim=WIDTH),
        super_res_first=UNet2DModel(**super_res), super_res_last=UNet2DModel(**super_res),
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
    pipe.save_pretrained(root / "karlo")  # its model_index.json names text_proj as diffusers' (see docs/interop.md)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=WIDTH, projection_dim=WIDTH, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=4))
    vision.save_pretrained(root / "karlo" / "image_encoder")
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    extractor.save_pretrained(root / "karlo" / "feature_extractor")
    return root / "karlo", pipe, vision, extractor


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    return _karlo(tmp_path_factory.mktemp("karlo"))


@pytest.fixture(scope="module")
def imported(karlo):
    import unclip

    return unclip.load(karlo[0], precision="float32")  # compared with diffusers to 3e-3


def _image(side=32, seed=0):
    from unclip.data.render import render
    from unclip.data.world import sample

    return render(sample("val", seed, lang="en").scene, side)


def _run_diffusers(ref, **kwargs):
    """Run diffusers' pipeline, recording what enters each stage: z_i (text_proj), the generator
    state at the decoder's and the super-res stage's first call, and the upsampled decoder output."""
    seen = {}
    generator = torch.Generator().manual_seed(0)

    def record(module, args, kwargs):  # a forward pre-hook: first call of each module only
        if module is ref.text_proj:
            seen.setdefault("z_i", kwargs["image_embeddings"].clone())
        elif module is ref.decoder:
            seen.setdefault("decoder_rng", generator.get_state())
        elif "sr_rng" not in seen:
            seen.update(sr_rng=generator.get_state(), up=kwargs["sample"][:, 3:].clone())

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
             for m in (ref.text_proj, ref.decoder, ref.super_res_first)]
    try:
        seen["images"] = ref(generator=generator, output_type="np", **kwargs).images
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _generator(state):
    g = torch.Generator()
    g.set_state(state)
    return g


# --- import --------------------------------------------------------------------------------------


def test_imported_cascade_computes_what_diffusers_computes(karlo, imported):
    """Every stage of the imported model, given the inputs diffusers' pipeline gave that stage,
    returns what the stage returned there: prior, decoder with guidance, super-res (last network
    at the last step), with the same noise from the same generator."""
    from unclip.diffusion import sample

    _, ref, _, _ = karlo
    steps = {"prior_num_inference_steps": 5, "decoder_num_inference_steps": 4, "super_res_num_inference_steps": 3}
    g = torch.Generator().manual_seed(1)
    latents = {"prior_latents": torch.randn(1, WIDTH, generator=g),
               "decoder_latents": torch.randn(1, 3, 16, 16, generator=g),
               "super_res_latents": torch.randn(1, 3, 64, 64, generator=g)}
    seen = _run_diffusers(ref, prompt=PROMPT, prior_guidance_scale=4.0, decoder_guidance_scale=8.0, **steps, **latents)

    with torch.no_grad():
        prompt_embeds, states, mask = ref._encode_prompt(PROMPT, torch.device("cpu"), 1, False)
        text = imported.encode_text(PROMPT)
        assert torch.equal(text.embeds, prompt_embeds) and torch.equal(text.token_states, states)
        assert torch.equal(text.mask.bool(), mask)

        z_i = imported.prior.sample(text.token_states, text.mask, text.embeds, x_T=latents["prior_latents"], steps=5,
                                    sampler="ddpm", guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(z_i, seen["z_i"], atol=2e-3), (z_i - seen["z_i"]).abs().max()

        x = imported.decoder.sample(seen["z_i"], text.token_states, text.mask, text_embeds=text.embeds,
                                    x_T=latents["decoder_latents"], steps=4, sampler="ddpm", guidance_scale=8.0,
                                    generator=_generator(seen["decoder_rng"]))
        up = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)  # as diffusers
        assert torch.allclose(up, seen["up"], atol=3e-3), (up - seen["up"]).abs().max()

        upsampler = imported.upsamplers[0]
        used = []
        hooks = [net.register_forward_pre_hook(lambda m, a, name=name: used.append(name))
                 for name, net in (("first", upsampler.unet), ("last", upsampler.last))]
        y = sample(upsampler.unet_fn, upsampler.diffusion, x_T=latents["super_res_latents"], sampler="ddpm", steps=3,
                   generator=_generator(seen["sr_rng"]), clip_denoised=True, cond={"low": seen["up"]})
        for hook in hooks:
            hook.remove()
    assert used == ["first", "first", "last"]  # super_res_last for the final step only
    ours = ((y + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - seen["images"]).max() < 3e-3

    low = []  # the imported upsampler makes its conditioning the way diffusers does
    hook = upsampler.unet.register_forward_pre_hook(lambda m, a: low.append(a[0][:, 3:]))
    upsampler.sample(x, steps=1)
    hook.remove()
    assert torch.allclose(low[0], up, atol=1e-6)


def test_imported_image_encoder_and_variation_decoder_match_diffusers(karlo, imported):
    """z_i of an image (the feature extractor's preprocessing) and the decoder without a caption
    (UnCLIPImageVariationPipeline conditions on the empty prompt) agree with diffusers."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline

    _, ref, vision, extractor = karlo
    image = _image(32)
    with torch.no_grad():
        z_ref = vision(extractor(images=image, return_tensors="pt").pixel_values).image_embeds
        z_i = imported.encode_image(image)
    assert torch.allclose(z_i, z_ref, atol=1e-4), (z_i - z_ref).abs().max()

    variation = UnCLIPImageVariationPipeline(
        decoder=ref.decoder, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, text_proj=ref.text_proj,
        feature_extractor=extractor, image_encoder=vision, super_res_first=ref.super_res_first,
        super_res_last=ref.super_res_last, decoder_scheduler=ref.decoder_scheduler,
        super_res_scheduler=ref.super_res_scheduler)
    b = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = _run_diffusers(variation, image_embeddings=z_ref, decoder_latents=b, decoder_num_inference_steps=3,
                          super_res_num_inference_steps=2, decoder_guidance_scale=8.0)
    with torch.no_grad():
        x = imported.decoder.sample(z_ref, x_T=b, steps=3, sampler="ddpm", guidance_scale=8.0,
                                    generator=_generator(seen["decoder_rng"]))
    up = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(up, seen["up"], atol=3e-3), (up - seen["up"]).abs().max()


def test_every_task_runs_on_an_imported_karlo(karlo, tmp_path):
    import unclip
    from unclip.pipeline.interop import import_diffusers

    fit = [_image(32, seed) for seed in range(6)]
    out = import_diffusers(karlo[0], tmp_path / "imported", pca_images=fit)
    # float32: the seed check below is exact to 1/255 there; this random-weight Karlo amplifies the
    # different rounding of batched and single bf16 convolutions (docs/pipeline.md, "Seeds")
    pipe = unclip.load(out, precision="float32")
    assert pipe.pca is not None and pipe.config.decoder.text_null == "empty_prompt"
    assert pipe.unknown_words("a dog on a skateboard") == []  # Karlo knows more than shapes world: no warnings
    a, b = _image(32, 1), _image(32, 2)
    fast = {"steps": 2}
    images = pipe.generate(PROMPT, n=2, seed=0, **fast)
    again = pipe.generate(PROMPT, n=1, seed=1, **fast)
    assert [im.size for im in images] == [(64, 64)] * 2
    assert np.abs(np.asarray(again[0], np.int16) - np.asarray(images[1], np.int16)).max() <= 1  # seed + i
    assert len(pipe.variations(a, n=2, seed=0, **fast)) == 2
    assert len(pipe.interpolate(a, b, n=3, **fast)) == 3
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    assert len(pipe.inpaint(a, mask, PROMPT, n=1, resample=1, seed=0, **fast)) == 1
    lengths = []  # every z_i the decoder sees in a text diff or a PCA probe keeps the image's raw length
    hook = pipe.decoder.text_proj.register_forward_pre_hook(lambda m, args: lengths.append(args[0].norm(dim=-1)))
    assert len(pipe.text_diff(a, "a red circle", "a blue square", thetas=(0.0, 0.3), **fast)) == 2
    probed = pipe.pca_probe(a, dims=(1, pipe.pca.components), **fast)
    hook.remove()
    assert len(probed) == 2 and probed[0].size == (64, 64)
    length = pipe.encode_image(a).norm()
    assert abs(float(length) - 1.0) > 0.05  # Karlo's embeddings are not unit vectors …
    assert torch.allclose(torch.cat(lengths), length.expand(len(torch.cat(lengths))), rtol=1e-4)  # … and stay as long


def test_import_errors_say_what_is_missing(karlo, imported, tmp_path):
    import unclip

    source = karlo[0]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken, ignore=shutil.ignore_patterns("decoder"))
    with pytest.raises(ModelFormatError, match="decoder/"):
        unclip.load(broken)
    half_copied = tmp_path / "half_copied"  # every folder there, one file short: transformers' own error, wrapped
    shutil.copytree(source, half_copied, ignore=shutil.ignore_patterns("tokenizer*.json", "vocab.json", "merges.txt"))
    with pytest.raises(ModelFormatError, match="half_copied is not a complete diffusers unCLIP directory"):
        unclip.load(half_copied)
    with pytest.raises(ConfigError, match="PCA basis"):
        imported.pca_probe(_image(32))
    text_only = tmp_path / "text_only"
    shutil.copytree(source, text_only, ignore=shutil.ignore_patterns("image_encoder", "feature_extractor"))
    with pytest.raises(ModelFormatError, match="--image-encoder"):
        unclip.load(text_only).variations(_image(32), n=1, steps=1)
    variation_only = tmp_path / "variation_only"
    shutil.copytree(source, variation_only, ignore=shutil.ignore_patterns("prior", "prior_scheduler"))
    pipe = unclip.load(variation_only)
    with pytest.raises(ConfigError, match="no prior"):
        pipe.generate(PROMPT, steps=1)
    assert len(pipe.variations(_image(32), n=1, steps=1)) == 1


# --- export --------------------------------------------------------------------------------------


def _tiny_unclip(root, prediction_type="epsilon", target="image"):
    """A tiny unclip model (untrained stages), assembled as `unclip assemble` would; `prediction_type`
    of its decoder and upsampler, `target` of its upsampler."""
    from dataclasses import replace

    from unclip.clip.stage import load_clip
    from unclip.config import preset
    from unclip.decoder.stage import build_decoder, save_decoder, save_upsampler, with_clip_config
    from unclip.decoder.upsampler import Upsampler
    from unclip.pipeline.assemble import assemble
    from unclip.prior.stage import build_diffusion_prior, save_diffusion_prior

    from tiny_models import save_tiny_clip

    cfg = preset("tiny")
    cfg = replace(cfg, decoder=replace(cfg.decoder, prediction_type=prediction_type),
                  upsamplers=(replace(cfg.upsamplers[0], prediction_type=prediction_type, target=target),))
    clip_dir = save_tiny_clip(root)
    cfg, clip = with_clip_config(cfg, clip_dir), load_clip(clip_dir)
    decoder = save_decoder(build_decoder(cfg), clip, root / "decoder", cfg=cfg, clip_dir=clip_dir)
    prior = save_diffusion_prior(clip, build_diffusion_prior(cfg, clip, fit_samples=32), root / "prior", cfg=cfg,
                                 clip_dir=clip_dir, evaluation={}, provenance={})
    up = save_upsampler(Upsampler.from_config(cfg.upsamplers[0]), root / "up", cfg=cfg, stage=1)
    return assemble(root / "model", decoder=decoder, prior=prior, upsamplers=(up,))


@pytest.fixture(scope="module")
def unclip_model(tmp_path_factory):
    return _tiny_unclip(tmp_path_factory.mktemp("unclip"))


def _load_exported(out, root):
    import diffusers.utils.dynamic_modules_utils as dynamic

    modules_cache = dynamic.HF_MODULES_CACHE
    dynamic.HF_MODULES_CACHE = str(root / "hf_modules")  # where diffusers copies custom component code
    try:
        from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

        return UnCLIPPipeline.from_pretrained(out, trust_remote_code=True)
    finally:
        dynamic.HF_MODULES_CACHE = modules_cache


@pytest.fixture(scope="module")
def exported(unclip_model, tmp_path_factory):
    from unclip.pipeline.export import export_diffusers

    root = tmp_path_factory.mktemp("exported")
    out = export_diffusers(unclip_model, root / "diffusers")
    return out, _load_exported(out, root)


def test_export_loads_and_runs_in_diffusers(exported):
    out, ref = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_proj"][0] == "diffusers.pipelines.deprecated.unclip.text_proj"
    images = ref(PROMPT, prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    import unclip

    again = unclip.load(out)  # and the exported directory imports back
    assert again.generate(PROMPT, n=1, seed=0, steps=1)[0].size == (64, 64)


def test_exported_networks_compute_what_unclip_computes(unclip_model, exported):
    import unclip

    _, ref = exported
    pipe = unclip.load(unclip_model)
    dim = pipe.clip.config.embed_dim
    prompts = [PROMPT, "วงกลมสีแดงอยู่เหนือสี่เหลี่ยม"]
    with torch.no_grad():
        tokens = pipe.clip.tokenize(prompts)
        prompt_embeds, states, mask = ref._encode_prompt(prompts, torch.device("cpu"), 1, False)
        assert torch.equal(mask.long(), tokens.attention_mask)  # the exported tokenizer is unclip's BPE
        text = pipe.clip.encode_text(tokens)
        keep = mask[..., None]
        assert torch.allclose(states * keep, text.token_states * keep, atol=1e-5)  # pads: diffusers passes no mask

        # prior: the LayerNorm turns the exported text_embeds into unclip's unit-length z_t
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, dim, generator=g)
        t = torch.tensor([700, 30])
        ones = torch.ones(2, dtype=torch.bool)
        ours = pipe.prior.model_fn(x, t, **pipe.prior.cond(text.embeds, text.token_states.float(), text.mask, ones))
        theirs = ref.prior(F.pad(x, (0, ref.prior.config.embedding_dim - dim)), timestep=t,
                           proj_embedding=prompt_embeds, encoder_hidden_states=states,
                           attention_mask=mask).predicted_image_embedding
        assert torch.allclose(theirs[:, :dim], ours, atol=1e-4) and theirs[:, dim:].abs().max() == 0
        padded = ref.prior.post_process_latents(F.pad(ours, (0, theirs.shape[1] - dim)))
        assert torch.allclose(padded[:, :dim], pipe.prior.denormalise(ours), atol=1e-6)
        assert padded[:, dim:].abs().max() == 0

        # decoder: diffusers' text projection + the exported UNet (mask through the shim) = unclip's decoder
        z_i = F.normalize(torch.randn(2, dim, generator=g), dim=-1)
        x_t = torch.randn(2, 3, 16, 16, generator=g)
        cond = pipe.decoder.text_proj(z_i, text.token_states.float(), text.mask, keep_z=ones, keep_text=ones)
        ours = pipe.decoder.unet_fn(x_t, t, **cond)
        width = ref.text_proj.config.clip_embeddings_dim
        hidden, time_addend = ref.text_proj(image_embeddings=F.pad(z_i, (0, width - dim)),
                                            prompt_embeds=prompt_embeds, text_encoder_hidden_states=states,
                                            do_classifier_free_guidance=False)
        theirs = ref.decoder(x_t, t, encoder_hidden_states=hidden, class_labels=time_addend,
                             attention_mask=F.pad(mask, (4, 0), value=True)).sample
        assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
        null = ref.text_proj.learned_classifier_free_guidance_embeddings
        assert torch.equal(null[:dim], pipe.decoder.text_proj.learned_classifier_free_guidance_embeddings)

        # super-resolution and the schedules
        low = torch.randn(1, 6, 64, 64, generator=g)
        assert torch.allclose(ref.super_res_first(low, 10).sample, pipe.upsamplers[0].unet(low, 10).sample, atol=1e-6)
        for scheduler, diffusion in ((ref.prior_scheduler, pipe.prior.diffusion),
                                     (ref.decoder_scheduler, pipe.decoder.diffusion),
                                     (ref.super_res_scheduler, pipe.upsamplers[0].diffusion)):
            assert torch.allclose(scheduler.alphas_cumprod.double(), diffusion.alphas_cumprod, rtol=1e-4)


def test_v_prediction_exports_through_the_shim_as_epsilon(tmp_path):
    import unclip
    from unclip.pipeline.export import export_diffusers

    model = _tiny_unclip(tmp_path / "v", prediction_type="v_prediction", target="residual")
    out = export_diffusers(model, tmp_path / "diffusers")
    ref = _load_exported(out, tmp_path)
    index = json.loads((out / "model_index.json").read_text())
    # module names carry the settings: diffusers caches custom modules by name
    assert index["super_res_first"] == ["unclip_unet_v_prediction_100_residual", "UnclipUNet2DModel"]
    assert index["decoder"] == ["unclip_unet_v_prediction_100_image", "UnclipUNet2DConditionModel"]
    assert ref.decoder_scheduler.config.prediction_type == "epsilon"
    pipe = unclip.load(model)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([90, 4])  # tiny: 100 timesteps
    with torch.no_grad():
        x_t, up = torch.randn(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
        d = pipe.upsamplers[0].diffusion
        # diffusers' x_t is the image's; unclip's residual upsampler sees x_t - sqrt(abar) up, same noise
        x_r = x_t - d.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1) * up
        v = pipe.upsamplers[0].unet(torch.cat([x_r, up], dim=1), t).sample
        eps = d.eps_from_x0(x_r, t, d.x0_from_v(x_r, t, v))
        assert torch.allclose(ref.super_res_first(torch.cat([x_t, up], dim=1), t).sample, eps, atol=1e-4)
        assert torch.allclose(ref.super_res_last(torch.cat([x_t, up], dim=1), t).sample, eps, atol=1e-4)
    images = ref(PROMPT, prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()

    # imported back, the networks' raw outputs are v of the image and of the residual, as unclip trained
    # them (read as ε, the round trip drew noise), with the exported model's own sampling settings
    from unclip.pipeline.interop import import_diffusers

    back = unclip.load(import_diffusers(out, tmp_path / "back"))
    assert back.decoder.config.prediction_type == "v_prediction"
    up_back = back.upsamplers[0].config
    assert (up_back.prediction_type, up_back.target) == ("v_prediction", "residual")
    assert (up_back.sampler, up_back.sample_start) == (pipe.upsamplers[0].config.sampler,
                                                       pipe.upsamplers[0].config.sample_start)
    assert back.decoder.config.guidance_scale == pipe.decoder.config.guidance_scale
    with torch.no_grad():
        assert torch.allclose(back.upsamplers[0].unet_fn(x_r, t, low=up), v, atol=1e-4)


def test_export_refuses_what_diffusers_cannot_hold(karlo, tmp_path):
    from unclip.pipeline.export import export_diffusers

    with pytest.raises(ModelFormatError, match="diffusers layout already"):
        export_diffusers(karlo[0], tmp_path / "again")
    assert not (tmp_path / "again").exists()


# --- command line --------------------------------------------------------------------------------


def test_cli_import_and_export(karlo, unclip_model, tmp_path, capsys):
    from unclip.cli import main

    text_only = tmp_path / "karlo_text_only"  # like karlo-v1-alpha: no image encoder of its own
    shutil.copytree(karlo[0], text_only, ignore=shutil.ignore_patterns("image_encoder", "feature_extractor"))
    imported, image = tmp_path / "imported", tmp_path / "image.png"
    _image(32).save(image)
    assert main(["import-diffusers", str(text_only), "--out", str(imported), "--pca-shapes", "4",
                 "--image-encoder", str(karlo[0] / "image_encoder")]) == 0
    assert (imported / "image_encoder").is_dir() and (imported / "pca").is_dir()
    common = ["--steps", "1", "--quiet", "--model", str(imported)]
    assert main(["generate", PROMPT, "-n", "1", *common, "--out", str(tmp_path / "grid.png")]) == 0
    assert main(["probe", str(image), "--dims", "1", "2", *common, "--out", str(tmp_path / "probe.png")]) == 0
    assert (tmp_path / "grid-0.png").is_file() and (tmp_path / "probe-1.png").is_file()
    assert main(["export-diffusers", str(unclip_model), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model_index.json").is_file()
    assert "trust_remote_code=True" in capsys.readouterr().out


def test_an_unclip_export_imports_with_its_own_best_of_candidates_and_unit_z_i(unclip_model, exported, tmp_path):
    """Imported back, an unclip export samples its prior as unclip does (best of the recorded k, unit
    length, which its decoder learnt from) and keeps its candidates; a Karlo import keeps diffusers' one
    raw sample (test_imported_cascade_computes_what_diffusers_computes)."""
    from dataclasses import replace

    import unclip
    from unclip.pipeline.interop import import_diffusers
    from unclip.prior.diffusion import pick_best

    out, _ = exported
    pipe, back = unclip.load(unclip_model), unclip.load(import_diffusers(out, tmp_path / "back"))
    record = json.loads((out / "unclip_export.json").read_text())["sampling"]
    assert record["prior_best_of"] == pipe.prior.config.best_of == back.prior.config.best_of == 2
    assert (back.decoder.config.candidates, back.decoder.config.upsampled_candidates) == \
        (pipe.decoder.config.candidates, pipe.decoder.config.upsampled_candidates)
    text = back.encode_text(["a red circle", "a blue square"])
    states, mask, z_t = text.token_states.float(), text.mask, text.embeds.float()
    k, seeds = 3, (5, 6)
    back.prior.config = replace(back.prior.config, best_of=k)
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # one per caption, as the pipeline passes them
    best = back.prior.sample(states, mask, z_t, steps=2, generator=[g for _ in range(k) for g in gens])
    assert torch.allclose(best.norm(dim=-1), torch.ones(2), atol=1e-5) and best.shape == z_t.shape
    back.prior.config = replace(back.prior.config, best_of=1)  # the same k·B rows drawn one by one
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    rows = back.prior.sample(torch.cat([states] * k), torch.cat([mask] * k), torch.cat([z_t] * k), steps=2,
                             generator=[g for _ in range(k) for g in gens])
    assert torch.allclose(best, pick_best(rows.reshape(k, *z_t.shape), z_t), atol=1e-6)
    assert not torch.allclose(rows[:2], rows[2:4])  # the candidates differ, so picking means something


def test_an_unclip_export_read_back_encodes_images_as_the_original(unclip_model, exported):
    """The image tasks (variations, interpolate, probe) of an export read back handed its decoder the
    raw projection (norm 3.2 on the tiny model) where the original, and its decoder's training, have
    unit-length z_i; a Karlo import keeps raw embeddings (test_imported_image_encoder_...)."""
    import unclip

    out, _ = exported
    pipe, back = unclip.load(unclip_model, precision="float32"), unclip.load(out, precision="float32")
    with torch.no_grad():
        ours, theirs = pipe.encode_image(_image(32)), back.encode_image(_image(32))
    assert torch.allclose(theirs, F.pad(ours, (0, theirs.shape[1] - ours.shape[1])), atol=1e-5)


def test_an_unclip_export_read_back_encodes_captions_as_the_original(unclip_model, exported):
    """Read back, an export's z_t was the mirrored s·[x, −x, 0…] its prior's LayerNorm needs: text diffs
    moved along a direction 1/√2 as long in the decoder's dimensions, and z_t-as-z_i decoded a z_i of
    norm 1/√2. z_t is now unclip's, and the prior still reads it mirrored (its samples unchanged)."""
    import unclip
    from unclip.pipeline.latent import text_direction

    out, ref = exported
    pipe, back = unclip.load(unclip_model, precision="float32"), unclip.load(out, precision="float32")
    prompts = [PROMPT, "a blue square"]
    with torch.no_grad():
        ours, theirs = pipe.encode_text(prompts).embeds, back.encode_text(prompts).embeds
        dim = ours.shape[1]
        assert torch.allclose(theirs, F.pad(ours, (0, theirs.shape[1] - dim)), atol=1e-5)
        direction = text_direction(theirs[1:], theirs[:1])
        assert torch.allclose(direction[..., :dim], text_direction(ours[1:], ours[:1]), atol=1e-5)
        # the prior reads what diffusers hands it: its LayerNorm sees the same vector
        raw, _, _ = ref._encode_prompt(prompts, torch.device("cpu"), 1, False)
        norm = back.prior.transformer.embedding_proj_norm
        assert torch.allclose(norm(back.prior._proj_embedding(theirs)), norm(raw), atol=1e-4)


def test_an_unclip_export_keeps_its_samplers_eta(unclip_model, tmp_path):
    """The export recorded each stage's sampler but not its DDIM η, so a model set to sample with η > 0
    read back sampled deterministically (η = 0)."""
    import unclip
    from unclip.pipeline.export import export_diffusers

    model = tmp_path / "model"
    shutil.copytree(unclip_model, model)
    manifest = json.loads((model / "unclip.json").read_text())
    cfg = manifest["config"]
    cfg["decoder"]["eta"], cfg["prior"]["eta"], cfg["upsamplers"][0]["eta"] = 0.3, 0.2, 0.1
    (model / "unclip.json").write_text(json.dumps(manifest))
    back = unclip.load(export_diffusers(model, tmp_path / "diffusers"))
    assert (back.decoder.config.eta, back.prior.config.eta, back.upsamplers[0].config.eta) == (0.3, 0.2, 0.1)


def test_an_unclip_export_keeps_the_words_of_its_captions(unclip_model, tmp_path):
    """A model trained on other data warns about prompt words none of its captions use
    (`unclip.words`); read back from an export, it did not: the words stayed behind."""
    import unclip
    from unclip.pipeline.export import export_diffusers
    from unclip.words import CaptionWords

    model = tmp_path / "model"
    shutil.copytree(unclip_model, model)
    CaptionWords.of(["a red circle", "a blue square"]).save(model / "tokenizer")  # as its CLIP run writes them
    back = unclip.load(export_diffusers(model, tmp_path / "diffusers"))
    assert back.unknown_words("a red zebra") == ["zebra"]
    assert back.prompt_warnings("a red zebra")[0].startswith("none of the 2 training captions this model read")


def test_an_export_cleans_up_what_a_killed_export_left(unclip_model, tmp_path):
    """A killed export left its `.NAME.XXXX.tmp` folder (as big as the model) for good: it carried no
    writer's PID, so nothing could tell it from a live export's."""
    import subprocess
    import sys

    from unclip.pipeline.export import export_diffusers

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    left = tmp_path / f".diffusers.{child.pid}.abcd1234.tmp"
    left.mkdir()
    (left / "model_index.json").write_text("{}")
    out = export_diffusers(unclip_model, tmp_path / "diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
