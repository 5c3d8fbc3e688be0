"""Create the anchors' venvs under .bench-venvs/ (idempotent: a venv with its marker file is kept).

    python bench/anchors/install.py            # both
    python bench/anchors/install.py diffusers  # one

Each venv gets torch 2.13.0 (the CPU build, as the Makefile installs it) first, then its anchor,
all under `pip install -c bench/anchors/constraints.txt`, so a dependency asking for plain
`torch` cannot pull a CUDA build.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".bench-venvs"
CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"
ANCHORS = {
    "lucidrains": ["dalle2-pytorch==1.15.6", "torchvision==0.28.0"],
    "diffusers": ["diffusers==0.42.1"],
}


def python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def install(name: str) -> Path:
    """The venv's python, installing the anchor first when its marker is missing."""
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; anchors are {', '.join(ANCHORS)}")
    env = VENVS / name
    marker = env / ".installed"
    if marker.exists():
        return python(name)
    venv.create(env, with_pip=True, clear=True)
    pip = [str(python(name)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "-c", str(CONSTRAINTS)]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *ANCHORS[name]], check=True)
    marker.write_text(subprocess.run([str(python(name)), "-m", "pip", "freeze"], check=True,
                                     capture_output=True, text=True).stdout)
    return python(name)


if __name__ == "__main__":
    for name in sys.argv[1:] or ANCHORS:
        print(name, install(name), flush=True)
