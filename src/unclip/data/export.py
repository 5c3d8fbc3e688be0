"""Write shapes world to disk: webdataset shards (img2dataset layout) or a caption folder.

Shards are `000000.tar`, `000001.tar`, ... holding `KEY.jpg`, `KEY.txt` (the caption) and
`KEY.json` (key, caption, lang, scene, split, index, width, height), with `000000_stats.json`
beside each. KEY is the sample's 9-digit global index. Each shard and file is written
atomically, so an interrupted export leaves only whole shards. Run again with the same settings,
an export keeps each shard its stats file vouches for (same settings, same sha256) and writes the
rest, so an interrupted one resumes. A folder export does the same per sample: KEY.json is removed
before KEY.png and KEY.txt are written and written after them, so one that records what these
settings make of the sample (scene, caption, size) vouches for the two beside it, which are kept.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from unclip.data.render import render
from unclip.data.world import SPLIT_LENGTHS, SPLITS, Sample, sample
from unclip.errors import DataError
from unclip.io import atomic_write, remove_dead_temps, save_image_atomic, write_json_atomic
from unclip.modeldir import file_record

log = logging.getLogger(__name__)


def _check(split: str, n: int, size: int, lang: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if lang not in ("en", "th", "mix"):
        raise DataError(f"unknown caption language {lang!r}; use en, th or mix")
    if n < 1:
        raise DataError(f"-n {n}: export at least one sample")
    if size < 8:
        raise DataError(f"--size {size} is too small; use at least 8 pixels")
    if split in SPLIT_LENGTHS and n > SPLIT_LENGTHS[split]:
        raise DataError(f"split {split!r} has {SPLIT_LENGTHS[split]} samples; -n {n} asks for more")


SHARD_FILE = re.compile(r"(\d{6})(?:\.tar|_stats\.json)")
FOLDER_FILE = re.compile(r"(\d{9})\.(?:png|txt|json)")


def _check_leftovers(out_dir: Path, pattern: re.Pattern, count: int, n: int) -> None:
    """Refuse an export whose folder holds numbered files of an earlier, larger export (number ≥
    `count`): left beside the new ones, they would be read as part of it."""
    if not out_dir.is_dir():
        return
    extra = sorted(p.name for p in out_dir.iterdir() if (m := pattern.fullmatch(p.name)) and int(m[1]) >= count)
    if extra:
        raise DataError(f"{out_dir} already holds {len(extra)} files of an earlier, larger export ({', '.join(extra[:3])}"
                        f"{', …' if len(extra) > 3 else ''}) that an export of -n {n} would leave beside its own; "
                        "remove them or export to another folder")


def _meta(s: Sample, *, size: int) -> dict:
    """What KEY.json holds for sample `s` drawn at side `size`."""
    return {"key": f"{s.index:09d}", "caption": s.caption, "lang": s.lang, "scene": s.scene.to_dict(),
            "split": s.split, "index": s.index, "width": size, "height": size, "status": "success"}


def _record(split: str, index: int, *, size: int, seed: int, lang: str):
    s = sample(split, index, seed=seed, lang=lang)
    meta = _meta(s, size=size)
    return meta["key"], render(s.scene, size), s.caption, meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic archives
    tar.addfile(info, io.BytesIO(data))


def _kept_shard(path: Path, stats: Path, settings: dict) -> bool:
    """Whether the shard at `path` is whole and of `settings`: its stats file (written after it)
    records them and the shard's sha256."""
    try:
        recorded = json.loads(stats.read_text(encoding="utf-8"))
        return all(recorded.get(k) == v for k, v in settings.items()) and \
            recorded.get("sha256") == file_record(path)["sha256"]
    except (OSError, ValueError, AttributeError):
        return False


