"""`unclip generate|vary|interpolate|textdiff|inpaint|probe|assemble`: the pipeline on the command line.

Every image verb writes a captioned grid (`--out`, a PNG) and each image beside it
(`<out stem>-<i>.png`), every PNG carrying its generation parameters as JSON in the PNG text
chunk "unclip", and shows a progress bar per sampling stage. `unclip generate` stopped part-way
resumes: run again with the same settings, it keeps the images its PNGs say it drew and draws
the rest (`resume_singles`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
from pathlib import Path

from unclip.argtypes import angle, eta, guidance, int_range, noise_level, positive_int, seed_number, threads
from unclip.errors import ConfigError
from unclip.io import check_output_dir
from unclip.pipeline import MAX_IMAGES

VERB_HELP = {
    "generate": "caption → images (prior → decoder → upsamplers)",
    "vary": "variations of an image (DDIM inversion, then DDIM with η > 0; paper §3.1)",
    "interpolate": "images between two images (slerp of z_i; paper §3.2)",
    "textdiff": "edit an image toward a new caption (paper §3.3)",
    "inpaint": "repaint the white (or transparent) region of a mask",
    "probe": "decode an image's z_i from its first k PCA dimensions (paper §4)",
    "upscale": "enlarge an image with the model's ×4 upsamplers alone",
}


class ProgressBars:
    """callback(stage, step) for the pipeline: one tqdm bar per sampling stage, on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self.stage = enabled, None, None

    def __call__(self, stage: str, step) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage or self.bar is None or self.bar.n >= self.bar.total:
            self.close()
            self.bar, self.stage = tqdm(total=step.total, desc=stage, unit="step", leave=False), stage
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


GRID_MAX = 64  # images the grid shows; every image is written on its own
BATCH = 16  # images `unclip generate` samples at once, so memory stays flat for any -n


PER_IMAGE_SEED = ("generate", "vary", "inpaint", "upscale", "demo")  # verbs whose image i is drawn with seed + i


OWN_KEYS = ("index", "label", "image_seed")  # what one image's PNG records beside its run's params


def single_params(params: dict, index: int, label: str) -> dict:
    """What image `index` of a run records in its PNG: the run's `params`, its index and label and,
    for the verbs of PER_IMAGE_SEED, the seed that redraws it alone (`--seed` of a one-image run)."""
    own = {"index": index, "label": label}
    if params.get("verb") in PER_IMAGE_SEED and params.get("seed") is not None:
        own["image_seed"] = params["seed"] + index
    return {**params, **own}


def write_singles(images: list, out: str | Path, *, labels: list[str], params: dict, start: int = 0) -> list[Path]:
    """Each image at `<stem>-<start + i>.png` beside `out`, written atomically with `single_params`
    as JSON in the PNG text chunk "unclip"."""
    from PIL.PngImagePlugin import PngInfo

    from unclip.io import save_image_atomic

    out, paths = Path(out), []
    for i, (image, label) in enumerate(zip(images, labels), start=start):
        info = PngInfo()
        info.add_text("unclip", json.dumps(single_params(params, i, label), ensure_ascii=False))
        paths.append(save_image_atomic(out.with_name(f"{out.stem}-{i}.png"), image, pnginfo=info))
    return paths


