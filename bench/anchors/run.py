"""unclip beside lucidrains' dalle2-pytorch and diffusers at the anchor config, in one run.

    .venv/bin/python bench/anchors/run.py [--repeats 3] [--train-steps N] [--impls unclip,diffusers,lucidrains]
                                          [--precision fp32|bf16] [--compile]

Installs each anchor into its own venv under .bench-venvs/ (once; see install.py), then runs
every (stage, implementation) in a fresh subprocess with two threads: the decoder (32², base 64,
mults (1, 2, 2), train batch 16, 50-step DDIM for a batch of 4) and the diffusion prior (width
128, depth 4, train batch 64, 64 steps for a batch of 4); shapes in
bench/anchors/_common.py (the project's anchor config). Repeats are interleaved (every implementation once, then again)
so that drift in the machine's load spreads over all of them; each number is the median over
repeats. Prints a markdown table with the ratio of unclip to the faster anchor, and the
training step's achieved FLOP/s (FlopCounterMode: matmuls, convolutions, attention) against
this machine's measured matmul peak in that precision. `--precision bf16` runs every
implementation's training step and sampling under CPU bf16 autocast (unclip's presets train so).
`--compile` adds unclip with its networks compiled (`train.compile`) as one more implementation,
`unclip-compiled`, with a ratio row of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import install

HERE = Path(__file__).resolve().parent
MAIN_PYTHON = install.ROOT / ".venv" / "bin" / "python"
PEAK = {"fp32": 195e9, "bf16": 900e9}  # FLOP/s, this machine's measured 2-thread matmul peaks (issue 11)
BATCH = {"decoder": 16, "prior": 64}
UNIT = {"decoder": "img/s", "prior": "emb/s"}
SAMPLING = {"decoder": "50-step DDIM", "prior": "64 steps"}
# timed steps per process: a few seconds each (with 6, a prior step of ~0.1 s timed 0.5 s and its rate
# moved ±10% between processes)
TRAIN_STEPS = {"decoder": 12, "prior": 40}


UNCLIP = ("unclip", "unclip-compiled")


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, as unclip (in the main venv) decides it."""
    out = subprocess.run([str(MAIN_PYTHON), "-c", "from unclip.precision import native_bf16; print(native_bf16('cpu'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() != "False"


def run_worker(python: Path, impl: str, stage: str, steps: int, precision: str = "fp32") -> dict:
    worker, extra = ("unclip", ["compile"]) if impl == "unclip-compiled" else (impl, [])
    out = subprocess.run([str(python), str(HERE / f"worker_{worker}.py"), stage, str(steps), precision, *extra],
                         cwd=HERE, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {stage} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    for key in ("train_rate", "latency", "peak_rss_mib", "train_flops"):
        row[key] = statistics.median(r[key] for r in runs)
    row["n"] = len(runs)
    return row


def table(rows: dict[tuple[str, str], dict], failures: dict[str, str], precision: str = "fp32") -> str:
    lines = [f"| stage | implementation | params | train | sampling (batch 4) | peak RSS | train GFLOP/s (% of {precision} "
             "peak) |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for stage in ("decoder", "prior"):
        for impl in (*UNCLIP, "diffusers", "lucidrains"):
            r = rows.get((stage, impl))
            if r is None:
                continue
            achieved = r["train_flops"] / BATCH[stage] * r["train_rate"]
            lines.append(f"| {stage} | {impl} | {r['params_m']:.2f} M | {r['train_rate']:.1f} {UNIT[stage]} | "
                         f"{r['latency']:.2f} s ({SAMPLING[stage]}) | {r['peak_rss_mib']:.0f} MiB | "
                         f"{achieved / 1e9:.1f} ({100 * achieved / PEAK[precision]:.1f}%) |")
        anchors = [rows[stage, a] for a in ("diffusers", "lucidrains") if (stage, a) in rows]
        for impl in (u for u in UNCLIP if (stage, u) in rows and anchors):
            u = rows[stage, impl]
            fast_train = max(anchors, key=lambda r: r["train_rate"])
            fast_sample = min(anchors, key=lambda r: r["latency"])
            small = min(anchors, key=lambda r: r["peak_rss_mib"])
            ratios.append(f"| {stage} | {impl} ÷ faster anchor | | {u['train_rate'] / fast_train['train_rate']:.2f}× "
                          f"rate (vs {fast_train['impl']}) | {u['latency'] / fast_sample['latency']:.2f}× latency "
                          f"(vs {fast_sample['impl']}) | {u['peak_rss_mib'] / small['peak_rss_mib']:.2f}× "
                          f"(vs {small['impl']}) | |")
    lines += ratios
    for impl, why in failures.items():
        lines.append(f"\n{impl}: not measured: {why}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int,
                        help="timed optimizer steps per process (default: 12 decoder, 40 prior; a few seconds each)")
    parser.add_argument("--impls", default="unclip,diffusers,lucidrains")
    parser.add_argument("--stages", default="decoder,prior")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="every implementation's training step and sampling in fp32, or under CPU bf16 autocast")
    parser.add_argument("--compile", action="store_true",
                        help="also unclip with its networks compiled (train.compile), as `unclip-compiled`")
    args = parser.parse_args()
    impls = args.impls.split(",") + (["unclip-compiled"] if args.compile else [])
    stages = args.stages.split(",")
    if unknown := [i for i in impls if i not in (*UNCLIP, *install.ANCHORS)]:  # before any venv is made
        parser.error(f"--impls: unknown {', '.join(unknown)}; use {', '.join(('unclip', *install.ANCHORS))}")
    if unknown := [s for s in stages if s not in TRAIN_STEPS]:
        parser.error(f"--stages: unknown {', '.join(unknown)}; use {', '.join(TRAIN_STEPS)}")

    if args.precision == "bf16" and not _native_bf16():
        print("note: this CPU has no bf16 units (AVX-512-BF16 or AMX); every implementation's bf16 is emulated "
              "here, many times slower than fp32, and the ratios say little about a machine with them")
    pythons, failures = {}, {}
    for impl in impls:
        if impl in UNCLIP:
            pythons[impl] = MAIN_PYTHON
            continue
        try:
            pythons[impl] = install.install(impl)
        except subprocess.CalledProcessError as err:
            failures[impl] = f"install failed ({err})"
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for stage in stages:
            for impl, python in pythons.items():
                if impl in failures:
                    continue
                try:
                    result = run_worker(python, impl, stage, args.train_steps or TRAIN_STEPS[stage], args.precision)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    failures[impl] = str(err)
                    print(err, file=sys.stderr, flush=True)
                    continue
                runs.setdefault((stage, impl), []).append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {stage:8} {impl:10} {result['train_rate']:7.1f}/s "
                      f"{result['latency']:.2f} s {result['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    rows = {key: median_row(value) for key, value in runs.items()}
    steps = args.train_steps or " / ".join(f"{TRAIN_STEPS[s]} ({s})" for s in stages)
    n = min((r["n"] for r in rows.values()), default=0)
    print(f"torch {next(iter(rows.values()))['torch'] if rows else '?'}, {args.precision}, 2 threads, median of {n} "
          f"fresh processes, {steps} timed training steps each after 2 warm-up steps\n")
    print(table(rows, failures, args.precision))


if __name__ == "__main__":
    main()
