"""Own data (a caption folder, webdataset shards): what the tokenizer learns from and what
`unclip data check` says, both over the pairs training can use."""

import io
import logging
import tarfile

import pytest
from PIL import Image

from unclip.config import preset


def _png(colour=(200, 30, 30), size=(24, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def _cut_jpeg() -> bytes:
    """A JPEG cut short: its header verifies, and decoding it fails, as training finds."""
    image = Image.new("RGB", (200, 200), "white")
    image.paste((200, 30, 30), (50, 50, 150, 150))
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]


# name → (image bytes or None, caption bytes or None); the zebra, giraffe and walrus pairs are skipped by training
PAIRS = {
    "a": (_png((200, 30, 30)), b"a red circle"),
    "b": (_png((30, 200, 30)), b"a green square"),
    "c": (_png((30, 30, 200)), b"a blue triangle"),
    "d": (b"not an image at all", b"a zebra"),
    "e": (_cut_jpeg(), b"a giraffe"),
    "f": (_png(), "a walrus".encode("utf-16")),
}
SKIPPED_WORDS = {"zebra", "giraffe", "walrus"}


def _folder(root):
    root.mkdir()
    for name, (image, caption) in PAIRS.items():
        (root / f"{name}.{'jpg' if name in 'de' else 'png'}").write_bytes(image)
        (root / f"{name}.txt").write_bytes(caption)
    return str(root)


def _shards(root):
    root.mkdir()
    with tarfile.open(root / "000000.tar", "w") as tar:
        for name, (image, caption) in PAIRS.items():
            for suffix, data in (("jpg" if name in "de" else "png", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{name}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root / "000000.tar")


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_the_tokenizer_and_its_words_come_from_the_pairs_training_can_use(tmp_path, source):
    """A pair whose image does not decode, or whose caption is not UTF-8, gave the words of its
    caption to `tokenizer/words.json` although training never reads it."""
    from unclip.clip.stage import run_tokenizer
    from unclip.words import CaptionWords

    path = _folder(tmp_path / "data") if source == "folder" else _shards(tmp_path / "data")
    cfg = preset("tiny").override([f"data.source={source}", f"data.path={path}"])
    tokenizer = run_tokenizer(cfg, tmp_path / "run")
    assert tokenizer.words.captions == 3
    assert not SKIPPED_WORDS & tokenizer.words.words
    assert {"red", "green", "blue", "circle"} <= tokenizer.words.words
    assert CaptionWords.load(tmp_path / "run" / "tokenizer") == tokenizer.words


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_data_check_reports_each_skipped_pair_once(tmp_path, source, monkeypatch, capsys, caplog):
    """With --sheet the readers training uses drew the sheet and logged the skipped pairs again on
    stderr, after the printed report had listed them."""
    from unclip.cli import main
    from unclip.train import data

    monkeypatch.setattr(data, "_skipped", set())  # the shard reader logs only the first few of a process
    path = _folder(tmp_path / "data") if source == "folder" else _shards(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        assert main(["data", "check", path, "--size", "16", "--sheet", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out
    assert "3 usable image-caption pairs" in out and "the first 3 pairs as training reads them" in out
    assert "skipped: 2 corrupt or unreadable images" in out and "skipped: 1 empty or non-UTF-8 captions" in out
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.width >= 3 * 96


def test_a_folder_of_shards_is_named_with_the_pattern_that_reads_it(tmp_path, capsys):
    """`unclip data check out/data/shapes` on the shards `data export` just wrote said only that the folder
    had no images with captions; the export now prints the pattern, and the refusal gives it too."""
    from unclip.cli import main

    assert main(["data", "export", "--out", str(tmp_path / "shards"), "-n", "12", "--size", "16",
                 "--shard-size", "5"]) == 0
    pattern = f"{tmp_path / 'shards'}/{{000000..000002}}.tar"
    assert f"read them as '{pattern}'" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "shards")]) == 2
    assert f"it holds 3 webdataset shard(s): give them as '{pattern}'" in capsys.readouterr().err
    assert main(["data", "check", pattern]) == 0
    assert "12 usable image-caption pairs" in capsys.readouterr().out
