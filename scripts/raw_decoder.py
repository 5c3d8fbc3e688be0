"""A decoder model directory with a run's raw (not averaged) weights, beside the EMA one it wrote.

    python scripts/raw_decoder.py RUN_DIR OUT

RUN_DIR is a decoder run (`unclip train decoder --run-dir RUN_DIR`): its model/ holds the EMA
weights the trainer saves, its checkpoint.pt the raw ones of the same step. OUT gets the raw ones
in the same layout (same CLIP, config and provenance, marked `weights: raw`), to be halved and
assembled like the EMA one (scripts/continue_default_gpu.sh does it with RAW=1) and judged against
it: with a fixed EMA decay of 0.999, a run of ~2,000 steps saves weights whose centre lies ~1,000
steps before its end. Measured once (version 4, 1,873 steps at a cosine learning rate that ends at
0): the raw weights judged 0.802 on the three binding tasks, the EMA's 0.755 (docs/model_card.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the decoder's run directory (model/ and checkpoint.pt)")
    parser.add_argument("out", help="the model directory to write")
    args = parser.parse_args(argv)

    import torch

    from unclip.clip.stage import load_clip
    from unclip.config import UnclipConfig
    from unclip.decoder.stage import load_decoder, save_decoder
    from unclip.modeldir import load_checkpoint, read_manifest

    model_dir, run = Path(args.run_dir) / "model", Path(args.run_dir)
    manifest = read_manifest(model_dir)
    state = load_checkpoint(run / "checkpoint.pt")
    if state.get("stage") != "decoder":
        raise SystemExit(f"{run / 'checkpoint.pt'} is a checkpoint of {state.get('stage')!r}, not of the decoder")
    step = manifest.provenance["decoder"].get("steps")
    if state["step"] != step:
        raise SystemExit(f"{run / 'checkpoint.pt'} is of step {state['step']}, its model/ of step {step}: "
                         "they are not the same moment of the run")
    decoder = load_decoder(model_dir)
    decoder.load_state_dict({k: v.float() for k, v in state["model"].items()}, strict=True)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(decoder.state_dict().values(),
                                                               load_decoder(model_dir).state_dict().values()))
    provenance = {**manifest.provenance["decoder"], "weights": f"raw (no EMA), checkpoint step {state['step']}"}
    out = save_decoder(decoder, load_clip(model_dir), args.out, cfg=UnclipConfig.from_dict(manifest.config),
                       clip_dir=model_dir, evaluation={}, provenance=provenance)
    print(f"raw decoder of step {state['step']}: {out} (largest weight difference from the EMA one: {moved:.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
