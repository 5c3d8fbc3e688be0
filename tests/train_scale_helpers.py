"""A tiny stage and the jobs tests/test_train_scale.py runs in other processes.

As a script: `python tests/train_scale_helpers.py JOB OUT [--threads N]`, where JOB is
- `ddp`: under `torchrun --nproc_per_node 2`, train the tiny stage for 6 steps
  (OUT/full) and for 3 of the same 6 (OUT/part), each rank saving its final weights, and 6 steps
  validated every 3 (OUT/val); then embed
  the webdataset shards in OUT/wds into OUT/emb with a stand-in CLIP, the shards shared by rank;
  then a run that rank 1 alone gets a SIGTERM in (OUT/sigterm); then one CLIP loss and gradient
  on each rank's half of `clip_batch()` (OUT/clip/rankR.pt);
- `killsave`: train with a checkpoint writer that stalls half-way through its second checkpoint
  and prints WRITING, for the test to SIGKILL it there;
- `fsdp`: under torchrun with 2 processes, FSDP as configs/accelerate/fsdp.yaml asks for it (see
  `fsdp_on_cpu`): the tiny stage 6 steps (OUT/full), 3 steps (OUT/part) and on to 6 (OUT/part
  again), 3 steps for the test to continue in one process (OUT/to_one), a one-process
  checkpoint at step 3 that the test left in OUT/from_one continued to 6,
  the same in bf16 (OUT/bf16), and EMA refused; each rank writes what it got to OUT/NAME/rankR.pt;
  then `unclip train all` of the tiny preset (EMA off, the decoder in bf16), each stage's blocks
  sharded one by one, the FSDP units it made written to OUT/all/unitsR.txt.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from unclip.config import TrainConfig
from unclip.train.data import shapes_feed
from unclip.train.dist import finish
from unclip.train.trainer import train

SIZE = 8


class TinyStage(nn.Module):
    """Predict a shapes image's mean colour from its pixels; `noise` perturbs the input with the
    global torch RNG, so an inexact RNG restore changes the losses."""

    def __init__(self, *, noise: float = 0.0):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.Tanh(), nn.Linear(16, 3))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        self.noise = noise

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        pred = self.net(x)  # [B, 3]
        target = batch["image"].mean(dim=(2, 3))  # [B, 3]
        return {"loss": ((pred - target) ** 2).mean(), "mae": (pred - target).abs().mean()}


def config(**overrides) -> TrainConfig:
    base = {"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "ema_decay": 0.9, "log_every": 1,
            "ckpt_every": 3}
    return TrainConfig(**{**base, **overrides})


def run(run_dir: str | Path, cfg: TrainConfig, *, noise: float = 0.0, stop_at: int | None = None):
    """Train a fresh TinyStage on shapes world; returns (stage, TrainResult). With `cfg.eval_every`,
    validated on shapes world's val split."""
    from unclip.config import DataConfig
    from unclip.train.data import validation_feed

    stage = TinyStage(noise=noise)
    feed = shapes_feed(size=SIZE, batch_size=cfg.batch_size, lang="en", seed=0, num_workers=cfg.num_workers)
    result = train(stage, feed, cfg=cfg, run_dir=run_dir, run_config={"tiny": repr(cfg), "noise": noise},
                   progress=False, stop_at=stop_at, val_batches=validation_feed(DataConfig(lang="en"), cfg, size=SIZE))
    return stage, result


class StandInClip(nn.Module):
    """What `embed_items` needs of a CLIP: image and caption embeddings of a known form."""

    config = SimpleNamespace(embed_dim=4, image_size=SIZE)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(1, 2, 3))[:, None]], dim=1)  # [B, 4]

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([[len(c), c.count(" "), 0.0, 1.0] for c in captions])  # [B, 4]


def clip_batch() -> dict:
    """A global batch of 8 shapes pairs whose captions 1 and 6 are the same: split over two processes,
    the two copies sit on different ranks and must still be positives of each other."""
    from unclip.data.shapes import ShapesDataset

    items = [ShapesDataset("train", size=16)[i] for i in range(8)]
    captions = [item["caption"] for item in items]
    captions[6] = captions[1]
    return {"image": torch.stack([item["image"] for item in items]), "caption": captions}


def clip_step(batch: dict, *, rank: int = 0, world: int = 1) -> dict:
    """A tiny CLIP's loss on rank `rank`'s share of `batch`, and its gradients averaged over ranks as
    DDP averages them."""
    from unclip.clip.model import ClipModel
    from unclip.config import preset
    from unclip.data.world import sample
    from unclip.tokenizer import Tokenizer

    tokenizer = Tokenizer.train([sample("train", i).caption for i in range(300)], vocab_size=400, context_length=32)
    torch.manual_seed(0)
    model = ClipModel.from_config(preset("tiny").clip, tokenizer=tokenizer)
    local = len(batch["caption"]) // world
    share = slice(rank * local, (rank + 1) * local)
    out = model.training_losses({"image": batch["image"][share], "caption": batch["caption"][share]})
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
            grad /= world
    return {"loss": out["loss"].item(), "acc_i2t": out["acc_i2t"].item(), "grads": grads}


