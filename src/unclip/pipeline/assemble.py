"""Put separately trained stages together into one model directory (DESIGN §4).

Each `unclip train STAGE` writes a directory holding its stage and the frozen CLIP it was
trained against. `assemble` checks that every stage was trained against the same CLIP (the
text and image towers' sha256 in each manifest), copies the components into one directory in
the diffusers unCLIP layout, and merges the manifests: each stage's section of the config,
statistics, provenance and evaluation come from the directory that trained it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from unclip.config import UnclipConfig, check, resolutions
from unclip.errors import ModelFormatError
from unclip.modeldir import (CLIP_COMPONENTS, RANKER, Manifest, check_replaceable, read_manifest, save_model_dir,
                             verify_files)

log = logging.getLogger(__name__)

# the folder that marks each stage in the directory its `unclip train` verb writes
STAGE_MARKERS = {"decoder": "decoder", "prior": "prior", "ar_prior": "ar_prior",
                 "upsampler1": "super_res_first", "upsampler2": "super_res_second"}
# which of a directory's components belong to each stage (an assembled model lists them all)
OWNS = {"decoder": lambda c: c in CLIP_COMPONENTS or c in ("decoder", "text_proj", "decoder_scheduler"),
        "prior": lambda c: c.startswith("prior"),
        "ar_prior": lambda c: c == "ar_prior",
        "upsampler1": lambda c: c in ("super_res_first", "super_res_scheduler"),
        "upsampler2": lambda c: c in ("super_res_second", "super_res_second_scheduler")}
VERBS = {"decoder": "decoder", "prior": "prior --kind diffusion", "ar_prior": "prior --kind ar",
         "upsampler1": "upsampler --stage 1", "upsampler2": "upsampler --stage 2"}


# provenance / evaluation keys each stage directory writes about itself ("upsampler": the first
# upsampler's bench/stage_metrics.py rows, as scripts/ship_default.py records them)
OWN_RECORDS = {"decoder": ("decoder", "clip"), "prior": ("diffusion_prior",), "ar_prior": ("ar_prior",),
               "upsampler1": ("upsampler1", "upsampler")}


def clip_fingerprint(manifest: Manifest) -> dict[str, str]:
    """sha256 of the CLIP's weights and tokenizer files a manifest lists: equal fingerprints mean
    the same frozen CLIP. The towers' config.json files are left out: transformers writes its own
    version into them, so re-saving the same CLIP under another version changes their bytes while
    the towers stay the same."""
    return {name: record["sha256"] for name, record in manifest.files.items()
            if name.split("/", 1)[0] in CLIP_COMPONENTS and not name.endswith("/config.json")}


def _source(name: str, directory: str | Path) -> tuple[str, Path, Manifest, tuple[str, ...]]:
    """A stage directory, checked, with the components it contributes (its own; the decoder also
    brings the CLIP). Any directory holding the stage works, an assembled model included."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    marker = STAGE_MARKERS[name]
    if not (directory / marker).is_dir():
        raise ModelFormatError(f"{directory} holds no {name} (no {marker}/); pass the directory written by "
                               f"`unclip train {VERBS[name]}`")
    listed = manifest.extra.get("components") or [marker]
    own = tuple(c for c in listed if OWNS[name](c))
    return name, directory, manifest, own


def _same_image_tower(a: Path, b: Path) -> bool:
    """Do two CLIP directories hold the same image tower, tensor for tensor? Compared at the lower of
    the two precisions, so a float16 model and a float32 fine-tune that froze its image tower agree."""
    import torch

    from unclip.modeldir import load_weights

    ours, theirs = (load_weights(d / "image_encoder" / "model.safetensors") for d in (a, b))
    if ours.keys() != theirs.keys():
        return False
    for name, x in ours.items():
        y = theirs[name]
        low = x.dtype if torch.finfo(x.dtype).bits <= torch.finfo(y.dtype).bits else y.dtype
        if x.shape != y.shape or not torch.equal(x.to(low), y.to(low)):
            return False
    return True


