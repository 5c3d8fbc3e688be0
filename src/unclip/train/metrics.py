"""Where a run's metrics go: a JSONL file always, TensorBoard too when it is installed.

One JSON object per logged step (`{"step": 20, "loss": 0.41, "lr": ...}`), appended and
flushed, so `tail -f` and a crash both see whole lines. TensorBoard event files go to
`<run_dir>/tensorboard` when the `tensorboard` package is importable (it is not a dependency:
`pip install tensorboard` to get them). Only the main process of a multi-process run logs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unclip.io import atomic_write

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def _tensorboard_writer(directory: Path, purge_step: int):
    """A SummaryWriter that hides earlier events from `purge_step` on, or None when tensorboard
    is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        return None
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


class MetricsLog:
    """Append metric rows of one run; `enabled=False` (non-main ranks) makes every call a no-op.
    `start` is the step the run resumes from: TensorBoard hides what an earlier call logged after
    it, as `trim_metrics` drops it from the JSONL (0, a fresh run, hides every earlier event)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True, start: int = 0):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._tb = (_tensorboard_writer(Path(run_dir) / TENSORBOARD, purge_step=start + 1)
                    if enabled and tensorboard else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (logged after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    rows = _rows(path)
    kept = [line for line, row in rows if row.get("step", 0) <= step]
    with atomic_write(path, "w") as handle:
        handle.writelines(line + "\n" for line in kept)


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each whole row of a metrics file; lines that are not a JSON object (the half
    line a full disk or a crash mid-write leaves) are left out with a warning."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append((line, row))
        else:
            bad += 1
    if bad:
        log.warning("%s: left out %d line(s) that are not a whole metrics row (a write cut short)", path, bad)
    return rows


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file, in order (half-written lines left out with a warning)."""
    return [row for _, row in _rows(Path(path))]
