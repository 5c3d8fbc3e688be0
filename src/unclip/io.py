"""Atomic file writes: a crash mid-write leaves the previous file intact.

Every file unclip writes (checkpoints, model files, shards, images, reports) goes through
`atomic_write`: the bytes land in a temporary file beside the target, are flushed to disk,
and replace the target in one `os.replace`, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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


def save_image_atomic(path: str | os.PathLike, image, **save_kwargs) -> Path:
    """Save a PIL image; the format comes from the file suffix."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower())
    with atomic_write(path, "wb") as handle:
        image.save(handle, format=fmt, **save_kwargs)
    return path
