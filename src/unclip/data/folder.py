"""A folder of images with same-name captions: `cat.jpg` + `cat.txt`, searched recursively.

Bad files never crash a run. At scan time, images without a caption, with an empty or
undecodable caption, or whose header does not verify are skipped and counted; at load time an
image that still fails to decode (a truncated JPEG passes the header check) is skipped in favour
of the next one and counted too. `FolderDataset.report` holds the counts and names and
`summary()` says them in one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from unclip.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# what to do about a kind of skipped file, where the kind alone does not say it (also `unclip data check`)
SKIP_FIXES = {"empty or non-UTF-8 captions": "save captions as UTF-8 text (a Latin-1 or UTF-16 file reads as non-UTF-8)"}


@dataclass
class FolderReport:
    """What a scan (and later loads, in this process) found unusable, by file name."""

    usable: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    bad_caption: list[str] = field(default_factory=list)
    orphan_captions: list[str] = field(default_factory=list)  # .txt files with no same-name image

    @property
    def skipped(self) -> int:
        return len(self.corrupt) + len(self.missing_caption) + len(self.bad_caption)

    def summary(self) -> str:
        parts = [f"{self.usable} usable image-caption pairs"]
        for one, many, names in (("corrupt or unreadable image", "corrupt or unreadable images", self.corrupt),
                                 ("image without a .txt caption", "images without a .txt caption", self.missing_caption),
                                 ("empty or non-UTF-8 caption", "empty or non-UTF-8 captions", self.bad_caption),
                                 (".txt caption without an image", ".txt captions without an image",
                                  self.orphan_captions)):
            if names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                fix = f": {SKIP_FIXES[many]}" if many in SKIP_FIXES else ""
                parts.append(f"skipped {len(names)} {one if len(names) == 1 else many} ({shown}){fix}")
        return "; ".join(parts)


def caption_text(data: bytes) -> str | None:
    """A caption file's text, stripped, without the byte-order mark some editors put first (it would
    reach the tokenizer as an invisible character); None when empty or not UTF-8. Every source reads
    captions through this."""
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def _read_caption(path: Path) -> str | None:
    try:
        return caption_text(path.read_bytes())
    except OSError:
        return None


_UPSCALED: set[int] = set()  # sizes this process has warned about
_REPORTED: set[tuple[str, str]] = set()  # (folder and part, summary) pairs this process has logged


def _note_upscaled(side: int, size: int) -> None:
    """Warn once per process and size that images smaller than the stage's resolution are upscaled."""
    if size not in _UPSCALED:
        _UPSCALED.add(size)
        log.warning("an image of %d² (the short side) is upscaled to the %d² the model reads; it sees a "
                    "blurred image (in training, images smaller than that teach it blur: give larger images, "
                    "or train this stage at a lower resolution)", side, size)