def _clip_source(clip: str | Path, decoder_dir: Path, decoder_manifest: Manifest, *,
                 flag: str = "--clip") -> tuple[Path, Manifest]:
    """A CLIP directory that may stand in for the decoder's, or rank its candidates (flag="--ranker"):
    same image tower and tokenizer (a `clip.train_towers=text` fine-tune of it), so every z_i the
    decoder was trained on is unchanged."""
    from unclip.clip.stage import same_network

    clip = Path(clip)
    manifest = read_manifest(clip)
    verify_files(clip, manifest)
    ours, theirs = UnclipConfig.from_dict(decoder_manifest.config), UnclipConfig.from_dict(manifest.config)

    def tokenizer(m: Manifest) -> dict:
        return {k: v for k, v in clip_fingerprint(m).items() if k.startswith("tokenizer/")}

    same_tokenizer = theirs.tokenizer == ours.tokenizer and tokenizer(manifest) == tokenizer(decoder_manifest)
    if not (same_network(theirs.clip, ours.clip) and same_tokenizer and _same_image_tower(clip, decoder_dir)):
        raise ModelFormatError(f"{flag} {clip}: the decoder draws from the image embeddings of the CLIP it was "
                               f"trained against ({decoder_dir}), so another CLIP must keep that network, image "
                               "tower and tokenizer; fine-tune it with --init and --set clip.train_towers=text")
    return clip, manifest


def _ranker_source(ranker: str | Path, clip_dir: Path,
                   clip_manifest: Manifest) -> tuple[Path, dict | None, dict | None]:
    """The ranking tower `--ranker` gives, checked against the carried CLIP (`_clip_source`): its
    folder (a model's `rank_text_encoder/`, else a CLIP's `text_encoder/`) and its provenance and
    evaluation records (the model's `ranker` entries, else the CLIP run's own)."""
    from unclip.clip.stage import clip_records

    directory, manifest = _clip_source(ranker, clip_dir, clip_manifest, flag="--ranker")
    if (directory / RANKER).is_dir():
        return directory / RANKER, manifest.provenance.get("ranker"), manifest.evaluation.get("ranker")
    return directory / "text_encoder", clip_records(manifest)[0], manifest.evaluation.get("clip")


def with_sampling(cfg: UnclipConfig, source: UnclipConfig) -> UnclipConfig:
    """`cfg` with the sampling settings of `source` in every stage both have (weights untouched)."""
    from unclip.train.runconfig import SAMPLING

    def take(ours, theirs):
        return replace(ours, **{k: getattr(theirs, k) for k in SAMPLING if hasattr(ours, k) and hasattr(theirs, k)})

    ups = tuple(take(u, v) for u, v in zip(cfg.upsamplers, source.upsamplers)) + cfg.upsamplers[len(source.upsamplers):]
    return replace(cfg, decoder=take(cfg.decoder, source.decoder), prior=take(cfg.prior, source.prior),
                   ar_prior=take(cfg.ar_prior, source.ar_prior), upsamplers=ups)


