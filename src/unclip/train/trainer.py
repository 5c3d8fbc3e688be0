"""One trainer for every stage, on one process or many.

A stage is an `nn.Module` whose `forward(batch)` returns `training_losses(batch)`: a dict with a
scalar "loss" and any other scalars to log. The trainer owns everything else: AdamW with
warmup + cosine, `accelerate` (bf16 autocast on CPU or GPU; DDP or FSDP under
`accelerate launch`), gradient accumulation and clipping, EMA, a progress bar, a JSONL metrics
file (and TensorBoard when installed), atomic checkpoints every `ckpt_every` steps and at the
end, and exact resume from the last checkpoint (model, optimizer, scheduler, EMA, step, every
rank's RNG states, the data position and the losses summed since the last metrics row). A loss
that turns NaN or Inf on any rank stops every rank with the last good checkpoint untouched. With
`cfg.eval_every`, validation losses on fixed held-out batches are logged as `val_*` rows without
touching the training random state.

Data comes from `make_batches(start)`, which returns an endless iterator of this process's
batches beginning at global sample number `start`; resuming at step k asks for
`start = k * batch_size * grad_accum`. `cfg.batch_size` is the global batch: with R processes
each draws its own slice of batch_size / R samples of every global batch (the feeds in
`unclip.train.data` do this), so R processes see the same global batches as one. Batches may
live on the CPU: the trainer moves their tensors to the training device and hands the stage
back on the CPU.

Only the main process writes checkpoints, metrics and the progress bar; every rank loads the
checkpoint to resume. A checkpoint written by R processes resumes exactly on R processes; on
another count the weights, optimizer and data position carry over but random draws (noise,
dropout) are reseeded, which the log says. See docs/training.md.

A run can be given a wall-clock budget (`time_budget`, seconds; `--minutes` on the CLI): the
trainer measures its own speed and shortens the run so that warmup + cosine end inside the
budget, re-measuring as it goes. The schedule then ends at the fitted step count, recorded as
`planned_steps` in the metrics; under several processes the main process's clock decides.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unclip.config import TrainConfig, UnclipConfig
from unclip.errors import ConfigError, TrainingError, TrainingStopped, UnclipError
from unclip.io import pid_alive
from unclip.modeldir import load_checkpoint, save_checkpoint
from unclip.precision import training_precision
from unclip.train import dist
from unclip.train.metrics import METRICS, MetricsLog, trim_metrics
from unclip.train.runconfig import stage_changes

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"  # held by the process training in a run folder (`run_lock`)


class StopOnSigterm:
    """While entered (in the main thread), a SIGTERM sets `received` instead of killing the process:
    the training loop finishes its step, checkpoints and raises `stopped(...)`. Leaving puts the
    handler from before back. The stages' trainer and the judge's (`unclip.eval.judge_train`) use it."""

    def __init__(self):
        self.received, self._previous = False, None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def stopped(what: str, *, step: int, of: int, checkpoint: str | Path) -> TrainingStopped:
        """The error that ends a run stopped after `step` of `of` with its checkpoint written."""
        return TrainingStopped(f"{what} stopped by SIGTERM after step {step} of {of}, checkpoint written to "
                               f"{checkpoint}; run the same command to resume")


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


class Schedule:
    """The learning-rate factor of each step: linear warmup to 1, then constant or cosine decay
    to 0 at `total`, the planned step count.

    A time budget refits `total` as the run goes (`refit`). The decay then bends from where it
    is, so the factor never rises after warmup and still reaches 0 at the new end (recomputing
    the cosine over a lengthened plan raised the learning rate mid-run); a plan shorter than
    twice the warmup warms up for half of it (a budget shorter than the warmup never left it).
    `state()` goes into checkpoints, so a resumed run continues the same curve."""

    def __init__(self, cfg: TrainConfig, total: int, state: dict[str, Any] | None = None):
        self.constant = cfg.lr_schedule == "constant"
        self.total = total
        self.warmup = cfg.warmup_steps
        self.bend = (self.warmup, 0.0)  # (step, cosine progress) the decay runs on from
        if state:
            self.total, self.warmup, self.bend = state["total"], state["warmup"], tuple(state["bend"])

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.constant:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, self._progress(step))))

    def _progress(self, step: int) -> float:
        start, progress = self.bend
        return progress + (1.0 - progress) * (step - start) / max(1, self.total - start)

    def refit(self, done: int, total: int) -> None:
        """After `done` steps the plan ends at `total` instead."""
        if done < self.warmup:  # warming up: a short plan shortens the warmup (never below what is done)
            self.warmup = max(done, min(self.warmup, total // 2))
            self.bend = (self.warmup, 0.0)
        else:
            self.bend = (done, self._progress(done))
        self.total = total

    def state(self) -> dict[str, Any]:
        return {"total": self.total, "warmup": self.warmup, "bend": list(self.bend)}


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
    """Where this process trains: its GPU when torch sees one (the launcher's LOCAL_RANK picks
    which, so that stages can place frozen helpers before the trainer starts), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


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
    seconds: float = 0.0  # training time of the whole run: this call, plus earlier calls up to their last checkpoint
    world_size: int = 1
    main_process: bool = True  # False on the other ranks: only the main process should write the model
    validation: dict[str, float] = field(default_factory=dict)  # the last validation row, when there was one
    autocast: str = "no"  # what this call trained under: "bf16" or "no" (`unclip.precision.training_precision`)


