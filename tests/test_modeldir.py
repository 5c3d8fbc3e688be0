import json
import shutil
import subprocess
import sys

import pytest
import torch

from unclip.config import preset
from unclip.errors import ModelFormatError
from unclip.io import atomic_write, write_json_atomic
from unclip.modeldir import (
    FORMAT_VERSION, MANIFEST, Manifest, load_checkpoint, load_into, read_manifest, recorded_path, save_checkpoint,
    save_model_dir, save_weights, verify_files,
)


def _net(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))


def _write_model(directory, net, *, name="tiny"):
    def components(tmp):
        save_weights(tmp / "decoder" / "model.safetensors", net.state_dict())
        write_json_atomic(tmp / "decoder" / "config.json", {"width": 4})

    manifest = Manifest(config=preset("tiny").override([f"name={name}"]).to_dict(), resolutions=(16, 64))
    return save_model_dir(directory, manifest, components)


def test_init_paths_are_recorded_relative_to_the_working_directory(tmp_path, monkeypatch):
    # a model continued from a directory inside the checkout names it so on any other machine
    (tmp_path / "runs" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert recorded_path(tmp_path / "runs" / "base") == "runs/base"
    assert recorded_path("runs/base") == "runs/base"
    assert recorded_path(tmp_path.parent / "elsewhere") == str(tmp_path.parent / "elsewhere")


def test_save_then_strict_load(tmp_path):
    net = _net()
    model = _write_model(tmp_path / "model", net)
    manifest = read_manifest(model)
    assert manifest.format_version == FORMAT_VERSION and manifest.resolutions == (16, 64)
    assert set(manifest.files) == {"decoder/model.safetensors", "decoder/config.json"}
    verify_files(model, manifest, checksums=True)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    load_into(other, model / "decoder" / "model.safetensors")
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_truncated_weights_name_the_file(tmp_path):
    model = _write_model(tmp_path / "model", _net())
    weights = model / "decoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelFormatError, match=r"decoder/model.safetensors is truncated: \d+ bytes"):
        verify_files(model, read_manifest(model))
    with pytest.raises(ModelFormatError, match="model.safetensors is truncated or corrupt"):
        load_into(_net(), weights)


def test_flipped_byte_fails_checksum(tmp_path):
    model = _write_model(tmp_path / "model", _net())
    weights = model / "decoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    verify_files(model, read_manifest(model), checksums=False)  # same size: only the hash can tell
    with pytest.raises(ModelFormatError, match="sha256"):
        verify_files(model, read_manifest(model))  # loading checks hashes by default


def test_mismatched_weights_say_which_tensors(tmp_path):
    model = _write_model(tmp_path / "model", _net(width=4))
    with pytest.raises(ModelFormatError, match=r"shape mismatch.*0\.weight \(4, 3\) vs \(8, 3\)"):
        load_into(_net(width=8), model / "decoder" / "model.safetensors")
    longer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ModelFormatError, match=r"missing 2 tensor\(s\) \(2.bias, 2.weight\)"):
        load_into(longer, model / "decoder" / "model.safetensors")


def test_integer_weights_for_float_parameters_are_refused(tmp_path):
    """They were cast in silence, so a model sampled with its weights truncated to whole numbers."""
    weights = save_weights(tmp_path / "model.safetensors", {k: v.int() for k, v in _net().state_dict().items()})
    with pytest.raises(ModelFormatError, match=r"4 tensor\(s\) of integers where the model has floats \(0.weight"):
        load_into(_net(), weights)


@pytest.mark.parametrize("content, message", [
    (None, "unclip.json is missing"),
    ("{\"format_version\": 1, ", "truncated or corrupt"),
    (json.dumps({"config": {}}), "no integer format_version"),
    (json.dumps({"format_version": FORMAT_VERSION + 1, "config": {}}), "upgrade unclip"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "stats": "x"}), "its stats is not a JSON object"),
    (json.dumps({"format_version": FORMAT_VERSION, "config": {}, "files": {"decoder/config.json": {}}}),
     "its record of decoder/config.json has no bytes and sha256"),
])
def test_bad_manifest(tmp_path, content, message):
    model = _write_model(tmp_path / "model", _net())
    if content is None:
        (model / MANIFEST).unlink()
    else:
        (model / MANIFEST).write_text(content)
    with pytest.raises(ModelFormatError, match=message):
        read_manifest(model)