def assemble(out: str | Path, *, decoder: str | Path, prior: str | Path | None = None,
             ar_prior: str | Path | None = None, upsamplers: tuple[str | Path, ...] = (),
             clip: str | Path | None = None, ranker: str | Path | None = None,
             sampling: UnclipConfig | None = None) -> Path:
    """Write the model directory `out` from stage directories; returns `out`.

    decoder: a decoder directory (it also provides the CLIP); prior / ar_prior: diffusion and
    autoregressive prior directories (at least one); upsamplers: stage 1, then stage 2. clip: a CLIP
    to carry instead of the decoder's, one that kept its image tower and tokenizer (a text-tower
    fine-tune, `clip.train_towers=text`): the priors must have been trained against it, and the
    decoder reads its caption states from the new text tower. ranker: a CLIP directory of that kind
    too, whose text tower the model carries as `rank_text_encoder/` to rank the diffusion prior's
    best-of samples and the decoder's candidates while the stages keep reading their own tower (a
    model that has a ranking tower gives that one). sampling: a config whose sampling
    settings (`runconfig.SAMPLING`: sampler, steps, guidance, candidates, ...) the model takes
    instead of the stages' own (`train all` passes its config, whose sampling may have changed
    after a stage was trained).
    """
    check_replaceable(out)
    if prior is None and ar_prior is None:
        raise ModelFormatError("a model needs a prior: pass a diffusion prior directory, an AR prior directory, or both")
    if len(upsamplers) > 2:
        raise ModelFormatError(f"at most 2 upsampler stages, got {len(upsamplers)}")
    sources = [_source("decoder", decoder)]
    if prior is not None:
        sources.append(_source("prior", prior))
    if ar_prior is not None:
        sources.append(_source("ar_prior", ar_prior))
    sources += [_source(f"upsampler{stage}", directory) for stage, directory in enumerate(upsamplers, start=1)]
    _, decoder_dir, decoder_manifest, _ = sources[0]
    if not set(CLIP_COMPONENTS) <= set(sources[0][3]):
        raise ModelFormatError(f"{decoder_dir} does not list the CLIP components it was trained against")

    clip_dir, clip_manifest = (decoder_dir, decoder_manifest) if clip is None else _clip_source(
        clip, decoder_dir, decoder_manifest)
    if clip is not None:  # the decoder brings its own stage only; the CLIP (and its records) come from clip_dir
        sources[0] = ("decoder", decoder_dir, decoder_manifest,
                      tuple(c for c in sources[0][3] if c not in CLIP_COMPONENTS))
        sources.insert(0, ("clip", clip_dir, clip_manifest, CLIP_COMPONENTS))
    tower, *ranker_records = (None, None, None) if ranker is None else _ranker_source(ranker, clip_dir, clip_manifest)
    fingerprint = clip_fingerprint(clip_manifest)
    for name, directory, manifest, _ in sources:
        if name.startswith("upsampler") or name in ("clip", "decoder"):
            continue  # upsamplers see pixels only, never CLIP
        if clip_fingerprint(manifest) != fingerprint:
            raise ModelFormatError(f"{directory} ({name}) was trained against a different CLIP than {clip_dir}; "
                                   "train every stage with the same --clip directory")

    cfg = UnclipConfig.from_dict(decoder_manifest.config)
    cfg = replace(cfg, clip=UnclipConfig.from_dict(clip_manifest.config).clip)
    upsampler_cfgs = []
    stats, provenance, evaluation = {}, {}, {}
    for name, _, manifest, _ in sources:
        # A stage's records come from its own directory alone: a whole model given as the priors'
        # source also carries its decoder's (which passed for those of a decoder continued with
        # --no-eval), its GenEval-style scores and recipe (another model's), and records of stages
        # this one may lack.
        own = ("decoder",) if name == "decoder" and clip is not None else OWN_RECORDS.get(name, (name,))
        records_of = manifest.provenance, manifest.evaluation
        if name == "clip":
            from unclip.clip.stage import clip_records

            clip_provenance, clip_evaluation = clip_records(manifest)
            records_of = {"clip": clip_provenance}, clip_evaluation
        for merged, records in zip((provenance, evaluation), records_of):
            for key, value in records.items():
                if key in own:
                    merged[key] = value
        stage_cfg = UnclipConfig.from_dict(manifest.config)
        if name == "prior":
            cfg = replace(cfg, prior=stage_cfg.prior)
        elif name == "ar_prior":
            cfg = replace(cfg, ar_prior=stage_cfg.ar_prior)
        elif name.startswith("upsampler"):
            upsampler_cfgs.append(stage_cfg.upsamplers[int(name[-1]) - 1])
        stats.update(manifest.stats)
    for merged, record in zip((provenance, evaluation), ranker_records):
        if record is not None:
            merged["ranker"] = record
    stats.update(clip_manifest.stats)  # the carried CLIP's temperature, over the decoder's copy of its own
    cfg = replace(cfg, upsamplers=tuple(upsampler_cfgs))
    if sampling is not None:
        cfg = with_sampling(cfg, sampling)
    check(cfg)

    def components(tmp: Path) -> None:
        for _, directory, _, comps in sources:
            for comp in comps:
                shutil.copytree(directory / comp, tmp / comp)
        if tower is not None:
            shutil.copytree(tower, tmp / RANKER)

    manifest = Manifest(
        config=cfg.to_dict(), resolutions=resolutions(cfg), stats=stats, provenance=provenance,
        evaluation=evaluation,
        extra={"components": [c for _, _, _, comps in sources for c in comps] + ([RANKER] if tower else []),
               "priors": [name for name, *_ in sources if name in ("prior", "ar_prior")],
               "upsampler_stages": len(upsamplers)})
    path = save_model_dir(out, manifest, components)
    log.info("assembled %s from %s", path, ", ".join(str(d) for _, d, _, _ in sources))
    return path
