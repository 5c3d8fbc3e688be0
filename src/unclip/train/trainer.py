"""One trainer for every stage.

A stage is an `nn.Module` whose `forward(batch)` returns `training_losses(batch)`: a dict with a
scalar "loss" and any other scalars to log. The trainer owns everything else: AdamW with
warmup + cosine, `accelerate` (one process by default, bf16 autocast on CPU or GPU), gradient
accumulation and clipping, EMA, a progress bar, a JSONL metrics file, atomic checkpoints every
`ckpt_every` steps and at the end, and resume from the last checkpoint (model, optimizer,
scheduler, EMA, step, RNG states and data position). A loss that turns NaN or Inf stops the run
with the last good checkpoint untouched.

Data comes from `make_batches(start)`, which returns an endless iterator of batches beginning at
sample number `start`; resuming at step k asks for `start = k * batch_size * grad_accum`. Batches
may live on the CPU: the trainer moves their tensors to the training device (a GPU when there is
one), and hands the stage back on the CPU.

A run can be given a wall-clock budget (`time_budget`, seconds; `--minutes` on the CLI): the
trainer measures its own speed and shortens the run so that warmup + cosine end inside the
budget, re-measuring as it goes (other jobs on the same GPU change the speed). The schedule then
ends at the fitted step count, recorded as `planned_steps` in the metrics.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unclip.config import TrainConfig
from unclip.errors import UnclipError
from unclip.io import atomic_write
from unclip.modeldir import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingError(UnclipError):
    """Training cannot go on (a non-finite loss, a checkpoint from another config)."""


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, *, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        state = module.state_dict()
        keys = [k for k in self.shadow if k in state]
        # one fused call instead of a kernel per tensor: it matters on a GPU
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach() for k in keys], 1.0 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({**module.state_dict(), **self.shadow})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a shadow (from a checkpoint, on the CPU) onto the device the module's shadow is on."""
        self.shadow = {k: v.to(self.shadow[k].device if k in self.shadow else v.device, copy=True)
                       for k, v in state.items()}


def lr_factor(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """Linear warmup to 1, then constant or cosine decay to 0 at `total` (default `cfg.steps`)."""
    total = cfg.steps if total is None else total
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms, embeddings' scalars and temperatures are not decayed."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_device() -> torch.device:
    """Where a one-process run trains: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (captions and other values untouched)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit_steps(*, done: int, limit: int, seconds_per_step: float, seconds_left: float) -> int:
    """The step count a budgeted run ends at: what the time left allows at the measured speed,
    never more than the configured `limit` nor fewer than the steps already `done`."""
    return max(done, min(limit, done + int(seconds_left / max(seconds_per_step, 1e-9))))


@dataclass
class TrainResult:
    """What a finished run leaves: the step reached and the last logged metrics."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    seconds: float = 0.0


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (logged after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with atomic_write(path, "w") as handle:
        handle.writelines(line + "\n" for line in kept)


def train(stage: nn.Module, make_batches: Callable[[int], Iterator[dict]], *, cfg: TrainConfig,
          run_dir: str | Path, run_config: dict[str, Any], resume: bool = True, progress: bool = True,
          stage_name: str = "stage", time_budget: float | None = None) -> TrainResult:
    """Train `stage` for `cfg.steps` optimizer steps, checkpointing into `run_dir`.

    `run_config` (the full UnclipConfig as a dict) is stored in every checkpoint; resuming a run
    whose checkpoint holds a different config is an error rather than a silent mix. At the end
    the stage holds the EMA weights when EMA is on, and is on the CPU. `time_budget` (seconds
    of this call) fits the schedule's length to the time, see the module docstring.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    stage.to(accelerator.device)
    optimizer = torch.optim.AdamW(_param_groups(stage, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=accelerator.device.type == "cuda")
    plan = {"total": cfg.steps}  # shortened by a time budget
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, plan["total"]))
    ema = EMA(stage, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None

    start = 0
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("run_config") != run_config:
            raise TrainingError(
                f"{ckpt_path} was written by a run with another config; resume it with that config, "
                "pass --no-resume to start over, or choose another --run-dir")
        stage.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        start = state["step"]
        plan["total"] = max(start, state.get("planned_steps", cfg.steps))
        _trim_metrics(metrics_path, start)
        log.info("resuming %s from step %d (%s)", stage_name, start, ckpt_path)
    elif metrics_path.exists():
        metrics_path.unlink()

    model, optimizer = accelerator.prepare(stage, optimizer)
    samples_per_step = cfg.batch_size * cfg.grad_accum
    batches = make_batches(start * samples_per_step)

    def checkpoint(step: int) -> None:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(ckpt_path, {
            "stage": stage_name, "step": step, "run_config": run_config,
            "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
            "rng": _rng_state(), "data_position": step * samples_per_step, "planned_steps": plan["total"],
        })

    result = TrainResult(step=start, resumed_from=start)
    began = time.perf_counter()
    deadline = None if time_budget is None else began + time_budget
    device = accelerator.device
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {stage_name}", disable=not progress, dynamic_ncols=True)
    sums: dict[str, float] = {}
    with open(metrics_path, "a", encoding="utf-8") as metrics_file:
        for step in range(start, cfg.steps):
            if step >= plan["total"]:
                break
            for _ in range(cfg.grad_accum):
                batch = to_device(next(batches), device)
                with accelerator.accumulate(model):
                    losses = model(batch)
                    loss = losses["loss"]
                    if not torch.isfinite(loss.detach()):
                        raise TrainingError(
                            f"{stage_name} loss became {loss.item()} at step {step}; the last good "
                            f"checkpoint ({ckpt_path}) is intact. Lower the learning rate or set "
                            "train.grad_clip, then resume.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            window_steps += 1
            done = step + 1
            if deadline is not None and time.perf_counter() > deadline:
                plan["total"] = done  # out of time before the fitted end: stop here, schedule and all
            if done % cfg.log_every == 0 or done == plan["total"]:
                now = time.perf_counter()
                elapsed = now - window_start
                if deadline is not None and done - start > cfg.log_every:  # the first window holds start-up
                    plan["total"] = fit_steps(done=done, limit=cfg.steps, seconds_per_step=elapsed / window_steps,
                                              seconds_left=deadline - now)
                    bar.total = plan["total"]
                row = {"step": done, **{k: v / window_steps for k, v in sums.items()},
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": window_steps * samples_per_step / elapsed,
                       **({"planned_steps": plan["total"]} if deadline is not None else {})}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                result.metrics = row
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            bar.update(1)
            result.step = done
            if done % cfg.ckpt_every == 0 or done >= plan["total"]:
                checkpoint(done)
    bar.close()
    stage = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(stage)
    stage.cpu().eval()
    result.seconds = time.perf_counter() - began
    return result
