"""Train the judge on real shapes-world renders and measure its own accuracy on held-out renders.

Training scenes come from the world's own scene sampler (`world.sample_scene`) on the judge's own
seed stream, rendered fresh for every batch (a render costs ~0.1 ms), so the judge never sees an
image twice. A quarter of the scenes hold a held-out colour–shape pair: the judge must recognise a
green star to score the prompt "a green star". That is no leak — the judge is the measuring
instrument, not the model under test, and the generative stages never see those pairs — and its
accuracy is measured on the `test` and `unseen` splits (seed 0), scenes it was never trained on.

Augmentation matches what generated images look like: some scenes are rendered at half the side
and upsampled (a blurry low-resolution image), some get gaussian pixel noise.

Training takes about ten minutes on one CPU thread, so it checkpoints (`train_judge(checkpoint=...)`,
atomically, every `CKPT_EVERY` steps and at the end; a SIGTERM stops it after the step in hand with a
checkpoint, as the stages' trainer does) and a stopped run resumes from its last checkpoint: the
weights, optimizer, schedule and RNG state come back and the scene stream is indexed by step, so the
resumed judge is the one an uninterrupted run trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unclip.data.render import render
from unclip.data.shapes import to_tensor
from unclip.data.world import Scene, cell_of, sample, sample_scene
from unclip.errors import ModelFormatError
from unclip.eval.judge import (CLASS_INDEX, CLASSES, SIZE_NAMES, Judge, JudgeConfig, losses, read_objects,
                               relation_of, resize, scene_targets)
from unclip.precision import training_precision

log = logging.getLogger(__name__)

JUDGE_STREAM = 97  # the judge's scenes: rng [seed, 97, i], disjoint from every split's [seed, split id, i]
ATTRIBUTES = ("objects", "colour_shape", "colour", "shape", "size", "cell", "relation", "count", "scene")
CKPT_EVERY = 200  # optimizer steps between checkpoints: about 30 s of the default run on one CPU thread


@dataclass(frozen=True, kw_only=True)
class JudgeTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    seed: int = 1
    unseen_fraction: float = 0.25  # scenes whose first object is a held-out pair
    lowres_fraction: float = 0.25  # rendered at half the side, then upsampled
    noise_fraction: float = 0.5  # gaussian pixel noise, σ uniform in [0, max_noise]
    max_noise: float = 0.08
    mixed_precision: str = "bf16"  # "bf16" (autocast where the device computes bf16 natively) or "no"


def judge_scene(index: int, *, seed: int, unseen_fraction: float) -> tuple[Scene, np.random.Generator]:
    """Scene `index` of the judge's training stream, and the rng that goes on to draw its augmentation."""
    rng = np.random.default_rng([seed, JUDGE_STREAM, index])
    split = "unseen" if rng.random() < unseen_fraction else "train"
    return sample_scene(rng, split), rng


