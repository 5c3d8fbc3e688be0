"""Complete the decoders a lent GPU sent back into whole model directories, here.

    python scripts/unpack_decoders.py PARTS_DIR RUN_DIR [--model MODEL]

`PACK=$OUT scripts/continue_default_gpu.sh RUN_DIR` on the device writes `model.tgz.*` (the EMA
decoder) and `model_raw.tgz.*` (its raw weights, with RAW=1): each model's decoder, text_proj, its
upsampler when one was trained, and its unclip.json, in 16 MB parts, since a device call brings
back 64 MiB at most and two whole models are 88 MB. This joins each set of parts, unpacks it into
RUN_DIR/model (RUN_DIR/model_raw) and copies every other component from MODEL (the shipped model
by default: the one the device continued). The manifest then lists the files as the device wrote
them; MODEL's copies must match it byte for byte, except the CLIP towers' config.json files, which
the device's transformers stamps with its own version (scripts/gpu_wheels.sh): their sha256 are
recorded afresh, and anything else that differs is refused. Each model is checked as
`unclip.load` would (every file against its sha256) before it replaces an earlier one.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

from unclip.errors import ModelFormatError
from unclip.modeldir import (CLIP_COMPONENTS, MANIFEST, RANKER, file_record, read_manifest, remove_abandoned,
                             swap_in, temp_dir_beside, verify_files)
from unclip.pipeline import default_model_dir

STAMPED = tuple(f"{tower}/config.json" for tower in (*CLIP_COMPONENTS, RANKER) if tower != "tokenizer")


def unpack(parts: list[Path], out: Path, model: Path) -> Path:
    """The model directory `out` from one set of parts and `model`'s other components; returns `out`."""
    data = b"".join(part.read_bytes() for part in parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = temp_dir_beside(out)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            archive.extractall(tmp, filter="data")  # refuses absolute paths and links out of tmp
        if not (tmp / MANIFEST).is_file():
            raise ModelFormatError(f"{parts[0].parent}: the parts {parts[0].name}… hold no {MANIFEST}")
        brought = {p.name for p in tmp.iterdir()}
        for component in sorted(p.name for p in model.iterdir() if p.is_dir() and p.name not in brought):
            shutil.copytree(model / component, tmp / component)
        manifest = json.loads((tmp / MANIFEST).read_text(encoding="utf-8"))
        for name, record in manifest["files"].items():
            actual = file_record(tmp / name)
            if actual != record and name.split("/", 1)[0] not in brought:
                if name not in STAMPED:
                    raise ModelFormatError(f"{model / name} is not the file the device's model lists: the device "
                                           f"continued another model than {model}; give it with --model")
                manifest["files"][name] = actual
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        verify_files(tmp, read_manifest(tmp))
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", type=Path, help="the folder holding model.tgz.aa, … (a device call's files_at)")
    parser.add_argument("run", type=Path, help="the run folder to write model/ and model_raw/ into")
    parser.add_argument("--model", type=Path, default=None,
                        help="the model the device continued (default: the shipped one)")
    args = parser.parse_args(argv)
    model = args.model or default_model_dir()
    done = []
    for name in ("model", "model_raw"):
        parts = sorted(args.parts.glob(f"{name}.tgz.*"))
        if parts:
            done.append(unpack(parts, args.run / name, model))
    if not done:
        print(f"{args.parts} holds no model.tgz.* or model_raw.tgz.* parts", file=sys.stderr)
        return 1
    for path in done:
        print(f"model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