def recorded_params(path: str | Path) -> dict | None:
    """The settings an image unclip wrote records (its PNG text chunk "unclip"); None for a file
    that is not one (another program's PNG, not a PNG at all, unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            recorded = json.loads(image.text["unclip"])
    except (OSError, ValueError, KeyError, AttributeError):  # AttributeError: not a PNG, so no .text
        return None
    return recorded if isinstance(recorded, dict) else None


def resume_singles(out: str | Path, params: dict, labels: list[str]) -> tuple[set[int], list[Path], list[str]]:
    """What an earlier run left beside `out`, for a run of `params` (image i labelled `labels[i]`):
    the indices of the images a stopped run of exactly these settings wrote (`<stem>-<i>.png`
    recording `single_params(params, i, labels[i])`), kept rather than drawn again; and, when some
    image there records other settings, every image unclip wrote there (to remove before this run
    writes its first, so that the folder never holds two runs' images, also when this run is
    stopped in turn) with the settings that differ. Files unclip did not write are left alone, and
    nothing is removed here: a run that fails before drawing loses no earlier image.
    """
    out = Path(out)
    name = re.compile(rf"{re.escape(out.stem)}-(0|[1-9][0-9]*)\.png")
    found: dict[int, Path] = {}
    with contextlib.suppress(FileNotFoundError):  # no folder yet: nothing to keep
        for entry in os.scandir(out.parent):
            if match := name.fullmatch(entry.name):
                found[int(match[1])] = out.parent / entry.name
    records = {i: record for i, path in found.items() if (record := recorded_params(path)) is not None}
    run = json.loads(json.dumps(params))  # as a PNG reads it back: tuples are lists
    others = sorted({k for record in records.values() for k in {*record, *run} - set(OWN_KEYS)
                     if record.get(k) != run.get(k)})
    if others:
        return set(), [found[i] for i in sorted(records)], others
    kept = {i for i, record in records.items()
            if i < len(labels) and record == json.loads(json.dumps(single_params(params, i, labels[i])))}
    return kept, [], []


def read_single(out: str | Path, index: int):
    """Image `index` written beside `out` (`write_singles`), as a PIL image."""
    from PIL import Image

    out = Path(out)
    with Image.open(out.with_name(f"{out.stem}-{index}.png")) as image:
        image.load()
        return image.copy()


def remove_stale_singles(out: str | Path, count: int) -> list[Path]:
    """Delete `<stem>-<count>.png`, `<stem>-<count + 1>.png`, ... left beside `out` by an earlier run
    that wrote more images: only unclip's own (they record their settings, `recorded_params`), and
    only while they follow on, so a folder never mixes two runs' images under one grid."""
    out, removed = Path(out), []
    for i in itertools.count(count):
        path = out.with_name(f"{out.stem}-{i}.png")
        if recorded_params(path) is None:
            break
        path.unlink()
        removed.append(path)
    return removed


def grid_rows(count: int, *, spread: bool = False) -> list[int]:
    """Which of `count` images a grid shows: the first GRID_MAX, or with `spread` (the frames of an
    interpolation) GRID_MAX spread evenly from the first to the last."""
    if count <= GRID_MAX or not spread:
        return list(range(min(count, GRID_MAX)))
    return [round(i * (count - 1) / (GRID_MAX - 1)) for i in range(GRID_MAX)]


def write_grid(images: list, out: str | Path, *, labels: list[str], params: dict, columns: int = 4,
               spread: bool = False) -> Path:
    """The captioned grid of the images `grid_rows` picks at `out`, atomically, `params` in its text chunk."""
    from PIL.PngImagePlugin import PngInfo

    from unclip.data.preview import captioned_grid
    from unclip.io import save_image_atomic
    from unclip.tokenizer import has_thai

    rows = grid_rows(len(images), spread=spread)
    images, labels = [images[i] for i in rows], [labels[i] for i in rows]
    grid = captioned_grid(images, [[("th" if has_thai(label) else "en", label)] for label in labels],
                          columns=min(columns, len(images)))
    info = PngInfo()
    info.add_text("unclip", json.dumps(params, ensure_ascii=False))
    return save_image_atomic(out, grid, pnginfo=info)


def write_outputs(images: list, out: str | Path, *, labels: list[str], params: dict, columns: int = 4,
                  spread: bool = False) -> list[Path]:
    """The grid at `out` and each image beside it (`write_singles`, `write_grid`); the singles' paths.

    An earlier grid at `out` goes first: a run killed while writing its singles leaves no grid over
    two runs' images."""
    Path(out).unlink(missing_ok=True)
    paths = write_singles(images, out, labels=labels, params=params)
    write_grid(images, out, labels=labels, params=params, columns=columns, spread=spread)
    remove_stale_singles(out, len(paths))
    return paths