def open_square_rgb(path: str | Path | IO[bytes], size: int):
    """Decode `path` (or a binary file object), centre-crop to a square and resize to size×size RGB
    (PIL image). A damaged image raises one of `unreadable_errors()`."""
    from PIL import Image, ImageOps

    from unclip.data.png import check_complete, open_bytes, read_checked
    from unclip.data.shapes import to_rgb

    if isinstance(path, (str, os.PathLike)):
        data = read_checked(path)
    else:
        data = path.read()
        check_complete(data)
    with open_bytes(data) as image:
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))  # a phone photo's EXIF says which way is up
    side = min(image.size)
    if side < size:
        _note_upscaled(side, size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def unreadable_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def pair_key(root: Path, image_path: Path) -> str:
    """A pair's key: its image's path under the folder, without suffix ("sub/0042")."""
    return image_path.relative_to(root).with_suffix("").as_posix()


def verified_bytes(path: str | Path) -> bytes:
    """The bytes of the image file at `path` once its chunks verify (`Image.verify`) and, for a PNG,
    every row is there (`read_checked`): the check a scan makes. A damaged file raises one of
    `unreadable_errors()`; a JPEG cut short can pass and fail only when decoded."""
    from unclip.data.png import open_bytes, read_checked

    data = read_checked(path)
    with open_bytes(data) as image:
        image.verify()
    return data


def shard_pattern(shards: list[Path]) -> str:
    """The pattern that reads these shards (sorted paths in one folder): 'DIR/{000000..000004}.tar'
    when their names are consecutive numbers of one width, else the first one's path."""
    stems = [p.stem for p in shards]
    consecutive = all(s.isdigit() and len(s) == len(stems[0]) for s in stems) and \
        [int(s) for s in stems] == list(range(int(stems[0]), int(stems[0]) + len(stems)))
    return f"{shards[0].parent}/{{{stems[0]}..{stems[-1]}}}.tar" if consecutive else str(shards[0])


def shards_hint(root: str | Path) -> str:
    """For a folder of webdataset shards read as a caption folder: how to give them ("; it holds
    webdataset shards: give them as 'DIR/{000000..000004}.tar' …"), else ""."""
    shards = sorted(Path(root).glob("*.tar"))
    if not shards:
        return ""
    return (f"; it holds {len(shards)} webdataset shard(s): give them as '{shard_pattern(shards)}' (training: "
            "--set data.source=webdataset --set data.path=that)")


def scan_folder(root: str | Path, *, verify: bool = True,
                keep: Callable[[str], bool] | None = None) -> tuple[list[tuple[Path, str]], FolderReport]:
    """Find usable (image, caption) pairs under `root`, sorted by path; with `keep`, only those
    whose key (the path under `root` without suffix) it accepts. verify: check each image's file
    (`verified_bytes`); without it, only names and captions are read."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected a folder of images with same-name .txt captions")
    report = FolderReport()
    pairs = []
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = {p.with_suffix("") for p in images}
    report.orphan_captions = [str(t.relative_to(root)) for t in sorted(root.rglob("*.txt"))
                              if t.is_file() and t.with_suffix("") not in stems
                              and (keep is None or keep(t.relative_to(root).with_suffix("").as_posix()))]
    for path in images:
        name = str(path.relative_to(root))
        if keep is not None and not keep(pair_key(root, path)):
            continue
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            report.missing_caption.append(name)
            continue
        caption = _read_caption(caption_path)
        if caption is None:
            report.bad_caption.append(name)
            continue
        if verify:
            try:
                verified_bytes(path)
            except unreadable_errors():
                report.corrupt.append(name)
                continue
        pairs.append((path, caption))
    report.usable = len(pairs)
    return pairs, report


class FolderDataset:
    """Map-style dataset over a caption folder; item i → dict(image, caption, key).

    image: float32 tensor [3, size, size] in [-1, 1]; key: the path relative to the root,
    without suffix. A torch `Dataset` by duck typing (DataLoader needs only len and getitem).
    """

    def __init__(self, root: str | Path, *, size: int, verify: bool = True, keep: Callable[[str], bool] | None = None,
                 part: str = ""):
        """part: which part of the folder `keep` selects ("training pairs", "held-out pairs"), for the log."""
        self.root = Path(root)
        self.size = size
        self.pairs, self.report = scan_folder(self.root, verify=verify, keep=keep)
        where = f"{self.root}{f' ({part})' if part else ''}"
        if not self.pairs:
            found = self.report.summary().partition("; ")[2] or (
                f"it has no images ({', '.join(IMAGE_SUFFIXES)}) with same-name .txt captions, in it or below")
            raise DataError(f"{where} holds no usable image-caption pairs: {found}{shards_hint(self.root)} (`unclip "
                            f"data check {self.root}` lists every problem)")
        if (self.report.skipped or self.report.orphan_captions) and (where, self.report.summary()) not in _REPORTED:
            _REPORTED.add((where, self.report.summary()))  # once per process, not again for every stage
            log.warning("%s: %s", where, self.report.summary())

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        from unclip.data.shapes import to_tensor

        if not 0 <= index < len(self.pairs):  # else `for item in dataset` would wrap round forever
            raise IndexError(index)
        for offset in range(len(self.pairs)):
            path, caption = self.pairs[(index + offset) % len(self.pairs)]
            try:
                image = open_square_rgb(path, self.size)
            except unreadable_errors() as err:
                name = str(path.relative_to(self.root))
                if name not in self.report.corrupt:
                    self.report.corrupt.append(name)
                    log.warning("skipping unreadable image %s: %s", path, err)
                continue
            key = pair_key(self.root, path)
            return {"image": to_tensor(image), "caption": caption, "key": key}
        raise DataError(f"no image under {self.root} could be decoded: {self.report.summary()}")
