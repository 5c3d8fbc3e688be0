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
from unclip.modeldir import CLIP_COMPONENTS, Manifest, read_manifest, save_model_dir, verify_files

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


# provenance / evaluation keys each stage directory writes about itself
OWN_RECORDS = {"decoder": ("decoder", "clip"), "prior": ("diffusion_prior",), "ar_prior": ("ar_prior",)}


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


def assemble(out: str | Path, *, decoder: str | Path, prior: str | Path | None = None,
             ar_prior: str | Path | None = None, upsamplers: tuple[str | Path, ...] = ()) -> Path:
    """Write the model directory `out` from stage directories; returns `out`.

    decoder: a decoder directory (it also provides the CLIP); prior / ar_prior: diffusion and
    autoregressive prior directories (at least one); upsamplers: stage 1, then stage 2.
    """
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

    clip = clip_fingerprint(decoder_manifest)
    for name, directory, manifest, _ in sources[1:]:
        if name.startswith("upsampler"):
            continue  # upsamplers see pixels only, never CLIP
        if clip_fingerprint(manifest) != clip:
            raise ModelFormatError(f"{directory} ({name}) was trained against a different CLIP than {decoder_dir}; "
                                   "train every stage with the same --clip directory")

    cfg = UnclipConfig.from_dict(decoder_manifest.config)
    upsampler_cfgs = []
    stats, provenance, evaluation = {}, {}, {}
    for name, _, manifest, _ in sources:
        # a stage's own records come from its own directory, whatever older copies other sources carry
        own = OWN_RECORDS.get(name, (name,))
        for merged, records in ((provenance, manifest.provenance), (evaluation, manifest.evaluation)):
            for key, value in records.items():
                if key in own or key not in merged:
                    merged[key] = value
        stage_cfg = UnclipConfig.from_dict(manifest.config)
        if name == "prior":
            cfg = replace(cfg, prior=stage_cfg.prior)
        elif name == "ar_prior":
            cfg = replace(cfg, ar_prior=stage_cfg.ar_prior)
        elif name.startswith("upsampler"):
            upsampler_cfgs.append(stage_cfg.upsamplers[int(name[-1]) - 1])
        stats.update(manifest.stats)
    cfg = replace(cfg, upsamplers=tuple(upsampler_cfgs))
    check(cfg)

    def components(tmp: Path) -> None:
        for _, directory, _, comps in sources:
            for comp in comps:
                shutil.copytree(directory / comp, tmp / comp)

    manifest = Manifest(
        config=cfg.to_dict(), resolutions=resolutions(cfg), stats=stats, provenance=provenance,
        evaluation=evaluation,
        extra={"components": [c for _, _, _, comps in sources for c in comps],
               "priors": [name for name, *_ in sources if name in ("prior", "ar_prior")],
               "upsampler_stages": len(upsamplers)})
    path = save_model_dir(out, manifest, components)
    log.info("assembled %s from %s", path, ", ".join(str(d) for _, d, _, _ in sources))
    return path
