"""`unclip data check`: what a caption folder or webdataset shards hold, before hours of training.

It reads every pair the way training will (`unclip.data.folder`, `unclip.train.data`) without
decoding more than it must: image headers for sizes and EXIF orientation, a full decode only to
find the images that cannot be read. The report says how many pairs are usable, which are
skipped and why (the first few by name), how many images training will upscale, crop or turn
upright, how long the captions are, and how many pairs a `data.holdout` would keep out.

`usable_pairs` is that reading, pair by pair and silent (the report, not the log, names what it
leaves out); a CLIP run's tokenizer learns the captions of the first pairs it gives.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from unclip.data.folder import SKIP_FIXES
from unclip.errors import DataError

SHOWN = 5  # file names listed per kind of problem
EXIF_ORIENTATION = 0x0112


@dataclass
class DataReport:
    source: str
    path: str
    size: int  # the resolution checked against (the largest a stage will train at)
    usable: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # why → how many
    examples: dict[str, list[str]] = field(default_factory=dict)  # why → the first SHOWN names
    smaller: int = 0  # images whose short side is under `size`: upscaled in training
    smallest: int | None = None  # the shortest short side
    not_square: int = 0  # centre-cropped in training
    rotated: int = 0  # EXIF orientation other than upright: turned upright in training
    caption_words: dict[str, float] = field(default_factory=dict)  # median, 95th percentile, longest
    caption_chars: dict[str, float] = field(default_factory=dict)
    repeated_captions: int = 0  # pairs whose caption another pair has too
    shared_keys: list[str] = field(default_factory=list)  # keys two or more usable images have (a.png + a.jpg)
    held_out: int | None = None  # with a data.holdout fraction: the usable pairs it keeps out

    def skip(self, why: str, name: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1
        names = self.examples.setdefault(why, [])
        if len(names) < SHOWN:
            names.append(name)

    def lines(self, holdout: float = 0.0) -> list[str]:
        """The report as sentences, each with what training does about it."""
        out = [f"{self.usable} usable image-caption pairs in {self.path} ({self.source})"]
        for why, count in self.skipped.items():
            shown = ", ".join(self.examples[why]) + (", ..." if count > len(self.examples[why]) else "")
            out.append(f"skipped: {count} {why} ({shown})" + (f": {SKIP_FIXES[why]}" if why in SKIP_FIXES else ""))
        if self.smaller:
            out.append(f"{self.smaller} images are smaller than {self.size}² (the smallest {self.smallest}²): "
                       f"training at {self.size}² upscales them, which teaches blur; train that stage smaller or "
                       "use larger images")
        if self.not_square:
            out.append(f"{self.not_square} images are not square: training keeps their centre square")
        if self.rotated:
            out.append(f"{self.rotated} photos carry an EXIF rotation: training reads them upright")
        if self.caption_words:
            w, c = self.caption_words, self.caption_chars
            out.append(f"captions: median {w['median']:.0f} words ({c['median']:.0f} characters), 95% within "
                       f"{w['p95']:.0f} words, the longest {w['max']:.0f} words ({c['max']:.0f} characters)")
        if self.repeated_captions:
            out.append(f"{self.repeated_captions} pairs share their caption with another pair")
        if self.shared_keys:
            shown = ", ".join(self.shared_keys[:SHOWN]) + (", ..." if len(self.shared_keys) > SHOWN else "")
            many = len(self.shared_keys) > 1
            out.append(f"{len(self.shared_keys)} name{'s' if many else ''} belong{'' if many else 's'} to more than "
                       f"one image ({shown}): each such image "
                       "trains with the one caption of that name and is held out or kept with it; rename the "
                       "images that have captions of their own")
        if self.held_out is not None:
            from unclip.train.data import holdout_problem

            problem = holdout_problem(self.held_out, self.usable, holdout)
            out.append(f"training refuses this: {problem}" if problem else
                       f"data.holdout={holdout} keeps {self.held_out} of the {self.usable} pairs out of training")
        return out


def _source(path: str) -> str:
    if Path(path).is_dir():
        return "folder"
    if ".tar" in path:
        return "webdataset"
    if not Path(path).exists():
        raise DataError(f"{path} does not exist; give a folder of images with same-name .txt captions, or a "
                        "shard pattern like 'DIR/{000000..000099}.tar'")
    raise DataError(f"{path} is neither a folder of images with .txt captions nor a shard pattern like "
                    "'DIR/{000000..000099}.tar'")


def _look(report: DataReport, image) -> None:
    """Size, shape and orientation of one opened (not yet decoded) image."""
    side = min(image.size)
    if side < report.size:
        report.smaller += 1
    report.smallest = side if report.smallest is None else min(report.smallest, side)
    if image.width != image.height:
        report.not_square += 1
    if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        report.rotated += 1


def usable_pairs(path: str, *, source: str, keep: Callable[[str], bool] | None = None,
                 skip: Callable[[str, str], None] | None = None,
                 progress: bool = False) -> Iterator[tuple[str, str, bytes]]:
    """The pairs of a caption folder or of webdataset shards (`source`) that training can use, as
    (key, caption, image file bytes), in file or shard order, without logging.

    A pair is left out for what makes training skip it: no image or no caption, a caption that is
    empty or not UTF-8 (`caption_text`), an image whose file does not verify or that does not decode.
    Images are checked and decoded (not resized) only as the pairs are taken, so taking the first n
    decodes about n images. keep: only the pairs whose key it accepts (the others are not read);
    skip(why, name): told of each pair left out."""
    from unclip.data.folder import caption_text, pair_key, scan_folder, unreadable_errors, verified_bytes
    from unclip.data.png import check_complete, open_bytes
    from unclip.train.data import IMAGE_EXTENSIONS, shard_urls

    skip = skip or (lambda why, name: None)
    if not path:
        raise DataError("no data path: give a folder of images with same-name .txt captions, or a shard pattern "
                        "like 'DIR/{000000..000099}.tar'")
    if source == "folder":
        pairs, scanned = scan_folder(path, verify=False, keep=keep)  # names and captions; images below
        for why, names in (("images without a .txt caption", scanned.missing_caption),
                           ("empty or non-UTF-8 captions", scanned.bad_caption),
                           (".txt captions without a same-name image", scanned.orphan_captions)):
            for name in names:
                skip(why, name)
        for image_path, caption in tqdm(pairs, desc="check", unit="pair", disable=not progress):
            try:
                data = verified_bytes(image_path)
                with open_bytes(data) as image:
                    image.load()  # a JPEG cut short passes the verification and fails here, as in training
            except unreadable_errors():
                skip("corrupt or unreadable images", str(image_path.relative_to(path)))
                continue
            yield pair_key(Path(path), image_path), caption, data
        return
    import webdataset as wds

    samples = wds.DataPipeline(wds.SimpleShardList(shard_urls(path)), wds.tarfile_to_samples())
    for sample in tqdm(samples, desc="check", unit="pair", disable=not progress):
        if keep is not None and not keep(sample["__key__"]):
            continue
        name = f"{Path(sample.get('__url__', '')).name}:{sample['__key__']}"
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None or "txt" not in sample:
            skip("samples without an image or a caption", name)
            continue
        if (caption := caption_text(sample["txt"])) is None:
            skip("empty or non-UTF-8 captions", name)
            continue
        try:
            check_complete(data)
            with open_bytes(data) as image:
                image.load()  # a cut or garbage file fails here, as it would in training
        except unreadable_errors():
            skip("corrupt or unreadable images", name)
            continue
        yield sample["__key__"], caption, data


def first_usable(path: str, n: int, *, source: str, size: int) -> tuple[list, list[str]]:
    """The first n usable pairs as training reads them: square RGB PIL images of size² and captions."""
    import io
    from itertools import islice

    from unclip.data.folder import open_square_rgb

    images, captions = [], []
    for _, caption, data in islice(usable_pairs(path, source=source), n):
        images.append(open_square_rgb(io.BytesIO(data), size))
        captions.append(caption)
    return images, captions


def check_data(path: str, *, size: int = 128, holdout: float = 0.0, progress: bool = True) -> DataReport:
    """Read every pair of a caption folder or of webdataset shards as training would; see the module
    docstring. size: the largest resolution a stage will train at (the shapes preset's upsampler: 128)."""
    from unclip.data.png import open_bytes
    from unclip.data.vocabulary import caption_words
    from unclip.tokenizer import has_thai
    from unclip.train.data import held_out

    source = _source(path)
    report = DataReport(source=source, path=path, size=size)
    words, chars, captions = [], [], Counter()
    kept_out = 0
    keys = Counter()
    for key, caption, data in usable_pairs(path, source=source, skip=report.skip, progress=progress):
        with open_bytes(data) as image:  # the header only: decoded already
            _look(report, image)
        keys[key] += 1
        report.usable += 1
        words.append(len(caption_words(caption)) if has_thai(caption) else len(caption.split()))  # Thai: no spaces
        chars.append(len(caption))
        captions[caption] += 1
        kept_out += held_out(key, holdout)
    if not report.usable:
        found = "; ".join(report.lines()[1:]) or (
            "it has no images (.jpg, .png, .webp, ...) with same-name .txt captions" if source == "folder"
            else "its shards hold no samples")
        from unclip.data.folder import shards_hint

        raise DataError(f"{path} holds no usable image-caption pairs: {found}"
                        f"{shards_hint(path) if source == 'folder' else ''}")
    for name, values in (("caption_words", words), ("caption_chars", chars)):
        ordered = sorted(values)
        setattr(report, name, {"median": statistics.median(ordered), "p95": ordered[int(0.95 * (len(ordered) - 1))],
                               "max": ordered[-1]})
    report.repeated_captions = sum(n for n in captions.values() if n > 1)
    report.shared_keys = [key for key, n in keys.items() if n > 1]
    report.held_out = kept_out if holdout > 0 else None
    return report
