"""Atomic file writes: a crash mid-write leaves the previous file intact.

Every file unclip writes (checkpoints, model files, shards, images, reports) goes through
`atomic_write`: the bytes land in a temporary file beside the target, are flushed to disk,
and replace the target in one `os.replace`, which POSIX makes atomic. The temporary file is
named `.NAME.unclip-HOST-PID.XXXXXXXX.tmp`; one that this machine's unclip wrote and whose writer
has died (killed mid-write) is removed the first time a process writes into that folder (only
this host's: a folder shared by several machines holds other hosts' live writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


_HOST = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname())[:40] or "host"
_TEMP = re.compile(rf"\..+\.unclip-{re.escape(_HOST)}-(\d+)\.\w{{8}}\.tmp")  # as `_temp_file` names them
_swept: set[Path] = set()  # folders whose dead writers' temporary files this process has removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine). A zombie (killed, not yet reaped by its parent,
    as a `timeout -s KILL` child is for a moment) does not: what it left is cleaned up at once."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"  # the state follows "(command)"
    except (OSError, IndexError):  # no /proc (macOS): kill's answer stands
        return True


def remove_dead_temps(directory: Path) -> None:
    """Delete the temporary files in `directory` whose writer has died (once per folder and process:
    a folder of 10,000 images is listed once, not per image)."""
    key = directory.resolve()
    if key in _swept:
        return
    _swept.add(key)
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _TEMP.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not pid_alive(int(match[1])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _temp_file(path: Path) -> str:
    """A new empty temporary file beside `path`, named for this process (`_TEMP`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.unclip-{_HOST}-{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return tmp


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside `path` that replaces it if the block ends cleanly, and is removed if not."""
    tmp = _temp_file(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that opens the file itself; on a clean exit the
    file is flushed to disk and replaces `path` atomically, on an exception it is removed.

    `torch.save` to a path writes from C++, so a Ctrl-C lands after it returns instead of inside
    one of its Python write calls (which torch turned into a RuntimeError, or an abort).
    """
    with _replacing(Path(path)) as tmp:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is untouched.
    """
    with _replacing(Path(path)) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def check_output_dir(directory: str | os.PathLike) -> None:
    """A ConfigError unless `directory` is a folder, or can become one: no file stands on its path.

    Verbs call it on their output folder before any work, so a mistyped --out is not found only
    when the first result is written.
    """
    from unclip.errors import ConfigError

    path = Path(directory)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"cannot hold {path}: it is a file"
                raise ConfigError(f"{ancestor} {where}, not a folder; give another output path")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write into {ancestor}: permission denied; give another output path")
            return


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return Path(path)


# the file suffixes `save_image_atomic` writes, and the PIL format of each
IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def save_image_atomic(path: str | os.PathLike, image, **save_kwargs) -> Path:
    """Save a PIL image; the format comes from the file suffix."""
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    with atomic_write(path, "wb") as handle:
        image.save(handle, format=fmt, **save_kwargs)
    return path
