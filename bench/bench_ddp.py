"""Decoder training throughput through the real trainer on 1 vs N processes (DDP), side by side.

    .venv/bin/python bench/bench_ddp.py                          # this CPU: 1 and 2 processes
    .venv/bin/python bench/bench_ddp.py --config paper64 --procs 1 --steps 30 --batch 64   # a GPU

Each process count is a fresh launch (torchrun for several processes, gloo on CPU, NCCL on GPUs)
of `unclip.train.trainer.train` on the decoder stage, with the same global batch split over the
processes, so the numbers include DDP's gradient all-reduce and the trainer's own bookkeeping
(EMA, clipping, AdamW, logging). Batches are random tensors of the right shapes (images, z_i,
caption token states), made on each rank: this measures the model and the trainer, not data
loading or the frozen CLIP. Reported: global training images/s, the median over the logged
steps after `--warmup` steps. On a CPU the cores are shared out: each of N processes gets
cores / N threads unless `--threads` says otherwise.

Configs: `default` is the shapes preset's decoder (32², base 32, multipliers 1-2-4, attention
at 16² and 8², bf16); `gpu` is the shapes-gpu preset's (base 64); `paper64` is a 64² decoder
laid out like the paper's (multipliers 1-2-3-4, two res blocks a level, attention at 32², 16²
and 8², 4 extra z_i tokens), scaled to base 128 so that it fits one accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

CLIP_DIM, TEXT_WIDTH, TOKENS = 64, 64, 77


def decoder_config(name: str):
    from unclip.config import DecoderConfig, preset

    if name == "default":
        return preset("shapes").decoder
    if name == "gpu":
        return preset("shapes-gpu").decoder
    if name == "paper64":
        return DecoderConfig(resolution=64, base_channels=128, channel_mult=(1, 2, 3, 4), layers_per_block=2,
                             attention_resolutions=(32, 16, 8), head_dim=64, cross_attention_dim=512,
                             prediction_type="v_prediction")
    raise SystemExit(f"unknown --config {name!r}; use default, gpu or paper64")


def random_feed(resolution: int, batch_size: int):
    """make_batches(start) for the trainer: this rank's share of each global batch, random tensors."""
    import torch

    from unclip.train.data import local_batch_size
    from unclip.train.dist import rank_world

    def make(start: int):
        rank, world = rank_world()
        n = local_batch_size(batch_size, world)
        g = torch.Generator().manual_seed(start + rank)
        batch = {"image": torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1,
                 "z_i": torch.nn.functional.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1),
                 "text_states": torch.randn(n, TOKENS, TEXT_WIDTH, generator=g),
                 "text_mask": torch.ones(n, TOKENS, dtype=torch.long)}
        while True:
            yield batch

    return make


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: train, then the main process writes the measured rate to --result."""
    import torch

    from unclip.decoder.model import Decoder
    from unclip.train.metrics import read_metrics
    from unclip.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = decoder_config(args.config)
    precision = args.precision or cfg.train.mixed_precision
    tc = replace(cfg.train, steps=args.steps, batch_size=args.batch, warmup_steps=1, log_every=1,
                 ckpt_every=10**9, mixed_precision=precision, num_workers=0)
    torch.manual_seed(0)
    decoder = Decoder.from_config(replace(cfg, train=tc), clip_dim=CLIP_DIM, text_width=TEXT_WIDTH)
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(decoder, random_feed(cfg.resolution, args.batch), cfg=tc, run_dir=run_dir,
                       run_config={"bench": args.config}, progress=False, stage_name="decoder")
        if result.main_process:
            rates = [row["samples_per_s"] for row in read_metrics(Path(run_dir) / "metrics.jsonl")[args.warmup:]]
            params = sum(p.numel() for p in decoder.parameters()) / 1e6
            Path(args.result).write_text(json.dumps({
                "procs": result.world_size, "images_per_s": statistics.median(rates), "params_m": round(params, 1),
                "threads": torch.get_num_threads(), "precision": precision,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, procs: int) -> dict:
    """Run `procs` worker processes (torchrun when more than one) and read back the main one's result."""
    folder = tempfile.TemporaryDirectory()
    result = Path(folder.name) / "result.json"
    threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
    options = ["--worker", "--config", args.config, "--steps", str(args.steps), "--batch", str(args.batch),
               "--warmup", str(args.warmup), "--threads", str(threads), "--result", str(result),
               *(["--precision", args.precision] if args.precision else [])]
    if procs == 1:
        command = [sys.executable, __file__, *options]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with folder:
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"the {procs}-process run failed (its messages are above)")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default", help="default, gpu or paper64 (see the module docstring)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per launch (default: 12)")
    parser.add_argument("--warmup", type=int, default=4, help="logged steps left out of the median (default: 4)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (default: 32)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    parser.add_argument("--precision", choices=["no", "bf16"], help="mixed precision (default: the config's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / N)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves nothing to time after --warmup {args.warmup}")
    rows = [launch(args, procs) for procs in args.procs]
    base = rows[0]["images_per_s"]
    print(f"\ndecoder training throughput, config {args.config}, global batch {args.batch}, "
          f"{rows[0]['params_m']} M parameters, {rows[0]['precision']}, {rows[0]['device']}")
    print("| processes | threads each | images/s | vs first |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['procs']} | {row['threads']} | {row['images_per_s']:.1f} | {row['images_per_s'] / base:.2f}× |")


if __name__ == "__main__":
    main()