def export_webdataset(out_dir: str | Path, *, split: str, n: int, size: int, seed: int = 0, lang: str = "mix",
                      shard_size: int = 1000, quality: int = 95, progress: bool = True) -> list[Path]:
    """Write samples 0..n-1 of `split` as tar shards of `shard_size` JPEGs; returns the shard paths.

    Each shard is built in a temporary file and renamed into place only when complete; a shard an
    earlier export of the same settings finished is kept (module docstring).
    """
    _check(split, n, size, lang)
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size} must be at least 1")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality} is not a JPEG quality; use 1..100 (95 keeps colours exact enough)")
    out_dir = Path(out_dir)
    _check_leftovers(out_dir, SHARD_FILE, -(-n // shard_size), n)
    shards, kept = [], 0
    bar = tqdm(total=n, desc="export", unit="img", disable=None if progress else True)
    for shard, start in enumerate(range(0, n, shard_size)):
        path, stats = out_dir / f"{shard:06d}.tar", out_dir / f"{shard:06d}_stats.json"
        began = time.perf_counter()
        count = min(shard_size, n - start)
        settings = {"count": count, "split": split, "first_index": start, "seed": seed, "lang": lang, "size": size,
                    "quality": quality}
        if _kept_shard(path, stats, settings):
            shards.append(path)
            kept += 1
            bar.update(count)
            continue
        with atomic_write(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
            for index in range(start, start + count):
                key, image, text, meta = _record(split, index, size=size, seed=seed, lang=lang)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=quality)
                _add(tar, f"{key}.jpg", buffer.getvalue())
                _add(tar, f"{key}.txt", text.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                bar.update(1)
        write_json_atomic(stats, {**settings, "successes": count, "failed_to_download": 0,
                                  "duration": round(time.perf_counter() - began, 3), **file_record(path)})
        shards.append(path)
    bar.close()
    if kept:
        log.info("kept %d of %d shard(s), written whole with these settings before", kept, len(shards))
    return shards


def _kept_sample(out_dir: Path, meta: dict) -> bool:
    """Whether KEY.png and KEY.txt in `out_dir` are whole and of `meta`: KEY.json, removed before they
    are written and written after them (`export_folder`), records `meta` and is not older than
    them. The scene, the caption and the side fix the image, so equal records mean equal files."""
    key = meta["key"]
    record = out_dir / f"{key}.json"
    try:
        if json.loads(record.read_text(encoding="utf-8")) != json.loads(json.dumps(meta)):  # tuples read as lists
            return False
        written = record.stat().st_mtime_ns
        return all((out_dir / f"{key}{suffix}").stat().st_mtime_ns <= written for suffix in (".png", ".txt"))
    except (OSError, ValueError):
        return False


def export_folder(out_dir: str | Path, *, split: str, n: int, size: int, seed: int = 0, lang: str = "mix",
                  progress: bool = True) -> Path:
    """Write samples 0..n-1 of `split` as KEY.png + KEY.txt + KEY.json in `out_dir`; returns it.

    A sample an earlier export of the same settings wrote whole is kept (module docstring), so an
    interrupted export run again finishes with the files an uninterrupted one writes.
    """
    _check(split, n, size, lang)
    out_dir = Path(out_dir)
    _check_leftovers(out_dir, FOLDER_FILE, n, n)
    if out_dir.is_dir():
        remove_dead_temps(out_dir)  # what a killed write left, also when every sample is kept
    kept = 0
    for index in tqdm(range(n), desc="export", unit="img", disable=None if progress else True):
        s = sample(split, index, seed=seed, lang=lang)
        meta = _meta(s, size=size)
        if _kept_sample(out_dir, meta):
            kept += 1
            continue
        key = meta["key"]
        (out_dir / f"{key}.json").unlink(missing_ok=True)  # until it is written again, nothing vouches for the two
        save_image_atomic(out_dir / f"{key}.png", render(s.scene, size))
        with atomic_write(out_dir / f"{key}.txt", "w") as handle:
            handle.write(s.caption)
        write_json_atomic(out_dir / f"{key}.json", meta)
    if kept:
        log.info("kept %d of %d sample(s), written whole with these settings before", kept, n)
    return out_dir