def test_crash_while_saving_a_model_keeps_the_previous_one(tmp_path):
    _write_model(tmp_path / "model", _net(), name="first")

    def crashing(tmp):
        save_weights(tmp / "decoder" / "model.safetensors", _net().state_dict())
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        save_model_dir(tmp_path / "model", Manifest(config={}), crashing)
    manifest = read_manifest(tmp_path / "model")
    assert manifest.config["name"] == "first"
    verify_files(tmp_path / "model", manifest, checksums=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_save_interrupted_between_its_renames_puts_the_previous_model_back(tmp_path, monkeypatch, error):
    """Ctrl-C (or a failed rename) after the old model was moved aside left nothing at the model's
    path, and the cleanup deleted the new one, so nothing ever moved the old one back."""
    import os

    _write_model(tmp_path / "model", _net(), name="first")
    rename, calls = os.rename, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new model moving in
            raise error("interrupted")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(error):
        _write_model(tmp_path / "model", _net(), name="second")
    monkeypatch.setattr(os, "rename", rename)
    manifest = read_manifest(tmp_path / "model")
    assert manifest.config["name"] == "first"
    verify_files(tmp_path / "model", manifest, checksums=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_saving_over_something_that_is_not_a_model_is_refused_and_loses_nothing(tmp_path, kind):
    target = tmp_path / "thesis"
    if kind == "folder":
        target.mkdir()
        (target / "chapter1.txt").write_text("years of work")
    else:
        target.write_text("years of work")
    wrote = []
    with pytest.raises(ModelFormatError, match="is not a model written before.*Choose another output path"):
        save_model_dir(target, Manifest(config={}), wrote.append)
    assert wrote == []  # refused before any component was written
    kept = target / "chapter1.txt" if kind == "folder" else target
    assert kept.read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_a_model_directory_has_the_umasks_mode_not_mkdtemps(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        model = _write_model(tmp_path / "model", _net())
    finally:
        os.umask(old)
    assert model.stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 kept a served model from other accounts


def test_an_empty_folder_or_an_earlier_model_is_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    _write_model(tmp_path / "empty", _net())
    _write_model(tmp_path / "model", _net(), name="first")
    _write_model(tmp_path / "model", _net(), name="second")
    assert read_manifest(tmp_path / "empty").config["name"] == "tiny"
    assert read_manifest(tmp_path / "model").config["name"] == "second"


def test_crash_during_atomic_write_leaves_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash")
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_process_killed_mid_write_leaves_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    script = (
        "import os, sys\n"
        "from unclip.io import atomic_write\n"
        "with atomic_write(sys.argv[1]) as f:\n"
        "    f.write(b'x' * 1000); f.flush()\n"
        "    os._exit(9)\n"  # dies without cleanup, like SIGKILL
    )
    assert subprocess.run([sys.executable, "-c", script, str(path)]).returncode == 9
    assert load_checkpoint(path)["step"] == 1


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 3, "weights": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelFormatError, match="ckpt.pt is truncated or corrupt"):
        load_checkpoint(path)
    path.write_text("not a checkpoint\n")  # no torch file at all: refused the same way, with what to do
    with pytest.raises(ModelFormatError, match="ckpt.pt is truncated or corrupt.*delete it to start the run over"):
        load_checkpoint(path)


def test_half_copy_halves_the_weights_and_loads_back_as_float32(tmp_path):
    from safetensors.torch import load_file

    from unclip.modeldir import half_model_dir

    net = _net(width=64)
    model = _write_model(tmp_path / "model", net)
    half = half_model_dir(model, tmp_path / "half")
    manifest = read_manifest(half)
    verify_files(half, manifest, checksums=True)
    assert manifest.extra["weights_dtype"] == "float16"
    assert manifest.config == read_manifest(model).config
    weights = half / "decoder" / "model.safetensors"
    assert all(v.dtype == torch.float16 for v in load_file(weights).values())
    assert weights.stat().st_size < 0.6 * (model / "decoder" / "model.safetensors").stat().st_size
    other = _net(width=64)
    torch.nn.init.zeros_(other[0].weight)
    load_into(other, weights)
    x = torch.randn(5, 3)
    assert other[0].weight.dtype == torch.float32
    torch.testing.assert_close(other(x), net(x), rtol=2e-3, atol=2e-3)
    with pytest.raises(ModelFormatError, match="copy"):
        half_model_dir(model, model)


def test_a_save_removes_what_a_killed_save_left_beside_the_model(tmp_path):
    """kill -9 during a save left `.model.XXXX.tmp` beside the model for good (hidden, as big as a model)."""
    import os

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    left = tmp_path / f".model.{pid}.abcd1234.tmp"
    running = tmp_path / f".model.{os.getpid()}.efgh5678.tmp"  # a live writer's (this process's): kept
    other = tmp_path / f".other.{pid}.abcd1234.tmp"  # another model's: not ours to judge here
    for folder in (left, running, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    _write_model(tmp_path / "model", _net())
    assert not left.exists() and running.exists() and other.exists()
    assert [p.name for p in tmp_path.glob(".model.*.tmp")] == [running.name]  # and the save left none itself


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_save_killed_between_its_renames_leaves_the_previous_model_loadable(tmp_path):
    """Killed after moving the old model aside and before moving the new one in, nothing stood at
    the model's path and the old copy stayed for good."""
    target = tmp_path / "model"
    _write_model(target, _net())
    pid = _dead_pid()
    aside, new = tmp_path / f".model.old-{pid}", tmp_path / f".model.{pid}.abcd1234.tmp"
    target.rename(aside)  # where swap_in had got to: the old model aside, the new one not yet moved in
    new.mkdir()
    assert read_manifest(target).config["name"] == "tiny"  # put back on first read
    assert target.is_dir() and not aside.exists()
    aside.mkdir()  # killed after both renames, before the old copy was deleted
    _write_model(target, _net(), name="again")
    assert not aside.exists() and not new.exists() and read_manifest(target).config["name"] == "again"
    aside.mkdir()  # an aside copy left when the user deleted the model on purpose: it stays deleted
    shutil.rmtree(target)
    with pytest.raises(ModelFormatError, match="is not a directory"):
        read_manifest(target)


def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import os

    from unclip import io

    dead = tmp_path / f".x-4.png.unclip-{io._HOST}-{_dead_pid()}.abcd1234.tmp"
    live = tmp_path / f".x-5.png.unclip-{io._HOST}-{os.getpid()}.abcd1234.tmp"
    elsewhere = tmp_path / f".x-6.png.unclip-{io._HOST}x-{_dead_pid()}.abcd1234.tmp"  # another machine's writer
    other = tmp_path / f".backup.{_dead_pid()}.20261127.tmp"  # not unclip's
    for path in (dead, live, elsewhere, other):
        path.write_bytes(b"partial")
    io._swept.discard(tmp_path.resolve())
    with atomic_write(tmp_path / "x.png") as handle:
        handle.write(b"whole")
    assert not dead.exists() and live.exists() and elsewhere.exists() and other.exists()
    assert (tmp_path / "x.png").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, other.name, "x.png"])


def test_a_killed_process_not_yet_reaped_counts_as_dead():
    """A zombie (a killed child its parent has not waited for) answered kill(pid, 0), so the temporary
    files and locks it left were kept until the run after next."""
    import subprocess
    import sys
    import time

    from unclip.io import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while pid_alive(child.pid) and time.monotonic() < deadline:  # dead once the kernel has it as a zombie
            time.sleep(0.01)
        assert not pid_alive(child.pid) and child.poll() is not None  # and poll() reaps it only now
    finally:
        child.kill()
        child.wait()


def test_old_format_versions_migrate_or_are_refused_clearly(tmp_path, monkeypatch):
    import unclip.modeldir

    model = _write_model(tmp_path / "model", _net())
    manifest = json.loads((model / MANIFEST).read_text())
    (model / MANIFEST).write_text(json.dumps({**manifest, "format_version": 0, "unclip_version": "0.0.1"}))
    with pytest.raises(ModelFormatError, match=r"format_version 0 \(written by unclip 0.0.1\), older than this"):
        read_manifest(model)

    def upgrade(data):
        return {**data, "format_version": 1, "stats": {"migrated": True}}

    monkeypatch.setattr(unclip.modeldir, "MIGRATIONS", {0: upgrade})
    assert read_manifest(model).stats == {"migrated": True}
    monkeypatch.setattr(unclip.modeldir, "MIGRATIONS", {0: lambda data: data})  # forgot to bump: looped forever
    with pytest.raises(ModelFormatError, match="the migration from format_version 0 did not give 1"):
        read_manifest(model)


def test_a_config_from_a_newer_unclip_names_the_file_and_the_fix(tmp_path):
    """It was the bare "unknown config key(s) new_knob in decoder", naming neither the model nor why."""
    model = _write_model(tmp_path / "model", _net())
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["config"]["decoder"]["new_knob"] = 1
    (model / MANIFEST).write_text(json.dumps({**manifest, "unclip_version": "9.0.0"}))
    with pytest.raises(ModelFormatError) as err:
        read_manifest(model)
    message = str(err.value)
    assert str(model / MANIFEST) in message and "new_knob" in message
    assert "written by unclip 9.0.0" in message and "upgrade unclip to load it" in message


def test_a_model_trained_before_todays_config_rules_still_loads(tmp_path):
    """The rules for a config about to be trained (a name a folder can have, attention at some decoder
    level) refused yesterday's models at load: one named "team/exp1", or with tiny's [8] left at a
    resolution of 32, trained and sampled, and read_manifest then called it "edited or damaged"."""
    from unclip.config import UnclipConfig
    from unclip.errors import ConfigError

    model = _write_model(tmp_path / "model", _net())
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["config"]["name"] = "team/exp1"
    manifest["config"]["decoder"]["resolution"] = 32  # sides 32, 16: tiny's attention_resolutions [8] names neither
    manifest["config"]["upsamplers"][0]["in_resolution"] = 32
    manifest["config"]["upsamplers"][0]["out_resolution"] = 128
    (model / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(model).config["name"] == "team/exp1"
    cfg = UnclipConfig.from_dict(manifest["config"])
    for assignment, words in (("name=mine", "names none of the decoder's levels"),
                              ("decoder.attention_resolutions=[16]", "no slashes")):  # a new training run: refused
        with pytest.raises(ConfigError, match=words):
            cfg.override([assignment])
