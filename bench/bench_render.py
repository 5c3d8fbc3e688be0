"""Shapes-world throughput on one core: images/s at 32², 64², 128² (target: ≥ 2,000 at 64²).

    .venv/bin/python bench/bench_render.py

Prints the renderer alone (scene → PIL image) and the full sample (scene sampling + caption +
render + tensor), each next to the target. Single process, single thread.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from unclip.data.render import render  # noqa: E402
from unclip.data.shapes import ShapesDataset  # noqa: E402
from unclip.data.world import sample  # noqa: E402

TARGET = 2000  # images/s at 64², issue 2
N = 3000


def rate(fn, n: int) -> float:
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        fn(n)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and nothing else
    torch.set_num_threads(1)
    scenes = [sample("train", i).scene for i in range(N)]
    print(f"{'size':>6} {'render img/s':>14} {'full sample img/s':>18}   target at 64²: ≥ {TARGET:,} img/s")
    for size in (32, 64, 128):
        r = rate(lambda n: [render(s, size) for s in scenes[:n]], N)
        ds = ShapesDataset("train", size=size)
        f = rate(lambda n: [ds[i] for i in range(n)], N)
        mark = ("  ✓" if f >= TARGET else "  ✗ below target") if size == 64 else ""
        print(f"{size:>5}² {r:>14,.0f} {f:>18,.0f}{mark}")


if __name__ == "__main__":
    main()
