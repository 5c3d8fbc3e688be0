"""How far a fine-tuned CLIP moves z_i, and whether a model's decoder still draws from the moved z_i.

    .venv/bin/python bench/clip_rebase_probe.py NEW_CLIP_DIR [MODEL] [--n 64] [--threads 2]

For --n val renders: the mean cosine between the same image's z_i under MODEL's CLIP (default:
the shipped model) and under NEW_CLIP_DIR's; then MODEL's decoder decodes each render's z_i and
caption states (ancestral DDPM, 25 steps, 32², seed 0), once with each CLIP, and the shipped judge
reads every decode: the fraction whose (colour, shape) objects are the scene's, per scene kind.
The numbers in docs/clip.md ("Binding").
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="model directory of the new CLIP (e.g. from `unclip train clip --init`)")
    parser.add_argument("model", nargs="?", help="model whose CLIP and decoder to compare (default: the shipped)")
    parser.add_argument("--n", type=int, default=64, help="val renders (default: 64)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.clip.stage import load_clip
    from unclip.data.render import render
    from unclip.data.shapes import to_tensor
    from unclip.data.world import canonical_caption, sample
    from unclip.eval.geneval import scene_reading
    from unclip.eval.judge import default_judge_dir, load_judge

    pipe = unclip.load(args.model)
    clips = {"own CLIP": pipe.clip, "new CLIP": load_clip(args.clip).eval()}
    judge, _ = load_judge(default_judge_dir())
    scenes = [sample("val", i, lang="en").scene for i in range(args.n)]
    images = torch.stack([to_tensor(render(s, pipe.clip.config.image_size)) for s in scenes])

    def objects(reading: dict) -> list:
        return sorted((o["colour"], o["shape"]) for o in reading["objects"])

    truth = [objects(scene_reading(s)) for s in scenes]
    with torch.no_grad():
        z = {name: clip.encode_image(images) for name, clip in clips.items()}
        print(f"cos(z_i, z_i) of the same image: {float((z['own CLIP'] * z['new CLIP']).sum(-1).mean()):.3f}")
        for name, clip in clips.items():
            pipe.clip = clip
            text = pipe.encode_text([canonical_caption(s, lang="en") for s in scenes])
            decoded = pipe.decode(z[name], text, sampler="ddpm", steps=25, seed=0, upsample=False)
            readings, _ = judge.read(decoded.clamp(-1, 1).float())
            by_kind = defaultdict(list)
            for scene, reading, want in zip(scenes, readings, truth):
                by_kind[scene.kind].append(objects(reading) == want)
            right = sum(sum(v) for v in by_kind.values())
            print(f"{name}: decodes read as the scene's objects {right / len(scenes):.3f} "
                  + " ".join(f"{kind} {sum(v)}/{len(v)}" for kind, v in by_kind.items()))


if __name__ == "__main__":
    main()