def add_sampling_arguments(parser) -> None:
    """--precision and the upsampler's sampling, for every verb that samples (generate, the edits,
    eval, serve); `configure_sampling` applies them to a loaded pipeline."""
    from unclip.pipeline import DEFAULT_PRECISION, PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS,
                        help="what the decoder and upsampler compute in while sampling; auto picks bfloat16 "
                             "where the CPU (AVX-512-BF16, AMX) or GPU has bf16 units, else float32 "
                             f"(default: {DEFAULT_PRECISION}; docs/performance.md)")
    parser.add_argument("--upsampler-steps", type=positive_int, nargs="+", metavar="STEPS",
                        help="upsampler sampling steps: one for every stage, or one per stage "
                             "(default: the model's config)")
    parser.add_argument("--upsampler-sampler", choices=["ddpm", "ddim", "dpmsolver++"], nargs="+",
                        metavar="SAMPLER", help="upsampler sampler (ddpm, ddim or dpmsolver++): one for every stage, "
                                                "or one per stage (default: the model's config)")
    parser.add_argument("--upsampler-start", type=noise_level, nargs="+", metavar="LEVEL",
                        help="noise level the upsampler starts from, a fraction of its schedule: 1 is pure noise, "
                             "lower starts from the noised bicubic upsampling and needs fewer steps; one for every "
                             "stage, or one per stage (default: the model's config)")


def configure_sampling(pipe, args: argparse.Namespace):
    """The pipeline with the upsampler options of `add_sampling_arguments` applied."""
    pipe.set_upsampler_sampling(sampler=args.upsampler_sampler, steps=args.upsampler_steps,
                                start=args.upsampler_start)
    return pipe


def _load(args: argparse.Namespace):
    import unclip

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return configure_sampling(unclip.load(args.model, device=args.device, precision=args.precision), args)


def grid_path(verb: str):
    """An argparse type for --out: a .png path as given; a folder (existing, ending in "/", or with no
    suffix) gets `<verb>.png` inside; any other suffix is an error before anything is generated."""

    def parse(value: str) -> str:
        path = Path(value)
        if value.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
            path = path / f"{verb}.png"
        elif path.suffix.lower() != ".png":
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a .png path: the grid and its images are PNGs that carry their settings; "
                f"give e.g. out/{verb}.png, or a folder")
        try:
            check_output_dir(path.parent)  # before the model loads and the images are drawn
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return str(path)

    return parse


