import json
import tarfile

import pytest

from unclip.cli import main
from unclip.data import export
from unclip.data.export import export_folder, export_webdataset


def test_webdataset_shards_are_readable_and_aligned(tmp_path):
    import webdataset as wds

    shards = export_webdataset(tmp_path, split="val", n=25, size=16, shard_size=10, progress=False)
    assert [p.name for p in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False)
                   .decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(samples) == 25
    for key, image, text, meta in samples:
        assert meta["key"] == key and meta["caption"] == text and image.size == (16, 16)
    assert [s[0] for s in samples] == [f"{i:09d}" for i in range(25)]
    assert json.loads((tmp_path / "000002_stats.json").read_text())["count"] == 5


def test_folder_export_pairs(tmp_path):
    export_folder(tmp_path, split="test", n=4, size=16, lang="th", progress=False)
    images = sorted(p.stem for p in tmp_path.glob("*.png"))
    assert images == sorted(p.stem for p in tmp_path.glob("*.txt")) and len(images) == 4
    from unclip.data.folder import FolderDataset

    ds = FolderDataset(tmp_path, size=16)
    assert len(ds) == 4 and ds.report.skipped == 0


def test_crash_mid_shard_leaves_no_partial_tar(tmp_path, monkeypatch):
    export_webdataset(tmp_path, split="val", n=10, size=8, shard_size=10, progress=False)
    before = (tmp_path / "000000.tar").read_bytes()
    calls = {"n": 0}
    real = export._add

    def failing(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full")
        real(tar, name, data)

    monkeypatch.setattr(export, "_add", failing)
    with pytest.raises(OSError, match="disk full"):
        export_webdataset(tmp_path, split="val", n=20, size=8, shard_size=10, progress=False, lang="th")
    assert (tmp_path / "000000.tar").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar", "000000_stats.json"]
    with tarfile.open(tmp_path / "000000.tar") as tar:
        assert len(tar.getnames()) == 30


def test_an_interrupted_export_keeps_the_shards_it_finished_and_no_others(tmp_path, monkeypatch):
    """Rerun after a stop, an export rendered every shard again (hours for a big one); it keeps each
    shard its stats file vouches for, and not one whose stats file is another export's."""
    export_webdataset(tmp_path, split="val", n=30, size=8, shard_size=10, progress=False)
    first = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    write_json = export.write_json_atomic

    def stopped_before_the_second_stats(path, obj):
        if path.name == "000001_stats.json":
            raise KeyboardInterrupt
        return write_json(path, obj)

    with monkeypatch.context() as stop:  # a Thai export over it, stopped between shard 1 and its stats
        stop.setattr(export, "write_json_atomic", stopped_before_the_second_stats)
        with pytest.raises(KeyboardInterrupt):
            export_webdataset(tmp_path, split="val", n=30, size=8, shard_size=10, progress=False, lang="th")
    rendered, record = [], export._record

    def counted(split, index, **kwargs):
        rendered.append(index)
        return record(split, index, **kwargs)

    monkeypatch.setattr(export, "_record", counted)
    export_webdataset(tmp_path, split="val", n=30, size=8, shard_size=10, progress=False)
    assert rendered == list(range(20))  # shard 0 is Thai, shard 1 Thai under English stats; shard 2 kept
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == first
    rendered.clear()
    export_webdataset(tmp_path, split="val", n=30, size=8, shard_size=10, progress=False)
    assert rendered == []  # all whole: nothing rendered again


def test_an_interrupted_folder_export_keeps_the_samples_it_finished_and_no_others(tmp_path, monkeypatch):
    """Rerun after a stop, a folder export wrote every file again; it keeps each sample whose KEY.json
    (written after its image and caption) records these settings' sample, and no other."""
    whole, out = tmp_path / "whole", tmp_path / "out"
    export_folder(whole, split="val", n=6, size=8, progress=False)
    export_folder(out, split="val", n=6, size=8, progress=False, lang="th")  # another export's samples there
    save_image = export.save_image_atomic

    def stopped_at_the_third(path, image, **kwargs):
        save_image(path, image, **kwargs)
        if path.name == "000000002.png":  # its image written, its caption and record not
            raise KeyboardInterrupt

    with monkeypatch.context() as stop:
        stop.setattr(export, "save_image_atomic", stopped_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            export_folder(out, split="val", n=6, size=8, progress=False)
    assert not (out / "000000002.json").exists()  # the Thai record went before the English image came
    written, save_image = [], export.save_image_atomic

    def counted(path, image, **kwargs):
        written.append(path.name)
        return save_image(path, image, **kwargs)

    monkeypatch.setattr(export, "save_image_atomic", counted)
    export_folder(out, split="val", n=6, size=8, progress=False)
    assert written == [f"00000000{i}.png" for i in range(2, 6)]  # 0 and 1 kept; 3-5 are the Thai export's
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}
    written.clear()
    export_folder(out, split="val", n=6, size=8, progress=False)
    assert written == []  # all whole: nothing written again


def test_cli_preview_and_export(tmp_path, capsys):
    assert main(["data", "preview", "-n", "3", "--size", "32", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["data", "export", "--out", str(tmp_path / "wds"), "-n", "5", "--size", "16"]) == 0
    assert (tmp_path / "wds" / "000000.tar").is_file()
    assert main(["data", "export", "--out", str(tmp_path / "f"), "--format", "folder", "-n", "2", "--size", "8"]) == 0
    assert len(list((tmp_path / "f").glob("*.png"))) == 2
    assert main(["data", "export", "--out", str(tmp_path / "x"), "--split", "val", "-n", "999999"]) == 2
    assert "has 5000 samples" in capsys.readouterr().err
    for bad, message in ((["--split", "training"], "valid splits: train, val, test, unseen"),
                         (["--lang", "de"], "use en, th or mix")):
        assert main(["data", "export", "--out", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err
    for bad, message in ((["--size", "4"], "4 is out of range: give 8 to 1024"), (["-n", "0"], "0 is too small")):
        with pytest.raises(SystemExit):  # refused by the argument's type, before anything runs
            main(["data", "export", "--out", str(tmp_path / "bad"), *bad])
        assert message in capsys.readouterr().err
    assert main(["data", "preview", "--split", "nope", "--out", str(tmp_path / "bad.png")]) == 2
    assert "valid splits" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.png").exists()
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "demo"), "-n", "2"]) == 0
    assert (tmp_path / "demo" / "shapes_world.png").is_file()
    from unclip.precision import native_bf16

    said = capsys.readouterr().out  # why it is slower where bf16 would be emulated, and only there
    assert "4 images from the shipped model in" in said
    assert ("in float32: this CPU has no bfloat16 units" in said) == (not native_bf16("cpu")), said


def test_preview_out_takes_a_folder_and_refuses_what_is_no_picture(tmp_path, capsys):
    """`--out out/` or `--out existing_folder` was a ValueError traceback ("unknown file extension: .tmp")."""
    (tmp_path / "afile").write_text("x")
    assert main(["data", "preview", "-n", "1", "--size", "8", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "preview.png").is_file()
    assert main(["data", "preview", "-n", "1", "--size", "8", "--out", str(tmp_path / "new") + "/"]) == 0
    assert (tmp_path / "new" / "preview.png").is_file()
    for out, message in ((tmp_path / "p.gif", "give a .png (or .jpg, .webp) path, or a folder"),
                         (tmp_path / "afile" / "p.png", "afile is a file, not a folder")):
        with pytest.raises(SystemExit) as stop:
            main(["data", "preview", "-n", "1", "--size", "8", "--out", str(out)])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_smaller_export_into_a_larger_ones_folder_is_refused_before_writing(tmp_path):
    from unclip.errors import DataError

    export_webdataset(tmp_path / "wds", split="val", n=25, size=8, shard_size=10, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "wds").iterdir()}
    with pytest.raises(DataError, match=r"holds 2 files of an earlier, larger export \(000002.tar, "
                                        r"000002_stats.json\).*-n 15.*remove them"):
        export_webdataset(tmp_path / "wds", split="val", n=15, size=8, shard_size=10, lang="th", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "wds").iterdir()} == before  # nothing rewritten
    export_webdataset(tmp_path / "wds", split="val", n=30, size=8, shard_size=10, progress=False)  # as large: fine
    (tmp_path / "wds" / "notes.tar").write_text("the user's own")  # not an export's name: not counted
    with pytest.raises(DataError, match=r"holds 2 files .*\(000002.tar, 000002_stats.json\)"):
        export_webdataset(tmp_path / "wds", split="val", n=30, size=8, shard_size=15, progress=False)  # 2 shards

    export_folder(tmp_path / "folder", split="test", n=4, size=8, progress=False)
    with pytest.raises(DataError, match=r"holds 6 files .*\(000000002.json, 000000002.png, 000000002.txt, …\)"):
        export_folder(tmp_path / "folder", split="test", n=2, size=8, progress=False)
    assert main(["data", "export", "--format", "folder", "--out", str(tmp_path / "folder"), "-n", "3",
                 "--size", "8"]) == 2  # the usage-error code, with the message
