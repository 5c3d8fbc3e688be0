"""`unclip import-diffusers` and `unclip export-diffusers`: models to and from diffusers' unCLIP layout."""

from __future__ import annotations

import argparse
from pathlib import Path



def _square(path: Path):
    """The centre square of an image file, RGB."""
    from PIL import Image

    from unclip.data.shapes import to_rgb

    with Image.open(path) as image:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return to_rgb(image).crop((left, top, left + side, top + side))


def _pca_images(args: argparse.Namespace) -> list | None:
    """Images for the PCA basis: the files of --pca-images, or --pca-shapes shapes-world renders."""
    from unclip.data.folder import IMAGE_SUFFIXES
    from unclip.errors import DataError

    if args.pca_images:
        files = sorted(p for p in Path(args.pca_images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise DataError(f"{args.pca_images} holds {len(files)} image(s); a PCA basis needs at least 2")
        return [_square(p) for p in files]
    if args.pca_shapes:
        from unclip.data.render import render
        from unclip.data.world import sample

        return [render(sample("train", i, lang="en").scene, 64) for i in range(args.pca_shapes)]
    return None


def _import(args: argparse.Namespace) -> int:
    from unclip.pipeline.interop import import_diffusers

    out = import_diffusers(args.source, args.out, image_encoder=args.image_encoder, pca_images=_pca_images(args),
                           pca_variance=args.pca_variance)
    print(f"model: {out}")
    print(f'try: unclip generate "a red circle above a blue square" --model {out}')
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from unclip.pipeline.export import export_diffusers

    out = export_diffusers(args.model, args.out)
    how = json.loads((out / "unclip_export.json").read_text(encoding="utf-8"))["load"]
    print(f"diffusers UnCLIPPipeline: {out}")
    print("load it with: from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline; "
          + how.replace("path", repr(str(out))))
    return 0


def register(subparsers) -> None:
    imp = subparsers.add_parser("import-diffusers", help="use a diffusers unCLIP model (Karlo) as an unclip model",
                                description=(
        "Import a diffusers-layout unCLIP directory (a local copy of kakaobrain/karlo-v1-alpha, or of "
        "karlo-v1-alpha-image-variations) as an unclip model directory: every unclip verb then runs on it. "
        "Weight files are hard-linked where possible. See docs/interop.md."))
    imp.add_argument("source", help="directory holding model_index.json, tokenizer/, text_encoder/, decoder/, ...")
    imp.add_argument("--out", required=True, help="unclip model directory to write")
    imp.add_argument("--image-encoder", help="CLIPVisionModelWithProjection directory for the image tasks, when the "
                                             "source has no image_encoder/ (Karlo: openai/clip-vit-large-patch14)")
    pca = imp.add_mutually_exclusive_group()
    pca.add_argument("--pca-images", help="folder of images whose CLIP embeddings give `unclip probe` its PCA basis")
    pca.add_argument("--pca-shapes", type=int, default=0, help="fit the PCA basis on N shapes-world renders instead "
                                                                "(default: 0; with neither, no basis for `unclip probe`)")
    imp.add_argument("--pca-variance", type=float, default=0.99,
                     help="keep the components explaining this share of variance (default: 0.99)")
    imp.set_defaults(func=_import)

    exp = subparsers.add_parser("export-diffusers", help="write an unclip model for diffusers' UnCLIPPipeline",
                                description=(
        "Export an unclip model directory to the diffusers unCLIP layout that "
        "diffusers.pipelines.deprecated.unclip.UnCLIPPipeline.from_pretrained loads and runs. "
        "See docs/interop.md for what maps exactly and what diffusers' pipeline does differently."))
    exp.add_argument("model", help="unclip model directory (from `unclip assemble` or `unclip train all`)")
    exp.add_argument("--out", required=True, help="directory to write")
    exp.set_defaults(func=_export)