def _check_world(cfg: TrainConfig, world: int, distributed_type: str) -> None:
    if cfg.batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is the global batch and must split evenly over the {world} "
            f"processes; use a multiple of {world}, or launch a number of processes that divides it")
    if distributed_type == "FSDP" and cfg.ema_decay > 0:
        raise ConfigError("EMA keeps a full copy of the weights on every rank, which FSDP is there to avoid; "
                          "set train.ema_decay=0 under FSDP, or train with DDP (configs/accelerate/ddp.yaml)")


def _remove_stale_temps(ckpt_path: Path) -> None:
    """Delete temporary files a killed checkpoint write left behind (the checkpoint itself is whole)."""
    for stale in ckpt_path.parent.glob(f".{ckpt_path.name}.*.tmp"):
        log.info("removing %s, left by a checkpoint write that was interrupted", stale)
        stale.unlink(missing_ok=True)


RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # torchrun / accelerate, Open MPI, MPICH


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Make `run_dir` (a TrainingError, before any work, when it cannot be written) and hold
    `run_dir/.lock` while training: a second run in the same folder deleted the first's checkpoint
    write and interleaved its metrics (`unclip train all` holds its root's the same way). The
    operating system drops the lock when the process ends; data-loader workers forked from a killed
    run hold it a few seconds more, so a lock whose recorded process has died is taken over. The
    ranks of one multi-process run share the folder (rank 0 holds it); where the file system cannot
    lock, the run goes on without."""
    from unclip.io import check_output_dir

    try:
        check_output_dir(run_dir)  # a file on the path, or no permission: said before any work
    except ConfigError as err:
        raise TrainingError(f"--run-dir: {err}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    rank = next((os.environ[name] for name in RANK_VARIABLES if os.environ.get(name)), "0")
    if rank != "0":
        yield
        return
    handle = open(run_dir / LOCK, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            pid = holder.removeprefix("pid ")
            if not (pid.isdigit() and not pid_alive(int(pid))):
                raise TrainingError(f"another unclip process{f' ({holder})' if holder else ''} is training in "
                                    f"{run_dir}; wait for it, stop it, or choose another --run-dir") from None
            log.info("%s: the run that held it (%s) has died; its workers still hold the lock", run_dir / LOCK, holder)
        except OSError as err:  # a file system without locks (some network mounts)
            log.warning("cannot lock %s (%s); nothing stops a second run in this folder", run_dir / LOCK, err)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _read_resume_state(ckpt_path: Path, run_config: dict[str, Any], stage_name: str,
                       seed: int | None = None) -> dict[str, Any]:
    def completed(config: dict[str, Any]) -> dict[str, Any]:
        try:  # keys added to UnclipConfig since a checkpoint was written read as their defaults
            return UnclipConfig.from_dict(config).to_dict()
        except (UnclipError, TypeError, ValueError):
            return config  # not an UnclipConfig (a caller's own run config): compared as it is

    state = load_checkpoint(ckpt_path)
    if state.get("stage") not in (None, stage_name):
        raise TrainingError(f"{ckpt_path} is a checkpoint of the {state['stage']} stage, not of {stage_name}: "
                            "choose another --run-dir for this stage (or move that checkpoint away)")
    if changed := stage_changes(stage_name, completed(state.get("run_config") or {}), completed(run_config)):
        raise TrainingError(
            f"{ckpt_path} was written by a run with another config ({'; '.join(changed[:4])}"
            f"{f'; {len(changed) - 4} more' if len(changed) > 4 else ''}); resume it with that config, "
            "pass --no-resume to start over, or choose another --run-dir (to train a finished model "
            "further, start a new run from it with --init)")
    # the seed the trainer is handed: a run started with --init adds an offset taken from the weights it
    # starts from (`modeldir.continued`), which the run config does not show
    if seed is not None and state.get("seed", seed) != seed:
        raise TrainingError(
            f"{ckpt_path} was written by a run that drew its data and noise with seed {state['seed']}, and this one "
            f"draws with {seed}: a run started with --init resumes only with the same --init, and one started "
            "without it only without; run the command that started it, pass --no-resume to start over, or "
            "choose another --run-dir")
    return state


def _restore_rng(saved: Any, *, rank: int, world: int, seed: int, step: int) -> None:
    """Each rank takes back its own RNG states; a checkpoint from another process count reseeds."""
    states = saved if isinstance(saved, list) else [saved]  # one dict: written before multi-process runs
    if len(states) == world:
        _set_rng_state(states[rank])
        return
    if rank == 0:
        log.warning("the checkpoint was written by %d process(es) and this run has %d: weights, optimizer and "
                    "data position resume exactly, random draws (noise, dropout) are reseeded", len(states), world)
    torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)


def _is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == "FSDP"


def _model_state(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights (gathered from the shards under FSDP: a collective every rank joins)."""
    return accelerator.get_state_dict(model) if _is_fsdp(accelerator) else accelerator.unwrap_model(model).state_dict()


# The blocks FSDP shards one by one (accelerate's TRANSFORMER_BASED_WRAP reads them from the
# model's `_no_split_modules`): the UNets' residual and attention blocks, the CLIP towers' and
# the priors' transformer layers.
SHARD_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer", "TransformerEncoderLayer")


# The networks `train.compile` compiles, each whole: the stages' UNets, the priors' transformers, the CLIP towers
COMPILE_UNITS = ("UNet2DConditionModel", "UNet2DModel", "PriorTransformer", "TransformerEncoder",
                 "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")


def compile_units(module: nn.Module) -> list[str]:
    """Compile `module`'s networks in place (`nn.Module.compile`: names and state dict unchanged); their names."""
    compiled = []
    for name, sub in module.named_modules():
        if type(sub).__name__ in COMPILE_UNITS and not any(name.startswith(c + ".") for c in compiled):
            sub.compile()
            compiled.append(name)
    return compiled


def _shard_units(module: nn.Module) -> list[str]:
    present = {type(m).__name__ for m in module.modules()}
    return [name for name in SHARD_UNITS if name in present]


def _gathered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's copy of the full weights of an FSDP-sharded `model`, on the CPU, one tensor gathered at
    a time (a collective every rank joins)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


def _param_names(accelerator, model: nn.Module, optimizer) -> list[str]:
    """The parameter names in the optimizer's order: what its state's integer keys stand for."""
    names = {id(p): n for n, p in accelerator.unwrap_model(model).named_parameters()}
    return [names[id(p)] for group in optimizer.optimizer.param_groups for p in group["params"]]


def _rekeyed(state: dict[str, Any], key: Callable[[Any], Any]) -> dict[str, Any]:
    return {"state": {key(k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in state["param_groups"]]}


def _optimizer_state(accelerator, model: nn.Module, optimizer) -> dict[str, Any]:
    """Keyed by parameter position (torch's own format) on one process and under DDP, by parameter name
    under FSDP (torch.distributed.checkpoint's); `_load_optimizer_state` reads either, so a
    checkpoint moves between FSDP and DDP or one process."""
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _load_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    names = _param_names(accelerator, model, optimizer)
    by_name = any(isinstance(k, str) for g in state["param_groups"] for k in g["params"])
    if _is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = state if by_name else _rekeyed(state, names.__getitem__)
        set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(_rekeyed(state, names.index) if by_name else state)


VALIDATION_SEED = 7919  # the noise, timesteps and drops of every validation pass (the same each time)


def _validate(model: nn.Module, val_batches: Callable[[int], Iterator[dict]], device: torch.device,
              seed: int) -> dict[str, float]:
    """Mean losses of the model (training weights, eval mode) over the validation batches, averaged
    over ranks; the random draws are fixed and the training RNG is left as it was (resume stays exact)."""
    sums: dict[str, float] = {}
    count = 0
    model.eval()
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in val_batches(0):
            for k, v in model(to_device(batch, device)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
    model.train()
    averaged = dist.mean([v / count for v in sums.values()])
    return {f"val_{k}": v for k, v in zip(sums, averaged, strict=True)}


def train(stage: nn.Module, make_batches: Callable[[int], Iterator[dict]], *, cfg: TrainConfig,
          run_dir: str | Path, run_config: dict[str, Any], resume: bool = True, progress: bool = True,
          stage_name: str = "stage", time_budget: float | None = None, stop_at: int | None = None,
          val_batches: Callable[[int], Iterator[dict]] | None = None) -> TrainResult:
    """Train `stage` for `cfg.steps` optimizer steps, checkpointing into `run_dir`.

    `run_config` (the full UnclipConfig as a dict) is stored in every checkpoint; resuming a run
    whose checkpoint holds a different config is an error rather than a silent mix. At the end
    the stage holds the EMA weights when EMA is on, and is on the CPU. `time_budget` (seconds
    of this call) fits the schedule's length to the time, see the module docstring. `stop_at`
    ends this call after that step with a checkpoint, as a preemption would, without changing
    the schedule: a later call resumes where it stopped (jobs on time-sliced clusters, tests).
    `val_batches` (a finite feed, e.g. `unclip.train.data.validation_feed`) is evaluated every
    `cfg.eval_every` steps and at the end; its mean losses go to the metrics as `val_<name>`.
    """
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        # fitting the schedule to it crashed (inf, nan) or ended the run, schedule and all, after one step
        raise ConfigError(f"time budget {time_budget} s: give a positive number of seconds (--minutes: of minutes), "
                          "or none to train the configured steps")
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        for path in (run_dir / CHECKPOINT, run_dir / METRICS):
            if path.exists() and not path.is_file():  # resuming would not see it, starting over would delete the log
                raise TrainingError(f"{path} is not a file; move it away, then run again")
        return _train(stage, make_batches, cfg=cfg, run_dir=run_dir, run_config=run_config, resume=resume,
                      progress=progress, stage_name=stage_name, time_budget=time_budget, stop_at=stop_at,
                      val_batches=val_batches)


def _train(stage: nn.Module, make_batches: Callable[[int], Iterator[dict]], *, cfg: TrainConfig, run_dir: Path,
           run_config: dict[str, Any], resume: bool, progress: bool, stage_name: str, time_budget: float | None,
           stop_at: int | None, val_batches: Callable[[int], Iterator[dict]] | None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    ckpt_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    # accelerate keeps one mixed precision per process and refuses another; stages of one process
    # (`unclip train all`, the Python API) may each have their own. The process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=dist.cpu_only(), gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision=training_precision(cfg.mixed_precision, dist.start().device, stage_name))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    _check_world(cfg, world, str(accelerator.distributed_type).split(".")[-1])
    torch.manual_seed(cfg.seed + rank)  # each rank draws its own noise; rank 0 draws a one-process run's
    # FSDP shards the module it is given in place; the caller's stage stays whole and takes the
    # gathered weights at the end
    trained = copy.deepcopy(stage) if _is_fsdp(accelerator) else stage
    if _is_fsdp(accelerator) and not getattr(trained, "_no_split_modules", None):
        trained._no_split_modules = _shard_units(trained)  # what TRANSFORMER_BASED_WRAP shards one by one
    trained.to(accelerator.device)
    if cfg.compile and _is_fsdp(accelerator):
        log.warning("train.compile is not applied under FSDP (the two together are untested here); %s runs eager",
                    stage_name)
    elif cfg.compile:
        log.info("compiling %s: %s (the first steps wait for it)", stage_name, ", ".join(compile_units(trained)))
    # one fused kernel for every tensor's update, on GPUs and CPUs alike (FSDP's sharded tensors take the loop)
    fused = accelerator.device.type in ("cuda", "cpu") and not _is_fsdp(accelerator)
    optimizer = torch.optim.AdamW(_param_groups(trained, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=fused)
    plan = Schedule(cfg, cfg.steps)  # shortened by a time budget
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: plan(s))

    start, state, earlier_seconds = 0, None, 0.0
    if resume and ckpt_path.is_file():
        state = _read_resume_state(ckpt_path, run_config, stage_name, seed=cfg.seed)
        if missing := [key for key in ("model", "optimizer", "scheduler", "step", "rng") if key not in state]:
            raise TrainingError(f"{ckpt_path} holds no training state to resume ({', '.join(missing)} missing): it "
                                "was not written by unclip's trainer; move it away, pass --no-resume to start over, "
                                "or choose another --run-dir")
        trained.load_state_dict(state["model"])  # full weights, before FSDP shards them
        start = state["step"]
        plan = Schedule(cfg, max(start, state.get("planned_steps", cfg.steps)), state.get("schedule"))
        scheduler.load_state_dict(state["scheduler"])
        earlier_seconds = float(state.get("seconds", 0.0))  # training time of the calls before, up to this checkpoint
        log.info("resuming %s from step %d (%s)", stage_name, start, ckpt_path)
    accelerator.wait_for_everyone()  # every rank has read the files before the main process touches them
    if main:
        _remove_stale_temps(ckpt_path)
        if state is not None:
            trim_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()

    model, optimizer = accelerator.prepare(trained, optimizer)  # DDP broadcasts rank 0's weights
    ema = EMA(accelerator.unwrap_model(model), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if state is not None:
        _load_optimizer_state(accelerator, model, optimizer, state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        _restore_rng(state["rng"], rank=rank, world=world, seed=cfg.seed, step=start)
    # the losses summed since the last metrics row: a checkpoint between two rows carries them over
    window = (state or {}).get("log_window") or {"sums": {}, "steps": 0}
    sums, summed = dict(window["sums"]), window["steps"]
    state = None  # free the loaded copy
    samples_per_step = cfg.batch_size * cfg.grad_accum  # global
    batches = make_batches(start * samples_per_step)

    def checkpoint(step: int) -> None:
        payload = {
            "stage": stage_name, "step": step, "run_config": run_config, "seed": cfg.seed, "world_size": world,
            "model": _model_state(accelerator, model), "optimizer": _optimizer_state(accelerator, model, optimizer),
            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
            "rng": dist.gather(_rng_state()), "data_position": step * samples_per_step, "planned_steps": plan.total,
            "schedule": plan.state(), "seconds": earlier_seconds + time.perf_counter() - began,
            "log_window": {"sums": dict(zip(sums, dist.mean(list(sums.values())), strict=True)), "steps": summed},
        }
        if main:
            save_checkpoint(ckpt_path, payload)
        accelerator.wait_for_everyone()

    result = TrainResult(step=start, resumed_from=start, world_size=world, main_process=main,
                         autocast=accelerator.mixed_precision)
    began = time.perf_counter()
    deadline = None if time_budget is None else began + time_budget
    device = accelerator.device
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {stage_name}", disable=not (progress and main),
               dynamic_ncols=True)
    with MetricsLog(run_dir, enabled=main, start=start) as metrics, StopOnSigterm() as sigterm:
        for step in range(start, cfg.steps):
            if step >= plan.total or (stop_at is not None and step >= stop_at):
                break
            for _ in range(cfg.grad_accum):
                batch = to_device(next(batches), device)
                with accelerator.accumulate(model):
                    losses = model(batch)
                    loss = losses["loss"]
                    if not dist.all_ok(bool(torch.isfinite(loss.detach()))):
                        kept = (f"the last good checkpoint ({ckpt_path}) is intact" if Path(ckpt_path).is_file()
                                else "no checkpoint was written yet, so the run starts over")
                        raise TrainingError(
                            f"{stage_name} loss became non-finite at step {step} (this rank's: {loss.item()}); "
                            f"{kept}. Lower the learning rate or set train.grad_clip, then run the same command.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            lr = scheduler.get_last_lr()[0]  # this step's (the scheduler now moves on to the next)
            scheduler.step()
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            window_steps, summed = window_steps + 1, summed + 1
            done = step + 1
            # one decision for every rank: out of time by the main process's clock; a SIGTERM on any rank
            out_of_time, stopping = dist.agree(main=deadline is not None and time.perf_counter() > deadline,
                                               anyone=sigterm.received)
            if out_of_time:
                plan.refit(done, done)  # out of time before the fitted end: stop here, schedule and all
            if done % cfg.log_every == 0 or done == plan.total:
                now = time.perf_counter()
                elapsed = now - window_start
                if deadline is not None and done - start > cfg.log_every:  # the first window holds start-up
                    plan.refit(done, dist.from_main(fit_steps(
                        done=done, limit=cfg.steps, seconds_per_step=elapsed / window_steps, seconds_left=deadline - now)))
                    bar.total = plan.total
                averaged = dist.mean([v / summed for v in sums.values()])  # over the window and the ranks
                row = {"step": done, **dict(zip(sums, averaged, strict=True)),
                       "lr": lr, "samples_per_s": window_steps * samples_per_step / elapsed,
                       **({"planned_steps": plan.total} if deadline is not None else {})}
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                result.metrics = row
                sums, summed, window_start, window_steps = {}, 0, time.perf_counter(), 0
            if val_batches is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == plan.total):
                row = {"step": done, **_validate(model, val_batches, device, cfg.seed + VALIDATION_SEED)}
                metrics.write(row)
                result.validation = row
            bar.update(1)
            result.step = done
            if done % cfg.ckpt_every == 0 or done >= plan.total or done == stop_at or stopping:
                checkpoint(done)
            if stopping and done < plan.total:
                bar.close()
                raise sigterm.stopped(stage_name, step=done, of=plan.total, checkpoint=ckpt_path)
    bar.close()
    if _is_fsdp(accelerator):
        stage.load_state_dict(_gathered_weights(accelerator.unwrap_model(model)))
    else:
        stage = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(stage)
    stage.cpu().eval()
    result.seconds = earlier_seconds + time.perf_counter() - began
    return result