def _ddp(out: Path) -> None:
    from unclip.clip.embed import embed_dataset
    from unclip.train.dist import rank_world

    cfg = config()
    for name, stop_at in (("full", None), ("part", 3)):
        stage, result = run(out / name, cfg, stop_at=stop_at)
        rank, world = rank_world()
        assert world == 2, "run this job under torchrun --nproc_per_node 2"
        torch.save({"state": stage.state_dict(), "step": result.step, "main": result.main_process},
                   out / name / f"rank{rank}.pt")
    run(out / "val", config(eval_every=3, eval_batches=2))  # validation rows in OUT/val/metrics.jsonl
    embed_dataset(StandInClip(), out / "emb", source="webdataset", path=str(out / "wds" / "{000000..000003}.tar"),
                  progress=False)
    rank, world = rank_world()
    _sigterm_to_one_rank(out / "sigterm", rank)
    step = clip_step(clip_batch(), rank=rank, world=world)
    (out / "clip").mkdir(exist_ok=True)
    torch.save(step, out / "clip" / f"rank{rank}.pt")


def _sigterm_to_one_rank(run_dir: Path, rank: int) -> None:
    """Rank 1 alone gets a SIGTERM as it draws its fourth batch (one node of several preempted): each
    rank writes the message it stopped with to RUN_DIR/stoppedR.txt, or that it was not stopped."""
    from unclip.train.trainer import TrainingStopped

    feed = shapes_feed(size=SIZE, batch_size=8, lang="en", seed=0)

    def batches(position: int):
        for i, batch in enumerate(feed(position)):
            if rank == 1 and i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    cfg = config(steps=20, ckpt_every=100)
    try:
        train(TinyStage(), batches, cfg=cfg, run_dir=run_dir, run_config={"tiny": repr(cfg)}, progress=False)
        message = "not stopped"
    except TrainingStopped as e:
        message = str(e)
    (run_dir / f"stopped{rank}.txt").write_text(message)


def _killsave(out: Path) -> None:
    real_save, calls = torch.save, []

    def stalling_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        with open(f, "wb") as handle:  # save_checkpoint passes the temporary file's path
            handle.write(data[: len(data) // 2])
            handle.flush()
            print("WRITING", flush=True)
            time.sleep(120)  # the test kills the process here
        raise SystemExit("not killed")

    torch.save = stalling_save
    run(out, config(ckpt_every=2), noise=0.1)


def fsdp_on_cpu() -> None:
    """Make `accelerate` run FSDP over gloo on the CPU, as `accelerate launch --config_file
    configs/accelerate/fsdp.yaml` runs it over NCCL on GPUs.

    accelerate turns FSDP on only for accelerator devices and keeps "MULTI_CPU" otherwise, while
    torch's FSDP2 (`fully_shard`) itself runs on CPU tensors over gloo. A test-only shim: the
    environment `accelerate launch` derives from the config file's `fsdp_config`, and the FSDP
    distributed type wherever accelerate would have said MULTI_CPU.
    """
    import os

    import yaml
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    config_file = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    for key, value in yaml.safe_load(config_file.read_text())["fsdp_config"].items():
        os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP):
            # AcceleratorState() copies PartialState's fields on every call: set the type in both
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate_state.AcceleratorState.__init__ = init


def _fsdp(out: Path) -> None:
    from unclip.errors import ConfigError
    from unclip.train.dist import rank_world

    fsdp_on_cpu()
    cfg = config(ema_decay=0.0)
    runs = [("full", cfg, None), ("part", cfg, 3), ("part", cfg, None), ("to_one", cfg, 3), ("from_one", cfg, None),
            ("bf16", config(ema_decay=0.0, mixed_precision="bf16"), None)]
    for name, run_cfg, stop_at in runs:
        stage, result = run(out / name, run_cfg, stop_at=stop_at)
        rank, world = rank_world()
        assert world == 2, "run this job under torchrun --nproc_per_node 2"
        torch.save({"state": stage.state_dict(), "step": result.step, "resumed_from": result.resumed_from,
                    "main": result.main_process}, out / name / f"rank{rank}.pt")
    try:
        run(out / "ema", config())
    except ConfigError as e:
        (out / f"ema_refused{rank}.txt").write_text(str(e))
    import torch.distributed.fsdp as fsdp

    from unclip.config import preset
    from unclip.train.all import train_all

    shard, units = fsdp.fully_shard, []

    def recording_shard(module, *args, **kwargs):  # what accelerate makes an FSDP unit
        units.append(type(module).__name__)
        return shard(module, *args, **kwargs)

    fsdp.fully_shard = recording_shard
    stages = ("clip", "prior", "ar_prior", "decoder", "upsamplers.0")
    cfg = preset("tiny").override([f"{stage}.train.ema_decay=0" for stage in stages] +
                                  ["decoder.train.mixed_precision=bf16"])
    train_all(cfg, root=out / "all", out=out / "all" / "model", progress=False, evaluate=False, embed_pairs=64,
              fit_samples=64)
    fsdp.fully_shard = shard
    (out / "all" / f"units{rank}.txt").write_text(" ".join(units))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["ddp", "killsave", "fsdp"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"ddp": _ddp, "killsave": _killsave, "fsdp": _fsdp}[args.job](args.out)
    finish()  # as `unclip`'s main does: without it 1 run in 4 aborted at exit, its work done
    print("JOB DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