def _common(parser: argparse.ArgumentParser, verb: str, *, seed: int | None = 0, decodes: bool = True) -> None:
    """The options every sampling verb shares; `decodes=False` (upscale) leaves out the decoder's."""
    parser.add_argument("--model", help="model directory (from `unclip assemble` or `unclip train all`; "
                                        "default: the shipped shapes-world model, docs/model_card.md)")
    parser.add_argument("--out", default=f"out/{verb}.png", type=grid_path(verb),
                        help=f"grid PNG, or a folder to put {verb}.png in; each image goes beside the grid as "
                             f"<name>-<i>.png (default: out/{verb}.png)")
    parser.add_argument("--seed", type=seed_number, default=seed, help=f"random seed (default: {seed})")
    if decodes:
        parser.add_argument("--steps", type=positive_int, help="decoder sampling steps (default: the model's config)")
    parser.add_argument("--size", type=int, help=("image side: the decoder's or an upsampler's output, where the "
                                                  "cascade stops" if decodes else "output side: one of the "
                                                  "upsamplers'") + " (default: the largest)")
    if decodes:
        parser.add_argument("--guidance-scale", type=guidance,
                            help="decoder classifier-free guidance (default: the model's)")
    parser.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    add_sampling_arguments(parser)
    parser.add_argument("--threads", type=threads, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _params(args: argparse.Namespace, verb: str, extra: dict, pipe) -> dict:
    """What every PNG of a verb's run carries in its text chunk: the settings as used, the model's
    own defaults filled in where the command line left them out."""
    decoder = pipe.config.decoder
    return {"verb": verb, "model": str(pipe.directory or args.model), "seed": args.seed,
            "steps": args.steps or decoder.sample_steps,
            "guidance_scale": decoder.guidance_scale if args.guidance_scale is None else args.guidance_scale,
            "size": args.size or pipe.resolution, **_cascade_params(pipe), **extra}


def _cascade_params(pipe) -> dict:
    """What the PNGs of every sampling verb record of `add_sampling_arguments`' options, as applied:
    the precision and each upsampler's sampler, steps and starting noise level."""
    return {"precision": pipe.precision,
            "upsamplers": [{"sampler": u.config.sampler, "steps": u.config.sample_steps, "start": u.config.sample_start}
                           for u in pipe.upsamplers]}


def _said(args: argparse.Namespace, count: int, *, spread: bool = False) -> None:
    which = f"{GRID_MAX} from the first to the last" if spread else f"the first {GRID_MAX}"
    more = f" (the grid shows {which})" if count > GRID_MAX else ""
    out = Path(args.out)
    singles = f"{out.parent}/{out.stem}-0.png" + (f" … {out.stem}-{count - 1}.png" if count > 1 else "")
    print(f"{count} image(s): grid {args.out}{more}, images {singles}")


def _finish(args: argparse.Namespace, pipe, verb: str, images: list, labels: list[str], extra: dict, *,
            spread: bool = False) -> int:
    write_outputs(images, args.out, labels=labels, params=_params(args, verb, extra, pipe), spread=spread)
    _said(args, len(images), spread=spread)
    return 0


def model_digest(model: Path) -> str:
    """The sha256 of a model's manifest (which records every file's), or of a diffusers directory's
    model_index.json when it has no manifest (a Karlo download: eval crashed on the missing file)."""
    import hashlib

    index = next((model / name for name in ("unclip.json", "model_index.json") if (model / name).is_file()), None)
    return hashlib.sha256(index.read_bytes()).hexdigest() if index else "none"


def _generate(args: argparse.Namespace) -> int:
    """Sample BATCH images at a time, writing each batch before the next: image i has seed `--seed` + i
    whatever the batching (`unclip.pipeline.checks.generators`), so the files match one big call's. A batch
    whose images an earlier, stopped run of the same settings wrote is read back, not drawn again
    (`resume_singles`); a batch it left part-written is drawn whole, as it was, so every file is the
    one an unstopped run writes."""
    import torch

    import unclip
    from unclip.pipeline.checks import prompt_list

    prompt_list(args.prompts)  # an empty prompt is refused before the model loads
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    pipe.encode_text(args.prompts)  # words the model never saw are warned about before any image is drawn
    rows = [p for p in args.prompts for _ in range(args.n)]
    decoder = pipe.config.decoder
    model = Path(pipe.directory or args.model)
    params = _params(args, "generate", {
        "prompts": args.prompts, "n": args.n, "prior": args.prior or pipe.priors[0],
        "prior_guidance_scale": pipe.config.prior.guidance_scale if args.prior_guidance_scale is None
        else args.prior_guidance_scale, "sampler": args.sampler or decoder.sampler,
        "candidates": args.candidates or decoder.candidates,
        "upsampled_candidates": args.upsampled_candidates or decoder.upsampled_candidates,
        # what else decides the pixels, so that a resumed run keeps only images these would draw
        "model_manifest_sha256": model_digest(model), "device": str(pipe.device), "batch": BATCH,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "unclip": unclip.__version__}, pipe)
    shown = []
    finished = Path(args.out).is_file()  # the grid is written last: that run ended, and this one draws anew
    Path(args.out).unlink(missing_ok=True)  # no grid over two runs' images while the singles are written
    kept, stale, others = resume_singles(args.out, params, rows)
    if finished:
        kept = set()
    elif kept and not args.quiet:
        print(f"resuming: {len(kept)} of {len(rows)} image(s) were drawn by an earlier, stopped run of these "
              "settings", file=sys.stderr)
    for start in range(0, len(rows), BATCH):
        piece = range(start, min(start + BATCH, len(rows)))
        if all(i in kept for i in piece):
            shown += [read_single(args.out, i) for i in piece[:max(0, GRID_MAX - len(shown))]]
            continue
        if len(rows) > BATCH and not args.quiet:
            print(f"images {start + 1}–{min(start + BATCH, len(rows))} of {len(rows)}", file=sys.stderr)
        seed = None if args.seed is None else args.seed + start
        images = pipe.generate(rows[start:start + BATCH], n=1, prior=args.prior,
                               prior_guidance_scale=args.prior_guidance_scale, guidance_scale=args.guidance_scale,
                               steps=args.steps, sampler=args.sampler, seed=seed, callback=bars, size=args.size,
                               candidates=args.candidates, upsampled_candidates=args.upsampled_candidates)
        if stale:  # an earlier run's images, other settings: gone once this run has drawn, before it writes
            for path in stale:
                path.unlink(missing_ok=True)
            print(f"{Path(args.out).parent / Path(args.out).stem}-*.png: removed {len(stale)} image(s) of an earlier "
                  f"run with other settings ({', '.join(others[:4])}), so that the folder holds this run's alone; to "
                  "keep a run's images, give each run its own --out", file=sys.stderr)
            stale = []
        write_singles(images, args.out, labels=rows[start:start + BATCH], params=params, start=start)
        shown += images[:GRID_MAX - len(shown)]
    bars.close()
    write_grid(shown, args.out, labels=rows, params=params)
    remove_stale_singles(args.out, len(rows))
    _said(args, len(rows))
    return 0


def _vary(args: argparse.Namespace) -> int:
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    images = pipe.variations(args.image, n=args.n, eta=args.eta, steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=args.seed, callback=bars, size=args.size)
    bars.close()
    return _finish(args, pipe, "vary", images, [f"variation {i + 1} (η {args.eta})" for i in range(args.n)],
                   {"image": args.image, "eta": args.eta})


def _interpolate(args: argparse.Namespace) -> int:
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    images = pipe.interpolate(args.image_a, args.image_b, n=args.n, mode=args.mode, steps=args.steps,
                              guidance_scale=args.guidance_scale, seed=args.seed, callback=bars, size=args.size)
    bars.close()
    labels = [f"t = {i / (args.n - 1):.2f}" for i in range(args.n)]
    return _finish(args, pipe, "interpolate", images, labels, {"images": [args.image_a, args.image_b], "mode": args.mode},
                   spread=True)  # a grid of more than GRID_MAX frames still ends at image B


def _textdiff(args: argparse.Namespace) -> int:
    from unclip.pipeline.checks import text_diff_captions

    text_diff_captions(args.caption, args.target)  # before the model loads
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    images = pipe.text_diff(args.image, args.caption, args.target, thetas=args.thetas, steps=args.steps,
                            guidance_scale=args.guidance_scale, seed=args.seed, callback=bars, size=args.size)
    bars.close()
    return _finish(args, pipe, "textdiff", images, [f"θ = {t:g}" for t in args.thetas],
                   {"image": args.image, "caption": args.caption, "target": args.target, "thetas": args.thetas})


def _inpaint(args: argparse.Namespace) -> int:
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    images = pipe.inpaint(args.image, args.mask, args.prompt, n=args.n, resample=args.resample, steps=args.steps,
                          guidance_scale=args.guidance_scale, seed=args.seed, callback=bars, size=args.size)
    bars.close()
    label = args.prompt or "(the image's own z_i)"
    return _finish(args, pipe, "inpaint", images, [label] * args.n,
                   {"image": args.image, "mask": args.mask, "prompt": args.prompt, "resample": args.resample})


def _probe(args: argparse.Namespace) -> int:
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    images = pipe.pca_probe(args.image, dims=args.dims, steps=args.steps, guidance_scale=args.guidance_scale,
                            seed=args.seed, callback=bars, size=args.size)
    bars.close()
    dims = pipe.probe_dims(args.dims)
    return _finish(args, pipe, "probe", images, [f"k = {k}" for k in dims], {"image": args.image, "dims": dims})


def _upscale(args: argparse.Namespace) -> int:
    pipe, bars = _load(args), ProgressBars(not args.quiet)
    images = pipe.upscale(args.image, size=args.size, n=args.n, seed=args.seed, callback=bars)
    bars.close()
    side = images[0].width
    write_outputs(images, args.out, labels=[f"{side}×{side}, draw {i + 1}" for i in range(args.n)],
                  params={"verb": "upscale", "model": str(pipe.directory or args.model), "seed": args.seed,
                          "size": side, "image": args.image, "n": args.n, **_cascade_params(pipe)})
    _said(args, len(images))
    return 0


def _assemble(args: argparse.Namespace) -> int:
    import shutil

    from unclip.modeldir import half_model_dir, temp_dir_beside
    from unclip.pipeline.assemble import assemble

    stages = dict(decoder=args.decoder, prior=args.prior, ar_prior=args.ar_prior, upsamplers=tuple(args.upsampler or ()),
                  clip=args.clip, ranker=args.ranker)
    if args.half:
        target = Path(args.out)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(target)  # what a killed run leaves there, the next save of OUT removes
        try:
            out = half_model_dir(assemble(tmp / "fp32", **stages), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        out = assemble(args.out, **stages)
    print(f"model: {out}")
    print(f'try: unclip generate "a red circle above a blue square" --model {out}')
    return 0


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help=VERB_HELP["generate"], description=(
        "Generate images from captions (English or Thai): the prior turns each caption into a CLIP image "
        "embedding, the decoder paints it at low resolution guided by the embedding and the caption, and the "
        "upsamplers enlarge it. Stopped part-way, the same command resumes: the images it wrote (each PNG records "
        "its settings) are kept and the rest drawn, the same as an unstopped run's; a finished run (its grid is "
        "there) is drawn anew. unclip's images of a run with other settings at --out are removed once the first new "
        "images are drawn, so that a folder never mixes two runs: to keep them, give each run its own --out."))
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more captions")
    gen.add_argument("-n", type=int_range(1, MAX_IMAGES, " (for more, run again with another --seed)"), default=4,
                     help="images per prompt (default: 4)")
    gen.add_argument("--prior", choices=["diffusion", "ar", "caption", "none"],
                     help="which prior (default: diffusion when present); the ablations: caption (z_t as z_i), "
                          "none (the decoder's null z_i: the caption alone)")
    gen.add_argument("--prior-guidance-scale", type=guidance,
                     help="prior classifier-free guidance (default: the model's)")
    gen.add_argument("--sampler", choices=["ddim", "ddpm", "dpmsolver++"], help="decoder sampler (default: the model's)")
    gen.add_argument("--candidates", type=positive_int, help="draw this many images per image and keep the one CLIP finds "
                     "closest to the caption (default: the model's; each candidate costs a prior and a decoder run)")
    gen.add_argument("--upsampled-candidates", type=positive_int, help="upsample this many of the candidates, the "
                     "closest at the decoder's size, and compare them again at the final size, where CLIP reads them "
                     "better (default: the model's; 1 upsamples only the kept one; each costs an upsampling)")
    _common(gen, "generate")
    gen.set_defaults(func=_generate)

    vary = subparsers.add_parser("vary", help=VERB_HELP["vary"], description=(
        "Encode the image to its bipartite latent (CLIP z_i and the decoder's x_T by DDIM inversion) and decode "
        "it with DDIM η > 0: the content CLIP sees stays, the rest varies. η = 0 reconstructs the image."))
    vary.add_argument("image", help="a square image file")
    vary.add_argument("-n", type=int_range(1, MAX_IMAGES), default=4, help="number of variations (default: 4)")
    vary.add_argument("--eta", type=eta, default=0.8, help="DDIM η: 0 reconstructs, 1 varies most (default: 0.8)")
    _common(vary, "vary")
    vary.set_defaults(func=_vary)

    inter = subparsers.add_parser("interpolate", help=VERB_HELP["interpolate"], description=(
        "Slerp between the CLIP image embeddings of two images and decode each step, with one fixed starting "
        "noise (--mode fixed) or with the two images' DDIM-inverted noises slerped too (--mode inverted, "
        "so the ends reconstruct the images)."))
    inter.add_argument("image_a", help="first square image file")
    inter.add_argument("image_b", help="second square image file")
    inter.add_argument("-n", type=int_range(2, 1000, " (the two images are frames too)"), default=6,
                       help="number of frames, ends included (default: 6)")
    inter.add_argument("--mode", choices=["fixed", "inverted"], default="fixed", help="x_T handling (default: fixed)")
    _common(inter, "interpolate")
    inter.set_defaults(func=_interpolate)

    diff = subparsers.add_parser("textdiff", help=VERB_HELP["textdiff"], description=(
        "Rotate the image's CLIP embedding toward the text diff norm(z_t(target) − z_t(caption)) by each θ and "
        "decode it with the image's inverted noise, so the image changes toward the target and keeps the rest."))
    diff.add_argument("image", help="a square image file")
    diff.add_argument("caption", help="what the image shows now, e.g. \"a red circle\"")
    diff.add_argument("target", help="what it should show, e.g. \"a blue circle\"")
    diff.add_argument("--thetas", type=angle, nargs="+", default=[0.0, 0.15, 0.3, 0.45, 0.6, 0.75],
                      help="rotation fractions in [0, 1] (default: 0 0.15 … 0.75; the paper shows up to 0.5, the "
                           "shipped model changes a colour between 0.5 and 0.75)")
    _common(diff, "textdiff")
    diff.set_defaults(func=_textdiff)

    paint = subparsers.add_parser("inpaint", help=VERB_HELP["inpaint"], description=(
        "Keep the image where the mask is black (or opaque) and paint the white (or transparent) region, "
        "following the prompt if given, by RePaint resampling in the decoder."))
    paint.add_argument("image", help="a square image file")
    paint.add_argument("mask", help="a square mask image: white = repaint (in one with transparency: fully "
                                    "transparent = repaint)")
    paint.add_argument("--prompt", help="the whole picture as it should be, kept part included (\"a red square above "
                                        "a green star\"): the prompt becomes one z_i for the whole image (default: "
                                        "follow the image's own CLIP embedding; docs/pipeline.md)")
    paint.add_argument("-n", type=int_range(1, MAX_IMAGES), default=4, help="number of results (default: 4)")
    paint.add_argument("--resample", type=positive_int, default=5, help="RePaint resamplings per step (default: 5)")
    _common(paint, "inpaint", seed=0)
    paint.set_defaults(func=_inpaint)

    probe = subparsers.add_parser("probe", help=VERB_HELP["probe"], description=(
        "Project the image's CLIP embedding onto its first k principal components (the AR prior's PCA) and "
        "decode each with the same noise: what the leading dimensions of the latent space carry."))
    probe.add_argument("image", help="a square image file")
    probe.add_argument("--dims", type=positive_int, nargs="+", help="values of k (default: 1 2 4 8, half, all)")
    _common(probe, "probe")
    probe.set_defaults(func=_probe)

    up = subparsers.add_parser("upscale", help=VERB_HELP["upscale"], description=(
        "Enlarge a square image with the model's ×4 upsamplers alone (no caption, no CLIP embedding): it enters "
        "the cascade at the largest upsampler input side not above its own, and goes through each stage up to "
        "--size. The upsamplers learnt from the model's training images, so they sharpen images like those."))
    up.add_argument("image", help="a square image file")
    up.add_argument("-n", type=int_range(1, MAX_IMAGES), default=1, help="number of draws (default: 1)")
    _common(up, "upscale", decodes=False)
    up.set_defaults(func=_upscale)

    asm = subparsers.add_parser("assemble", help="put trained stages together into one model directory",
                                description="Check that the stages were trained against the same CLIP and write "
                                            "one model directory (diffusers unCLIP layout + unclip.json).")
    asm.add_argument("--decoder", required=True, help="decoder directory (`unclip train decoder`); brings the CLIP")
    asm.add_argument("--prior", help="diffusion prior directory (`unclip train prior --kind diffusion`)")
    asm.add_argument("--ar-prior", help="AR prior directory (`unclip train prior --kind ar`)")
    asm.add_argument("--upsampler", action="append", help="upsampler directory; repeat for stage 1, then stage 2")
    asm.add_argument("--clip", help="carry this CLIP instead of the decoder's: one fine-tuned from it with its image "
                                    "tower frozen (`unclip train clip --init ... --set clip.train_towers=text`), so the "
                                    "decoder's z_i are unchanged; the priors must be trained against it")
    asm.add_argument("--ranker", help="carry this CLIP's text tower (a fine-tune of the same kind as --clip takes, or "
                                      "a model's ranking tower) to rank the diffusion prior's best-of samples and the "
                                      "decoder's candidates; the stages keep reading their own text tower "
                                      "(docs/pipeline.md, \"Ranking tower\")")
    asm.add_argument("--out", required=True, help="model directory to write")
    asm.add_argument("--half", action="store_true",
                     help="store the weights as float16 (half the size; loading casts them back to float32)")
    asm.set_defaults(func=_assemble)
