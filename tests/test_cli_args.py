"""Bad numbers on any verb's command line are refused by argparse, before a model loads or work starts."""

import pytest

from unclip.cli import main


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "-n", "0"], "-n: 0 is too small"),
    (["generate", "a red circle", "--threads", "-2"], "--threads: -2 threads: give 1 or more, or 0"),
    (["generate", "a red circle", "--candidates", "x"], "'x' is not a whole number"),
    (["generate", "a red circle", "--prior-guidance-scale", "inf"], "give a finite number ≥ 0"),
    (["serve", "--port", "99999"], "99999 is not a TCP port"),
    (["serve", "--max-batch", "0"], "--max-batch: 0 is too small"),
    (["explain", "clip", "--model", "m", "-n", "0"], "-n: 0 is too small"),
    (["clip", "eval", "m", "-n", "-1"], "-n: -1 is too small"),
    (["train", "prior", "--clip", "c", "--fit-samples", "0"], "--fit-samples: 0 is too small"),
    (["train", "decoder", "--clip", "c", "--eval-samples", "0"], "--eval-samples: 0 is too small"),
    (["eval", "m", "--guidance-scale", "-1"], "guidance scale -1.0"),
    (["generate", "a red circle", "--upsampled-candidates", "0"], "--upsampled-candidates: 0 is too small"),
    (["eval", "m", "--upsampled-candidates", "0"], "--upsampled-candidates: 0 is too small"),
])
def test_bad_numbers_are_refused_with_what_to_give(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
