"""Bad numbers on any verb's command line are refused by argparse, before a model loads or work starts."""

import pytest

from unclip.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "-n", "0"], "-n: 0 is too small"),
    (["generate", "a red circle", "--threads", "-2"], "--threads: -2 threads: give 1 or more, or 0"),
    (["generate", "a red circle", "--candidates", "x"], "'x' is not a whole number"),
    (["generate", "a red circle", "--prior-guidance-scale", "inf"], "give a number from 0 to 50"),
    (["serve", "--port", "99999"], "99999 is not a TCP port"),
    (["serve", "--max-batch", "0"], "--max-batch: 0 is too small"),
    (["explain", "clip", "--model", "m", "-n", "0"], "-n: 0 is out of range: give 10 to 5000"),
    (["clip", "eval", "m", "-n", "-1"], "-n: -1 is too small"),
    (["train", "prior", "--clip", "c", "--fit-samples", "0"], "--fit-samples: 0 is too small"),
    (["train", "decoder", "--clip", "c", "--eval-samples", "0"], "--eval-samples: 0 is too small"),
    (["train", "clip", "--minutes", "inf"], "--minutes: inf minutes: give a positive number"),
    (["train", "decoder", "--clip", "c", "--minutes", "-2"], "--minutes: -2 minutes: give a positive number"),
    (["train", "prior", "--clip", "c", "--minutes", "nan"], "--minutes: nan minutes"),
    (["eval", "m", "--guidance-scale", "-1"], "guidance scale -1.0"),
    (["generate", "a red circle", "--upsampled-candidates", "0"], "--upsampled-candidates: 0 is too small"),
    (["eval", "m", "--upsampled-candidates", "0"], "--upsampled-candidates: 0 is too small"),
    (["generate", "a red circle", "--seed", "-1"], "give a seed from 0 to 9223372036854775807"),
    (["generate", "a red circle", "--seed", str(2**64)], "give a seed from 0"),
    (["generate", "a red circle", "-n", "1000000000"], "give 1 to 100000 (for more, run again with another --seed)"),
    (["vary", "a.png", "--eta", "nan"], "DDIM η nan: give a number from 0"),
    (["vary", "a.png", "--eta", "-1"], "DDIM η -1.0"),
    (["generate", "a red circle", "--guidance-scale", "1e308"], "give a number from 0 to 50"),
    (["data", "preview", "--size", "100000"], "give 8 to 1024"),
    (["data", "preview", "--seed", "-5"], "give a seed from 0"),
    (["data", "export", "--out", "x", "--seed", "-1"], "give a seed from 0"),
    # these two were refused only after the model had loaded
    (["textdiff", "a.png", "a red circle", "a blue circle", "--thetas", "0", "nan"], "nan is not in [0, 1]"),
    (["textdiff", "a.png", "a red circle", "a blue circle", "--thetas", "2"], "2 is not in [0, 1]"),
    (["generate", "a red circle", "--upsampler-start", "nan"], "nan is not a noise level in (0, 1]"),
    (["serve", "--upsampler-start", "0"], "0 is not a noise level in (0, 1]"),
    (["eval", "m", "--upsampler-start", "1.5"], "1.5 is not a noise level in (0, 1]"),
])
def test_bad_numbers_are_refused_with_what_to_give(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_paths_and_config_files_are_one_line_errors_before_any_work(tmp_path, capsys):
    """Not tracebacks: a run directory that is a file, config files that are missing, folders, not
    UTF-8 or not JSON, and a config file given beside a preset."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "c.yaml").write_text("clip: {}\n")
    (tmp_path / "good.json").write_text("{}")
    train = ["train", "clip", "--preset", "tiny", "--no-eval"]
    cases = [
        (["train", "clip", "--no-eval", "--run-dir", str(tmp_path / "afile")], "File exists: " + str(tmp_path / "afile")),
        (["train", "clip", "--no-eval", "--run-dir", str(tmp_path / "afile" / "sub")], "Not a directory"),
        (["config", "--config", str(tmp_path / "missing.json")], "No such file or directory: "),
        (["config", "--config", str(tmp_path)], "is not an unclip model directory"),  # a model's config is read
        (["config", "--config", str(tmp_path / "binary.json")], "is not a UTF-8 text file"),
        (["config", "--config", str(tmp_path / "c.yaml")], f"--config {tmp_path / 'c.yaml'}: config is not valid JSON"),
        ([*train, "--config", str(tmp_path / "good.json")], "give --preset or --config, not both"),
        (["data", "export", "--out", str(tmp_path / "afile"), "-n", "1"], "afile is a file, not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    for argv in (["generate", "a red circle", "--out", str(tmp_path / "afile" / "x.png")],
                 ["inpaint", "a.png", "m.png", "--out", str(tmp_path / "afile")]):
        with pytest.raises(SystemExit):  # before the model loads or any image is drawn
            main(argv)
        assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    assert main(["eval", "m", "--out", str(tmp_path / "afile" / "e")]) == 2  # before ten minutes of drawing
    assert "cannot hold" in capsys.readouterr().err
    assert main(["eval", "m", "--train-steps", "5"]) == 2  # the judge's option: was silently ignored
    assert "options of `unclip eval judge`" in capsys.readouterr().err
    assert main(["config", "--config", str(tmp_path / "good.json")]) == 0  # {}: every default
    assert not (tmp_path / "runs").exists()


def test_a_run_stopped_with_a_checkpoint_exits_75_and_an_error_2(monkeypatch, capsys, tmp_path):
    """Scripts that resume a run stopped by SIGTERM (scripts/continue_default_gpu.sh) read the exit
    status: it was 2 for a stop and for any error alike, so a wrong path looked like a stop to resume."""
    import unclip.clip.stage
    from unclip.errors import STOPPED, DataError, TrainingStopped

    def stopped(*args, **kwargs):
        raise TrainingStopped("clip stopped by SIGTERM after step 3 of 10, checkpoint written: run the same command "
                              "to resume")

    monkeypatch.setattr(unclip.clip.stage, "train_clip", stopped)
    argv = ["train", "clip", "--preset", "tiny", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == STOPPED == 75
    assert "unclip: clip stopped by SIGTERM after step 3" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise DataError("/nonexistent is not a directory")

    monkeypatch.setattr(unclip.clip.stage, "train_clip", broken)
    assert main(argv) == 2 and "unclip: error: /nonexistent" in capsys.readouterr().err


def test_every_option_of_every_verb_says_what_it_does_and_its_default():
    """`--help` is the manual: `unclip embed --help` listed --source, --lang, --seed and --shard-size
    with no word about them or their defaults."""
    import argparse

    from unclip.cli import build_parser

    def options(parser, verb):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, f"{verb} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield verb, action

    silent = []
    for verb, action in options(build_parser(), "unclip"):
        said = action.help or ""
        has_default = action.option_strings and not any(action.default is nothing for nothing in
                                                           (None, False, argparse.SUPPRESS)) and action.default != []
        if not said or (has_default and "default" not in said):
            silent.append(f"{verb} {'/'.join(action.option_strings) or action.dest}")
    assert not silent, silent


def test_demo_refuses_a_file_for_its_folder_and_an_empty_prompt_before_any_work(tmp_path, capsys):
    """`demo --out FILE` was "File exists" from mkdir; `demo ""` drew the preview and loaded the model first."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--out", str(tmp_path / "afile")])
    assert stop.value.code == 2 and "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["demo", "", "--out", str(tmp_path / "demo")]) == 2
    assert "prompt '' is empty" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
