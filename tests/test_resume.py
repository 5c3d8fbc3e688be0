"""Long commands stopped part-way resume when run again: the judge's training and `unclip generate`
(folder exports: tests/test_export.py). Each test stops a run, runs it again and compares the result
with that of a run never stopped."""

import json
import os
import signal

import pytest
import torch

from unclip.cli import main
from unclip.eval.judge import JudgeConfig

TINY_JUDGE = JudgeConfig(image_size=16, channels=(8, 16))


class Stop(BaseException):
    """What a test raises to stop a run mid-way, as a Ctrl-C would."""


def _stop_on_call(monkeypatch, module, name: str, call: int | None = None) -> list:
    """Record the calls of `module.name` (their arguments, in the returned list) and make its `call`-th
    call (1-based; None: none) raise Stop."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


# --- the judge's training ------------------------------------------------------------------------


def test_a_stopped_judge_training_resumes_to_the_weights_of_an_unstopped_one(tmp_path, monkeypatch):
    from unclip.eval import judge_train
    from unclip.eval.judge_train import JudgeTrainConfig, train_judge

    cfg = JudgeTrainConfig(steps=7, batch_size=3, warmup_steps=2, mixed_precision="no")  # bf16: the CLI test
    whole, _ = train_judge(TINY_JUDGE, cfg, progress=False)
    checkpoint = tmp_path / "judge.pt"
    _stop_on_call(monkeypatch, judge_train, "training_batch", 6)  # during step 5: steps 0-3 are checkpointed
    with pytest.raises(Stop):
        train_judge(TINY_JUDGE, cfg, progress=False, checkpoint=checkpoint, ckpt_every=2)
    assert torch.load(checkpoint, weights_only=False)["step"] == 4
    monkeypatch.undo()
    calls = _stop_on_call(monkeypatch, judge_train, "training_batch")
    resumed, provenance = train_judge(TINY_JUDGE, cfg, progress=False, checkpoint=checkpoint, ckpt_every=2)
    assert [args[0] for args in calls] == [4 * 3, 5 * 3, 6 * 3]  # steps 4-6 only
    assert provenance["resumed_from_step"] == 4
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # a checkpoint of other settings is not resumed: this run trains from its first step
    other = JudgeTrainConfig(steps=7, batch_size=3, warmup_steps=2, mixed_precision="no", seed=5)
    calls.clear()
    train_judge(TINY_JUDGE, other, progress=False, checkpoint=checkpoint, ckpt_every=100)
    assert len(calls) == 7 and torch.load(checkpoint, weights_only=False)["settings"]["train"]["seed"] == 5


def test_unclip_eval_judge_stopped_resumes_and_removes_its_checkpoint(tmp_path, monkeypatch):
    from unclip.eval import judge_train
    from unclip.modeldir import load_weights

    argv = ["eval", "judge", "--train-steps", "5", "--batch-size", "2", "--eval-n", "4", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert not list(tmp_path.glob(".*"))  # no checkpoint left beside a saved judge
    monkeypatch.setattr(judge_train, "CKPT_EVERY", 2)
    out = tmp_path / "stopped"
    _stop_on_call(monkeypatch, judge_train, "training_batch", 4)  # during step 3: steps 0-1 kept
    with pytest.raises(Stop):
        main([*argv, "--out", str(out)])
    assert (tmp_path / ".stopped.training.pt").is_file() and not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr(judge_train, "CKPT_EVERY", 2)
    calls = _stop_on_call(monkeypatch, judge_train, "training_batch")
    _stop_on_call(monkeypatch, judge_train, "judge_accuracy", 1)  # trained to the end, stopped measuring it
    with pytest.raises(Stop):
        main([*argv, "--out", str(out)])
    assert [args[0] for args in calls] == [2 * 2, 3 * 2, 4 * 2]  # from the checkpoint of step 2
    monkeypatch.undo()
    calls = _stop_on_call(monkeypatch, judge_train, "training_batch")
    assert main([*argv, "--out", str(out)]) == 0
    assert calls == []  # the last checkpoint holds the whole training: nothing trained again
    whole, resumed = (load_weights(folder / "judge.safetensors") for folder in (tmp_path / "whole", out))
    assert resumed.keys() == whole.keys()
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
    manifest = json.loads((out / "unclip.json").read_text())
    assert manifest["provenance"]["resumed_from_step"] == 5
    assert not (tmp_path / ".stopped.training.pt").exists()


@pytest.fixture
def sigterm_kills():
    """SIGTERM handled as by default, a run ended without a checkpoint of its step, but raising Stop
    rather than ending pytest; put back after the test. Returns the handler."""
    def killed(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGTERM, killed)
    yield killed
    signal.signal(signal.SIGTERM, previous)


def _sigterm_on_call(monkeypatch, module, name: str, call: int | None = None) -> list:
    """Record the calls of `module.name`, as `_stop_on_call`; its `call`-th call sends this process a
    SIGTERM and goes on."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_sigterm_stops_the_judge_training_after_the_step_with_a_checkpoint_and_it_resumes(
        tmp_path, monkeypatch, sigterm_kills):
    from unclip.errors import TrainingStopped
    from unclip.eval import judge_train
    from unclip.eval.judge_train import JudgeTrainConfig, train_judge

    cfg = JudgeTrainConfig(steps=7, batch_size=3, warmup_steps=2, mixed_precision="no")
    whole, _ = train_judge(TINY_JUDGE, cfg, progress=False)
    checkpoint = tmp_path / "judge.pt"
    _sigterm_on_call(monkeypatch, judge_train, "training_batch", 3)  # during step 2: no checkpoint due before 100
    with pytest.raises(TrainingStopped, match="after step 3 of 7.*run the same command to resume"):
        train_judge(TINY_JUDGE, cfg, progress=False, checkpoint=checkpoint, ckpt_every=100)
    assert signal.getsignal(signal.SIGTERM) is sigterm_kills  # the process's own handling is back
    assert torch.load(checkpoint, weights_only=False)["step"] == 3
    monkeypatch.undo()
    calls = _stop_on_call(monkeypatch, judge_train, "training_batch")
    resumed, provenance = train_judge(TINY_JUDGE, cfg, progress=False, checkpoint=checkpoint, ckpt_every=100)
    assert [args[0] for args in calls] == [3 * 3, 4 * 3, 5 * 3, 6 * 3]  # steps 3-6 only
    assert provenance["resumed_from_step"] == 3
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_unclip_eval_judge_stopped_by_sigterm_exits_75_and_the_same_command_resumes(tmp_path, monkeypatch, capsys,
                                                                                     sigterm_kills):
    from unclip.errors import STOPPED
    from unclip.eval import judge_train

    argv = ["eval", "judge", "--train-steps", "3", "--batch-size", "2", "--eval-n", "4", "--quiet",
            "--out", str(tmp_path / "judge")]
    _sigterm_on_call(monkeypatch, judge_train, "training_batch", 2)  # during step 1
    assert main(argv) == STOPPED
    assert "stopped by SIGTERM after step 2 of 3" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is sigterm_kills
    assert torch.load(tmp_path / ".judge.training.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "judge").exists()
    monkeypatch.undo()
    calls = _stop_on_call(monkeypatch, judge_train, "training_batch")
    assert main(argv) == 0
    assert [args[0] for args in calls] == [2 * 2]  # the last step only
    assert not (tmp_path / ".judge.training.pt").exists()


# --- unclip generate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from unclip.pipeline.assemble import assemble

    from tiny_models import save_tiny_clip, save_tiny_stages

    root = tmp_path_factory.mktemp("pipeline")
    dirs = save_tiny_stages(root, save_tiny_clip(root))
    return assemble(root / "model", decoder=dirs["decoder"], prior=dirs["prior"], upsamplers=(dirs["upsampler"],))


def _generate_argv(model_dir, seed: int = 3) -> list[str]:
    return ["generate", "a red circle", "ดาวสีเขียว", "-n", "3", "--model", str(model_dir), "--steps", "2",
            "--quiet", "--seed", str(seed)]


def _stop_writing(monkeypatch, at: int) -> None:
    """Stop `unclip generate` while it writes the batch starting at image `at`: one image of it written."""
    from unclip.pipeline import cli as pipeline_cli

    real = pipeline_cli.write_singles

    def stopped(images, out, **kwargs):
        if kwargs["start"] == at:
            real(images[:1], out, **kwargs)
            raise Stop
        return real(images, out, **kwargs)

    monkeypatch.setattr(pipeline_cli, "write_singles", stopped)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_stopped_generate_keeps_its_images_and_draws_only_the_rest(model_dir, tmp_path, monkeypatch):
    from unclip.pipeline import cli as pipeline_cli
    from unclip.pipeline.pipeline import UnclipPipeline

    monkeypatch.setattr(pipeline_cli, "BATCH", 2)  # 6 images in 3 batches
    assert main([*_generate_argv(model_dir), "--out", str(tmp_path / "whole" / "g.png")]) == 0
    out = tmp_path / "stopped" / "g.png"
    _stop_writing(monkeypatch, at=2)
    with pytest.raises(Stop):
        main([*_generate_argv(model_dir), "--out", str(out)])
    assert _names(out.parent) == ["g-0.png", "g-1.png", "g-2.png"]  # no grid yet
    monkeypatch.undo()
    monkeypatch.setattr(pipeline_cli, "BATCH", 2)
    seeds, real = [], UnclipPipeline.generate

    def generate(self, prompts, **kwargs):
        seeds.append(kwargs["seed"])
        return real(self, prompts, **kwargs)

    monkeypatch.setattr(UnclipPipeline, "generate", generate)
    assert main([*_generate_argv(model_dir), "--out", str(out)]) == 0
    assert seeds == [3 + 2, 3 + 4]  # the batch left part-written is drawn again whole, the first one not at all
    assert _names(out.parent) == _names(tmp_path / "whole")
    for name in _names(out.parent):  # the grid and every image, byte for byte
        assert (out.parent / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    seeds.clear()
    assert main([*_generate_argv(model_dir), "--out", str(out)]) == 0  # a finished run (its grid is there) again:
    assert seeds == [3, 3 + 2, 3 + 4]  # drawn anew, not read back (the code or the machine may have changed)
    assert (out.parent / "g.png").read_bytes() == (tmp_path / "whole" / "g.png").read_bytes()


def test_generate_with_other_settings_into_the_same_folder_never_mixes_two_runs(model_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    from PIL import Image

    from unclip.pipeline import cli as pipeline_cli

    monkeypatch.setattr(pipeline_cli, "BATCH", 2)
    out = tmp_path / "g.png"
    assert main([*_generate_argv(model_dir, seed=3), "--out", str(out)]) == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "g-9.png")  # not unclip's: left alone
    capsys.readouterr()
    _stop_writing(monkeypatch, at=2)
    with pytest.raises(Stop):
        main([*_generate_argv(model_dir, seed=4), "--out", str(out)])
    # seed 3's six images went before seed 4's first was written: only seed 4's are left
    assert _names(tmp_path) == ["g-0.png", "g-1.png", "g-2.png", "g-9.png"]
    for i in range(3):
        assert pipeline_cli.recorded_params(tmp_path / f"g-{i}.png")["seed"] == 4
    assert pipeline_cli.recorded_params(tmp_path / "g-9.png") is None
    err = capsys.readouterr().err
    assert "removed 6 image(s) of an earlier run with other settings (seed)" in err and "its own --out" in err


    monkeypatch.undo()  # writing is not stopped
    Image.new("RGB", (4, 4)).save(tmp_path / "g-6.png", format="JPEG")  # where a seventh image would go
    assert main([*_generate_argv(model_dir, seed=5), "--out", str(out)]) == 0  # it crashed reading a JPEG's PNG text
    assert _names(tmp_path) == ["g-0.png", "g-1.png", "g-2.png", "g-3.png", "g-4.png", "g-5.png", "g-6.png",
                                "g-9.png", "g.png"]
    with Image.open(tmp_path / "g-6.png") as kept:
        assert kept.format == "JPEG"


def test_a_generate_that_fails_before_drawing_loses_no_earlier_image(model_dir, tmp_path, capsys):
    """The earlier run's images were removed before the new settings were checked: a mistyped --size
    (refused a moment later) left the folder empty."""
    out = tmp_path / "g.png"
    assert main([*_generate_argv(model_dir, seed=3), "--out", str(out)]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in _names(tmp_path) if name != "g.png"}
    assert main([*_generate_argv(model_dir, seed=4), "--out", str(out), "--size", "100"]) == 2
    assert "size 100" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in _names(tmp_path)} == before  # only the grid went
