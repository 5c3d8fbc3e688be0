import logging

import pytest
from PIL import Image

from unclip.data.folder import FolderDataset, open_square_rgb
from unclip.errors import DataError


def _image(path, colour=(200, 30, 30), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    for i in range(4):
        _image(tmp_path / f"good{i}.png", colour=(60 * i, 10, 10))
        (tmp_path / f"good{i}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    _image(tmp_path / "nocaption.png")
    _image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "garbage.txt").write_text("a broken file")
    # a JPEG cut in half
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.txt").write_text("cut short")
    sub = tmp_path / "nested"
    sub.mkdir()
    _image(sub / "deep.png", size=(30, 50))
    (sub / "deep.txt").write_text("วงกลมสีแดง", encoding="utf-8")
    return tmp_path


def test_scan_counts_and_reports_bad_files(folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(folder, size=16)
    r = ds.report
    assert r.missing_caption == ["nocaption.png"]
    assert r.bad_caption == ["empty.png"]
    assert r.corrupt == ["cut.jpg", "garbage.jpg"]
    assert len(ds) == 5  # 4 good + nested
    assert "skipped 2 corrupt or unreadable images (cut.jpg, garbage.jpg)" in r.summary()
    assert "skipped 1 empty or non-UTF-8 caption (empty.png): save captions as UTF-8 text" in r.summary()
    assert "garbage.jpg" in caplog.text


def test_iterating_never_crashes_and_counts_late_failures(folder):
    ds = FolderDataset(folder, size=16, verify=False)  # bad images are found only when decoded
    assert len(ds) == 7 and ds.report.corrupt == []
    items = [ds[i] for i in range(len(ds))]
    assert all(item["image"].shape == (3, 16, 16) for item in items)
    assert all(-1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0 for item in items)
    assert sorted(ds.report.corrupt) == ["cut.jpg", "garbage.jpg"]
    keys = {item["key"] for item in items}
    assert "nested/deep" in keys and "cut" not in keys
    deep = next(item for item in items if item["key"] == "nested/deep")
    assert deep["caption"] == "วงกลมสีแดง"


def test_dataloader_batches(folder):
    import torch

    ds = FolderDataset(folder, size=8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and len(batch["caption"]) == 3


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        FolderDataset(tmp_path / "nope", size=8)
    (tmp_path / "x.jpg").write_bytes(b"junk")
    (tmp_path / "x.txt").write_text("junk")
    with pytest.raises(DataError, match="no usable image-caption pairs"):
        FolderDataset(tmp_path, size=8)


def test_images_smaller_than_the_stage_are_upscaled_with_one_warning(folder, caplog, monkeypatch):
    import unclip.data.folder as folder_module

    monkeypatch.setattr(folder_module, "_UPSCALED", set())
    with caplog.at_level(logging.WARNING, logger="unclip.data.folder"):
        data = FolderDataset(folder, size=24)  # the smallest short side is 30
        assert data[0]["image"].shape == (3, 24, 24)
        assert "upscaled" not in caplog.text
        data = FolderDataset(folder, size=64)
        for i in range(len(data)):
            assert data[i]["image"].shape == (3, 64, 64)
    upscaled = [r for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(upscaled) == 1 and "30² (the short side) is upscaled to the 64²" in upscaled[0].getMessage()


def test_photos_are_read_upright_by_their_exif_orientation(tmp_path):
    """A phone photo stores its pixels sideways and says so in EXIF; read as stored, it trained (and was
    varied) lying on its side."""
    import torch

    stored = Image.new("RGB", (40, 20), (220, 20, 20))
    stored.paste((20, 20, 220), (0, 10, 40, 20))  # stored: red over blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to view
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    (tmp_path / "photo.txt").write_text("a photo")
    image = FolderDataset(tmp_path, size=20)[0]["image"]  # upright: 20 wide, 40 high; the centre square
    left, right = image[:, :, :5].mean(dim=(1, 2)), image[:, :, -5:].mean(dim=(1, 2))
    top, bottom = image[:, :5, :].mean(dim=(1, 2)), image[:, -5:, :].mean(dim=(1, 2))
    assert (left - right).abs().max() > 1.0 and (top - bottom).abs().max() < 0.2  # red | blue, side by side
    assert torch.isfinite(image).all()

    from unclip.pipeline.images import open_rgb

    square = Image.new("RGB", (20, 20), (220, 20, 20))
    square.paste((20, 20, 220), (0, 10, 20, 20))
    square.save(tmp_path / "square.jpg", exif=exif, quality=95)
    upright = open_rgb(tmp_path / "square.jpg")  # what vary, interpolate and inpaint read
    assert upright.getpixel((2, 10))[2] > 150 and upright.getpixel((17, 10))[0] > 150  # blue | red: turned


def test_16_bit_and_transparent_images_are_read_as_they_look(tmp_path):
    """Pillow's own RGB conversion clips 16-bit pixels (a 16-bit gradient read 99.6% white) and drops
    alpha (a transparent pixel showed the colour it hides)."""
    import numpy as np

    from unclip.pipeline.images import open_rgb
    from unclip.serve.uploads import rgb

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    clear = Image.new("RGBA", (32, 32), (200, 0, 0, 0))  # fully transparent red
    clear.paste((0, 0, 200, 255), (0, 16, 32, 32))  # an opaque blue lower half
    clear.save(tmp_path / "clear.png")
    for name in ("deep", "clear"):
        (tmp_path / f"{name}.txt").write_text("a picture")
    deep = np.asarray(open_square_rgb(tmp_path / "deep.png", 32)).astype(int)
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) > 200  # the whole ramp, not clipped
    assert abs(deep.mean() - 127.5) < 3
    for read in (lambda p: open_square_rgb(p, 32), open_rgb, lambda p: rgb(Image.open(p))):
        pixels = np.asarray(read(tmp_path / "clear.png")).astype(int)
        assert pixels[2, 2].tolist() == [255, 255, 255] and pixels[30, 2].tolist() == [0, 0, 200]
    item = FolderDataset(tmp_path, size=32)[0]["image"]  # clear.png sorts first
    assert item[:, :8].min() > 0.99  # white where it was transparent


def test_float_images_are_read_as_they_look_and_nan_ones_refused():
    """A mode-F image in [0, 1] (what float images usually hold) read as black, and NaN pixels as 0."""
    import numpy as np

    from unclip.data.shapes import to_rgb
    from unclip.errors import DataError

    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    unit, bytes_ = to_rgb(Image.fromarray(ramp, "F")), to_rgb(Image.fromarray(ramp * 255, "F"))
    assert np.array_equal(np.asarray(unit), np.asarray(bytes_)) and np.asarray(unit).max() == 255
    ramp[3, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        to_rgb(Image.fromarray(ramp, "F"))


def test_data_check_reports_what_training_will_do_with_a_folder(folder, capsys):
    import json

    from unclip.cli import main
    from unclip.data.check import check_data

    (folder / "nested" / "lonely.txt").write_text("a caption whose image went missing")
    report = check_data(str(folder), size=32, holdout=0.5, progress=False)
    assert report.usable == 5 == len(FolderDataset(folder, size=8))  # as many as training reads
    assert report.skipped == {"corrupt or unreadable images": 2, "images without a .txt caption": 1,
                              "empty or non-UTF-8 captions": 1, ".txt captions without a same-name image": 1}
    assert report.examples[".txt captions without a same-name image"] == ["nested/lonely.txt"]
    assert sorted(report.examples["corrupt or unreadable images"]) == ["cut.jpg", "garbage.jpg"]
    assert (report.smaller, report.smallest, report.not_square) == (5, 30, 5)  # 40×30 and 30×50 images
    assert report.caption_words["max"] == 3 and report.repeated_captions == 0  # "วงกลมสีแดง": วงกลม สี แดง
    assert 0 <= report.held_out <= 5
    assert main(["data", "check", str(folder), "--size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usable"] == 5
    assert main(["data", "check", str(folder), "--size", "16"]) == 0
    text = capsys.readouterr().out
    assert "5 usable image-caption pairs" in text and "skipped: 2 corrupt or unreadable images" in text
    assert "skipped: 1 empty or non-UTF-8 captions (empty.png): save captions as UTF-8 text" in text
    assert "smaller than" not in text and "5 images are not square: training keeps their centre square" in text
    assert main(["data", "check", str(folder / "nothing-here")]) == 2  # neither a folder nor shards
    (folder / "bare").mkdir()
    assert main(["data", "check", str(folder / "bare")]) == 2
    assert "pairs: it has no images (.jpg, .png, .webp, ...) with same-name .txt captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "check", str(folder), "--holdout", "2"])  # training would refuse it too
    assert "2 is not a fraction in [0, 1)" in capsys.readouterr().err
    assert main(["data", "check", str(folder), "--sheet", str(folder / "sheet.png")]) == 0
    with Image.open(folder / "sheet.png") as sheet:  # the 5 usable pairs as training reads them, captioned
        assert sheet.width >= 5 * 96 and sheet.height > 96
    assert "the first 5 pairs as training reads them" in capsys.readouterr().out
    (folder / "afile").write_text("x")  # refused before every pair is read, not as "File exists" after
    with pytest.raises(SystemExit):
        main(["data", "check", str(folder), "--sheet", str(folder / "afile" / "s.png")])
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["data", "check", str(folder), "--sheet", str(folder / "sheets") + "/"]) == 0  # was a traceback
    assert (folder / "sheets" / "sheet.png").is_file()


def test_a_png_whose_pixels_end_early_is_corrupt(tmp_path):
    import numpy as np

    from png_helpers import short_png

    from unclip.data.folder import scan_folder

    _image(tmp_path / "whole.png")
    (tmp_path / "short.png").write_bytes(short_png(np.zeros((30, 40, 3), dtype=np.uint8), rows=10))
    for name in ("whole", "short"):
        (tmp_path / f"{name}.txt").write_text(name)
    pairs, report = scan_folder(tmp_path)
    assert [p.name for p, _ in pairs] == ["whole.png"] and report.corrupt == ["short.png"]
    late = FolderDataset(tmp_path, size=16, verify=False)  # found when decoded, as training reads it
    assert len(late) == 2 and {late[i]["key"] for i in range(2)} == {"whole"}  # the damaged one is passed over
    assert late.report.corrupt == ["short.png"]
    with pytest.raises(ValueError, match="damaged PNG"):
        open_square_rgb(tmp_path / "short.png", 16)


def test_an_index_past_the_end_is_an_index_error_so_iteration_stops(folder):
    ds = FolderDataset(folder, size=8)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds[-1]
    assert [item["key"] for item in ds] == [ds[i]["key"] for i in range(len(ds))]  # wrapped round forever before


def test_a_caption_saved_with_a_byte_order_mark_reads_without_it_in_folders_and_shards(tmp_path):
    """Windows editors start UTF-8 files with U+FEFF; strip() keeps it, so it reached the tokenizer
    as an invisible first character of the caption."""
    from unclip.data.check import check_data
    from unclip.train.data import shard_item

    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert FolderDataset(tmp_path, size=8)[0]["caption"] == "a red circle"
    assert check_data(str(tmp_path), size=8, progress=False).caption_chars["max"] == len("a red circle")
    sample = {"__key__": "a", "png": (tmp_path / "a.png").read_bytes(), "txt": "\ufeffa red circle".encode("utf-8")}
    assert shard_item(sample, size=8)["caption"] == "a red circle"


def test_data_check_finds_a_jpeg_cut_short_that_the_header_check_passes(tmp_path):
    """`data check` counted such a JPEG usable; training then skipped it when it decoded it."""
    from unclip.data.check import check_data
    from unclip.data.folder import scan_folder

    image = Image.new("RGB", (200, 200), "white")
    image.paste((200, 30, 30), (50, 50, 150, 150))
    image.save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _image(tmp_path / "whole.png")
    for name in ("cut", "whole"):
        (tmp_path / f"{name}.txt").write_text(name)
    assert len(scan_folder(tmp_path)[0]) == 2  # the header check passes it; training finds it when decoding
    report = check_data(str(tmp_path), size=8, progress=False)
    assert report.usable == 1 and report.examples == {"corrupt or unreadable images": ["cut.jpg"]}
    assert (report.not_square, report.smallest) == (1, 30)  # counted over the usable image only


def test_tiff_images_are_paired_with_their_captions(tmp_path):
    """They were left out, and their captions reported as captions without an image."""
    from unclip.data.check import check_data

    _image(tmp_path / "scan.tif")
    _image(tmp_path / "photo.tiff")
    for name in ("scan", "photo"):
        (tmp_path / f"{name}.txt").write_text(f"a {name}")
    assert len(FolderDataset(tmp_path, size=8)) == 2
    report = check_data(str(tmp_path), size=8, progress=False)
    assert report.usable == 2 and report.skipped == {}


def test_a_folder_without_usable_pairs_says_what_it_holds_and_how_to_see_more(tmp_path, caplog):
    """Training said "holds no usable image-caption pairs: 0 usable image-caption pairs", after a
    warning saying the same, and left out the captions that had no image."""
    (tmp_path / "a.txt").write_text("a caption whose image is elsewhere")
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as err:
        FolderDataset(tmp_path, size=8, keep=lambda key: True, part="training pairs")
    assert str(err.value) == (f"{tmp_path} (training pairs) holds no usable image-caption pairs: skipped 1 .txt "
                              f"caption without an image (a.txt) (`unclip data check {tmp_path}` lists every problem)")
    assert caplog.text == ""
    (tmp_path / "a.txt").unlink()
    with pytest.raises(DataError, match=r"no usable image-caption pairs: it has no images \(.jpg, .jpeg, .png"):
        FolderDataset(tmp_path, size=8)


def test_skipped_files_are_reported_once_per_process_not_for_every_stage(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="unclip.data.folder"):
        for _ in range(3):  # train all's CLIP, decoder and upsampler each read the folder
            FolderDataset(folder, size=16, part="training pairs")
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1


def test_a_holdout_that_leaves_a_part_empty_is_refused_before_training(tmp_path):
    """A holdout that kept no pair of a small folder out trained CLIP, then failed evaluating it."""
    from unclip.config import DataConfig
    from unclip.data.check import check_data
    from unclip.data.export import export_webdataset
    from unclip.train.data import feed_for

    for i in range(3):
        _image(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    for holdout, what in ((1e-9, "keeps none of the 3 pairs out of training"),
                          (0.999999, "keeps all 3 pairs out of training")):
        with pytest.raises(DataError, match=what):
            feed_for(DataConfig(source="folder", path=str(tmp_path), holdout=holdout), size=8, batch_size=2)
        assert any(line.startswith(f"training refuses this: data.holdout={holdout:g} {what}")
                   for line in check_data(str(tmp_path), size=8, holdout=holdout, progress=False).lines(holdout))
    assert feed_for(DataConfig(source="folder", path=str(tmp_path), holdout=0.5), size=8, batch_size=2)
    export_webdataset(tmp_path / "wds", split="val", n=3, size=8, shard_size=3, progress=False)
    with pytest.raises(DataError, match="keeps none of the 3 pairs"):
        feed_for(DataConfig(source="webdataset", path=str(tmp_path / "wds" / "000000.tar"), holdout=1e-9),
                 size=8, batch_size=2)


def test_a_shard_sample_without_a_caption_is_logged_once_not_on_every_pass(monkeypatch, caplog):
    """The resampled stream comes back to it every pass: it was logged each time, and by `embed` too."""
    from unclip.train import data

    monkeypatch.setattr(data, "_skipped", set())
    with caplog.at_level(logging.WARNING, logger="unclip.train.data"):
        for _ in range(3):
            assert not data._has_pair({"__key__": "000027", "__url__": "data/000000.tar", "png": b""})
    assert caplog.messages == ["skipping 000027 in data/000000.tar: no image or caption"]


def test_data_check_says_when_two_images_share_a_name_and_so_one_caption(tmp_path):
    from unclip.data.check import check_data

    _image(tmp_path / "a.png")
    _image(tmp_path / "a.jpg", colour=(0, 0, 200))
    (tmp_path / "a.txt").write_text("a red square")
    report = check_data(str(tmp_path), size=8, progress=False)
    assert report.usable == 2 and report.shared_keys == ["a"]
    assert "1 name belongs to more than one image (a): each such image trains with the one caption" in \
        "\n".join(report.lines())