def training_batch(start: int, cfg: JudgeTrainConfig, judge_cfg: JudgeConfig) -> dict[str, torch.Tensor]:
    """Scenes start .. start + batch_size - 1 of the stream: image [B, 3, S, S] and the targets."""
    side = judge_cfg.image_size
    images, targets = [], []
    for i in range(start, start + cfg.batch_size):
        scene, rng = judge_scene(i, seed=cfg.seed, unseen_fraction=cfg.unseen_fraction)
        if rng.random() < cfg.lowres_fraction:
            image = resize(to_tensor(render(scene, side // 2))[None], side)[0]
        else:
            image = to_tensor(render(scene, side))
        if rng.random() < cfg.noise_fraction:
            sigma = rng.uniform(0, cfg.max_noise)
            noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
            image = (image + sigma * noise).clamp(-1, 1)
        images.append(image)
        targets.append(scene_targets(scene))
    batch = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    return {"image": torch.stack(images), **batch}


def training_checkpoint(out: str | Path) -> Path:
    """Where `unclip eval judge --out OUT` keeps its training checkpoint until the judge is saved:
    `.NAME.training.pt` beside OUT. Not inside it: a folder without the judge's unclip.json is not
    one a judge may replace (`modeldir.check_replaceable`)."""
    out = Path(out)
    return out.parent / f".{out.name}.training.pt"


def train_judge(judge_cfg: JudgeConfig = JudgeConfig(), cfg: JudgeTrainConfig = JudgeTrainConfig(), *,
                progress: bool = True, checkpoint: str | Path | None = None,
                ckpt_every: int | None = None) -> tuple[Judge, dict[str, Any]]:
    """Train a judge from scratch: AdamW, linear warmup then cosine decay, bf16 autocast where the
    device computes bf16 natively (`unclip.precision`).

    With `checkpoint` (a file path), the training state is written there atomically every
    `ckpt_every` steps (default `CKPT_EVERY`) and after the last step, and a run that finds a
    checkpoint of the same settings there resumes from it (one of other settings is replaced).
    A SIGTERM then ends the run after the step in hand with a checkpoint, raising `TrainingStopped`
    (`unclip.train.trainer.StopOnSigterm`; without `checkpoint` it kills the process as usual).
    Returns the judge (eval mode, frozen) and the provenance of the run.
    """
    from tqdm.auto import tqdm

    from unclip.train.trainer import StopOnSigterm

    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = Judge(judge_cfg).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    settings = {"judge": asdict(judge_cfg), "train": asdict(cfg)}
    every = ckpt_every or CKPT_EVERY
    first, earlier_seconds, metrics = 0, 0.0, {}
    state = _resume_state(Path(checkpoint), settings) if checkpoint is not None else None
    if state is not None:
        judge.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        first, earlier_seconds, metrics = state["step"], state["seconds"], state["metrics"]
        log.info("resuming the judge's training from step %d of %d (%s)", first, cfg.steps, checkpoint)
    state = None  # free the loaded copy

    def save(step: int) -> None:
        from unclip.modeldir import save_checkpoint

        save_checkpoint(checkpoint, {
            "kind": "judge training", "settings": settings, "step": step, "model": judge.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
            "metrics": metrics, "seconds": earlier_seconds + time.time() - start})

    autocast = training_precision(cfg.mixed_precision, device, "the judge") == "bf16"
    judge.train()
    start = time.time()
    bar = tqdm(range(first, cfg.steps), desc="train judge", disable=not progress, initial=first, total=cfg.steps)
    sigterm = StopOnSigterm()  # never entered without a checkpoint to write: `received` stays False
    with sigterm if checkpoint is not None else contextlib.nullcontext():
        for step in bar:
            batch = {k: v.to(device) for k, v in training_batch(step * cfg.batch_size, cfg, judge_cfg).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = judge(batch["image"])
            loss = losses(out, batch)
            if not torch.isfinite(loss["loss"]):
                raise FloatingPointError(f"judge loss is {float(loss['loss'])} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss["loss"].backward()
            optimizer.step()
            scheduler.step()
            if step % 50 == 0 or step == cfg.steps - 1:
                metrics = {k: round(float(v.detach()), 5) for k, v in loss.items()}
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                log.debug("judge step %d %s", step, metrics)
            done = step + 1
            if checkpoint is not None and (done % every == 0 or done == cfg.steps or sigterm.received):
                save(done)
            if sigterm.received and done < cfg.steps:
                bar.close()
                raise sigterm.stopped("the judge's training", step=done, of=cfg.steps, checkpoint=checkpoint)
    judge.eval().requires_grad_(False)
    provenance = {
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(earlier_seconds + time.time() - start, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "train": asdict(cfg),
        "autocast": "bf16" if autocast else "no",
        "images_seen": cfg.steps * cfg.batch_size, "final_losses": metrics,
        "data": "shapes-world renders only: world.sample_scene on seed stream [seed, 97, i]",
        **({"resumed_from_step": first} if first else {}),
    }
    return judge.cpu(), provenance


def _resume_state(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The training state a checkpoint at `path` holds for a run of `settings`, or None: no file, or
    one of other settings (said, then replaced by this run's first checkpoint)."""
    from unclip.modeldir import load_checkpoint

    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("kind") != "judge training":
        raise ModelFormatError(f"{path} is not a checkpoint of the judge's training; move it away, or give "
                               "another --out")
    if state["settings"] != settings:
        changed = sorted(f"{part}.{key}" for part in settings for key in settings[part]
                         if state["settings"].get(part, {}).get(key) != settings[part][key])
        log.warning("%s holds the training of a judge with other settings (%s); training this one from the start",
                    path, ", ".join(changed) or "another version")
        return None
    return state


# --- the judge's own accuracy ------------------------------------------------------------------


@torch.no_grad()
def judge_accuracy(judge: Judge, *, splits: tuple[str, ...] = ("test", "unseen"), n: int = 1000, size: int = 64,
                   seed: int = 0, batch_size: int = 100, progress: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy per attribute on the first `n` renders (side `size`) of each held-out split.

    Per image: objects (number of objects), colour_shape (the multiset of (colour, shape) pairs),
    colour and shape (their multisets), size (every object's size, read at its true class), cell
    (one-object scenes: the 3×3 cell of the read centre), relation (two-object scenes, from the
    read centres), count (counting scenes: number of copies), scene (everything at once). Each
    attribute is averaged over the images that have it.
    """
    from tqdm.auto import tqdm

    judge.eval()
    result: dict[str, dict[str, float]] = {}
    for split in splits:
        hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
        scenes = [sample(split, i, seed=seed, lang="en").scene for i in range(n)]
        for start in tqdm(range(0, n, batch_size), desc=f"judge accuracy ({split})", disable=not progress):
            chunk = scenes[start:start + batch_size]
            out = judge(torch.stack([to_tensor(render(s, size)) for s in chunk]))
            for b, scene in enumerate(chunk):
                for attribute, ok in _check(scene, {k: v[b] for k, v in out.items()}).items():
                    hits[attribute].append(ok)
        result[split] = {a: round(sum(h) / len(h), 4) for a, h in hits.items() if h}
        result[split]["n"] = n
        result[split]["support"] = {a: len(h) for a, h in hits.items()}  # renders each accuracy rests on
    return result


def _check(scene: Scene, out: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Which attributes the judge read right for one scene (outputs of one image, no batch axis)."""
    counts, read_centres = read_objects(out["density"])  # [72], [72, 2]
    truth = scene_targets(scene)["count"]
    read_pairs = sorted((k, int(c)) for k, c in enumerate(counts.tolist()) if c)
    true_pairs = sorted((k, int(c)) for k, c in enumerate(truth.tolist()) if c)

    def multiset(pairs, part):
        return sorted(CLASSES[k][part] for k, c in pairs for _ in range(c))

    ok = {
        "objects": int(counts.sum()) == len(scene.objects),
        "colour_shape": read_pairs == true_pairs,
        "colour": multiset(read_pairs, 0) == multiset(true_pairs, 0),
        "shape": multiset(read_pairs, 1) == multiset(true_pairs, 1),
        "size": all(SIZE_NAMES[int(out["size"][CLASS_INDEX[(o.colour, o.shape)]].argmax())] == o.size
                    for o in scene.objects),
    }
    centres = torch.where(counts[:, None] > 0, read_centres, out["centre"])  # a class not read: its map's centre
    centre = {k: {"cx": float(centres[k, 0]), "cy": float(centres[k, 1])} for k, _ in true_pairs}
    if scene.kind == "single":
        obj = scene.objects[0]
        c = centre[CLASS_INDEX[(obj.colour, obj.shape)]]
        ok["cell"] = cell_of(c["cx"], c["cy"]) == obj.position
    elif scene.kind == "pair":
        a, b = (centre[CLASS_INDEX[(o.colour, o.shape)]] for o in scene.objects)
        ok["relation"] = relation_of(a, b) == scene.relation
    else:
        ok["count"] = int(counts.sum()) == scene.count
    ok["scene"] = all(ok.values())
    return ok


MIN_SUPPORT = 100  # renders (all held-out splits together) below which an attribute's 0.99 is not claimed


def thin(accuracy: dict[str, dict]) -> list[str]:
    """Attributes measured on fewer than MIN_SUPPORT renders (none at all included), in ATTRIBUTES order;
    a judge recorded before supports were kept counts its `n` per split."""
    def support(split: dict, attribute: str) -> int:
        return split.get("support", {}).get(attribute, split.get("n", 0) if attribute in split else 0)

    return [a for a in ATTRIBUTES if sum(support(s, a) for s in accuracy.values()) < MIN_SUPPORT]


def minimum(accuracy: dict[str, dict[str, float]]) -> dict[str, float]:
    """The worst split's accuracy per attribute."""
    splits = list(accuracy.values())
    return {a: min(s[a] for s in splits if a in s) for a in ATTRIBUTES if any(a in s for s in splits)}
