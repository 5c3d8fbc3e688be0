"""The one trainer: wall-clock budgets, device placement of batches, EMA, compile, resume and SIGTERM."""

import json
import os
import signal
import time
from dataclasses import replace

import pytest
import torch

from unclip.config import TrainConfig
from unclip.errors import ConfigError, ModelFormatError
from unclip.modeldir import save_checkpoint
from unclip.train.trainer import (EMA, Schedule, TrainingError, TrainingStopped, _read_resume_state, fit_steps,
                                  to_device, train)


class _Slow(torch.nn.Module):
    """A one-parameter stage whose steps take `delay` seconds."""

    def __init__(self, delay: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.delay = delay

    def forward(self, batch):
        time.sleep(self.delay)
        return {"loss": ((self.w - batch["x"]) ** 2).mean()}


def _feed(start):
    while True:
        yield {"x": torch.ones(4), "caption": ["kept as is"]}


def test_fit_steps_stays_between_done_and_the_configured_limit():
    assert fit_steps(done=100, limit=10_000, seconds_per_step=0.1, seconds_left=50) == 600
    assert fit_steps(done=100, limit=300, seconds_per_step=0.1, seconds_left=50) == 300
    assert fit_steps(done=100, limit=10_000, seconds_per_step=0.1, seconds_left=-5) == 100


def test_time_budget_ends_the_cosine_schedule_in_time(tmp_path):
    cfg = TrainConfig(steps=100_000, batch_size=4, lr=0.1, warmup_steps=2, log_every=5, ckpt_every=1000)
    result = train(_Slow(0.01), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False,
                   time_budget=1.0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 20 < result.step < 200, result.step  # ~10 ms a step in 1 s, far below the 100,000 configured
    # the budget counts from the first step (setting up accelerate is not the run's): its training time,
    # not this test's wall clock, which a loaded machine stretches
    assert result.seconds < 1.5
    assert rows[-1]["step"] == result.step and rows[-1]["planned_steps"] == result.step
    assert rows[-1]["lr"] < 0.1 * cfg.lr  # the schedule ran out with the time, not cut off mid-way
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == result.step


def test_the_schedule_follows_a_shortened_total():
    cfg = TrainConfig(steps=1000, warmup_steps=10)
    assert Schedule(cfg, cfg.steps)(500) > 0.4
    assert Schedule(cfg, 500)(500) == 0.0


def test_a_lengthened_plan_bends_the_cosine_instead_of_raising_the_lr():
    """A budget run refits its plan as it measures its speed; recomputing the cosine over a longer
    plan raised the learning rate mid-run. The decay now bends from where it is: it never rises
    after warmup, and still reaches 0 at the new end."""
    cfg = TrainConfig(steps=10_000, warmup_steps=10)
    schedule = Schedule(cfg, 1000)
    factors = [schedule(step) for step in range(500)]
    schedule.refit(500, 2000)
    assert schedule(500) == pytest.approx(Schedule(cfg, 1000)(500))  # continuous
    factors += [schedule(step) for step in range(500, 1200)]
    schedule.refit(1200, 1500)  # and shortened again
    factors += [schedule(step) for step in range(1200, 1501)]
    after_warmup = factors[10:]
    assert all(b <= a + 1e-12 for a, b in zip(after_warmup, after_warmup[1:], strict=False))
    assert factors[1500] == 0.0 and factors[1499] > 0.0
    assert Schedule(cfg, 2000)(1000) > schedule(1000)  # the old cosine over 2000 steps would have risen


def test_a_plan_shorter_than_the_warmup_still_warms_up_and_decays():
    cfg = TrainConfig(steps=10_000, warmup_steps=500)
    schedule = Schedule(cfg, 10_000)
    schedule.refit(20, 100)  # a budget of ~100 steps, measured after 20
    factors = [schedule(step) for step in range(101)]
    assert schedule.warmup == 50 and factors[49] == 1.0  # half the plan warms up
    assert factors[100] == 0.0 and factors[75] == pytest.approx(0.5, abs=0.03)
    assert all(b >= a for a, b in zip(factors[:50], factors[1:50], strict=False))
    schedule = Schedule(cfg, 10_000)
    schedule.refit(300, 400)  # past half the plan already: the warmup ends now, not in the past
    assert schedule.warmup == 300 and schedule(300) == 1.0 and schedule(350) == pytest.approx(0.5)


def test_a_budget_run_resumes_on_the_same_curve(tmp_path):
    """The bent schedule is in the checkpoint: a run stopped mid-way and resumed logs the learning
    rates the checkpoint's curve gives, not a fresh cosine over the planned steps."""
    cfg = TrainConfig(steps=100_000, batch_size=4, lr=0.1, warmup_steps=2, log_every=5, ckpt_every=1000)
    train(_Slow(0.01), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False, time_budget=2.0,
          stop_at=40)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    schedule = Schedule(cfg, saved["planned_steps"], saved["schedule"])
    assert saved["step"] == 40 and saved["schedule"]["bend"][0] > cfg.warmup_steps  # it was refitted
    first = len((tmp_path / "metrics.jsonl").read_text().splitlines())
    train(_Slow(0.01), _feed, cfg=replace(cfg, log_every=1), run_dir=tmp_path, run_config={"x": 1}, progress=False,
          stop_at=42)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][first:]
    assert [row["step"] for row in rows] == [41, 42]
    assert [row["lr"] for row in rows] == pytest.approx([cfg.lr * schedule(40), cfg.lr * schedule(41)])


def test_the_logged_lr_is_the_one_the_step_trained_with(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, lr=0.1, warmup_steps=4, log_every=1, ckpt_every=1000)
    train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # step 1 is warmup's first


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = to_device({"x": torch.ones(2), "caption": ["a"]}, torch.device("cpu"))
    assert batch["caption"] == ["a"] and batch["x"].device.type == "cpu"


def test_ema_is_the_running_average():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.update(net)
    torch.testing.assert_close(ema.shadow["weight"], start + 1.0)


def _prior_feed(start):
    g = torch.Generator().manual_seed(start)
    while True:
        unit = lambda: torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=-1)  # noqa: E731
        yield {"text_states": torch.randn(8, 6, 16, generator=g), "text_mask": torch.ones(8, 6, dtype=torch.long),
               "z_t": unit(), "z_i": unit()}


def test_compile_trains_the_same_prior_under_the_same_names(tmp_path):
    from unclip.config import PriorConfig
    from unclip.prior.diffusion import DiffusionPrior

    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        prior = DiffusionPrior.from_config(PriorConfig(width=32, layers=1, heads=2, timesteps=100), clip_dim=8,
                                           text_width=16, context_length=6)
        cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1000,
                          compile=compiled)
        run_dir = tmp_path / f"compiled{compiled}"
        train(prior, _prior_feed, cfg=cfg, run_dir=run_dir, run_config={}, progress=False, stage_name="diffusion_prior")
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = losses, prior
    (eager_losses, eager), (compiled_losses, compiled) = runs[False], runs[True]
    assert compiled.transformer._compiled_call_impl is not None and eager.transformer._compiled_call_impl is None
    assert len(compiled_losses) == 3 and eager_losses[0] > 0
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-6)
    saved = compiled.state_dict()
    assert saved.keys() == eager.state_dict().keys()  # checkpoints and model files read the same either way
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-5)


def test_a_run_resumes_with_execution_or_other_stages_changed_but_not_with_what_it_trains(tmp_path):
    def run_config(lr=1e-3, compile=False, workers=0, log_every=20, decoder_lr=1e-4, lang="mix", eval_every=0):
        return {"data": {"lang": lang}, "decoder": {"train": {"lr": decoder_lr}},
                "prior": {"train": {"lr": lr, "compile": compile, "num_workers": workers, "log_every": log_every,
                                    "eval_every": eval_every, "eval_batches": 4 + eval_every}}}

    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 5, "run_config": run_config()})
    # validation draws nothing from the training random state (tests/test_train_scale.py): adding it was refused
    for changed in (dict(compile=True, workers=4, log_every=1), dict(decoder_lr=5e-5), dict(eval_every=100)):
        assert _read_resume_state(tmp_path / "checkpoint.pt", run_config(**changed), "diffusion_prior")["step"] == 5
    with pytest.raises(TrainingError, match=r"another config \(prior.train.lr: 0.001 → 0.002\);.*--no-resume"):
        _read_resume_state(tmp_path / "checkpoint.pt", run_config(lr=2e-3), "diffusion_prior")
    with pytest.raises(TrainingError, match=r"\(data.lang: 'mix' → 'th'\)"):
        _read_resume_state(tmp_path / "checkpoint.pt", run_config(lang="th"), "diffusion_prior")
    with pytest.raises(TrainingError, match=r"decoder.train.lr: 0.0001 → 5e-05"):  # the decoder's own run
        _read_resume_state(tmp_path / "checkpoint.pt", run_config(decoder_lr=5e-5), "decoder")
    other_clip = {**run_config(), "clip": {"embed_dim": 32}}  # the embeddings a prior or decoder learns from
    with pytest.raises(TrainingError, match=r"clip.embed_dim: 64 → 32"):
        _read_resume_state(tmp_path / "checkpoint.pt", other_clip, "decoder")
    sampled_otherwise = {**run_config(), "decoder": {"train": {"lr": 1e-4}, "guidance_scale": 3.0, "sample_steps": 9}}
    assert _read_resume_state(tmp_path / "checkpoint.pt", sampled_otherwise, "decoder")["step"] == 5  # no weight changes
    from unclip.config import preset
    from unclip.pipeline.assemble import with_sampling

    shapes = preset("shapes")
    asked = shapes.override(["decoder.guidance_scale=3", "decoder.base_channels=8", "upsamplers.0.sample_steps=7"])
    carried = with_sampling(shapes, asked)  # what `train all` assembles: the stages' weights, sampling as asked now
    assert (carried.decoder.guidance_scale, carried.upsamplers[0].sample_steps) == (3.0, 7)
    assert carried.decoder.base_channels == shapes.decoder.base_channels
    save_checkpoint(tmp_path / "up.pt", {"step": 3, "run_config": run_config()})
    assert _read_resume_state(tmp_path / "up.pt", other_clip, "upsampler1")["step"] == 3  # no CLIP in it


class _TermAt(torch.nn.Module):
    """A one-parameter stage that sends its own process a SIGTERM during its `at`-th step."""

    def __init__(self, at: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls, self.at = 0, at

    def forward(self, batch):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": ((self.w - batch["x"]) ** 2).mean()}


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=4, lr=0.1, warmup_steps=1, log_every=1, ckpt_every=1000)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="after step 5 of 10.*run the same command to resume"):
        train(_TermAt(5), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handling is back
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 5
    stopped = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert stopped == [1, 2, 3, 4, 5]
    resumed = train(_TermAt(0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False)
    assert (resumed.resumed_from, resumed.step) == (5, 10)
    uninterrupted = train(_TermAt(0), _feed, cfg=cfg, run_dir=tmp_path / "whole", run_config={"x": 1}, progress=False)
    torch.testing.assert_close(resumed.metrics["loss"], uninterrupted.metrics["loss"])


def _quick(tmp_path, **options):
    cfg = TrainConfig(steps=6, batch_size=4, lr=0.1, warmup_steps=1, log_every=1, ckpt_every=2)
    return train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False,
                 stage_name="decoder", **options)


def test_a_half_written_metrics_line_does_not_stop_the_resume(tmp_path, caplog):
    """A full disk cut the log mid-line; every later resume failed on it with a JSON traceback."""
    _quick(tmp_path, stop_at=4)
    with open(tmp_path / "metrics.jsonl", "a") as log_file:
        log_file.write('[1, 2]\n{"step": 4, "loss"')
    assert _quick(tmp_path).step == 6
    assert "left out 2 line(s)" in caplog.text
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_what_is_not_this_runs_checkpoint_is_refused_and_the_log_kept(tmp_path):
    _quick(tmp_path, stop_at=2)
    log_before = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "checkpoint.pt").rename(tmp_path / "saved.pt")
    (tmp_path / "checkpoint.pt").mkdir()  # was: a silent fresh start that deleted the log, then a crash
    with pytest.raises(TrainingError, match="checkpoint.pt is not a file"):
        _quick(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == log_before
    (tmp_path / "checkpoint.pt").rmdir()
    (tmp_path / "saved.pt").rename(tmp_path / "checkpoint.pt")
    cfg = TrainConfig(steps=6, batch_size=4, lr=0.1, warmup_steps=1, log_every=1, ckpt_every=2)
    with pytest.raises(TrainingError, match="checkpoint of the decoder stage, not of clip"):
        train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False, stage_name="clip")
    torch.save({"weights": {}, "run_config": {"x": 1}}, tmp_path / "checkpoint.pt")  # a KeyError traceback before
    with pytest.raises(TrainingError, match="holds no training state to resume .model, optimizer, scheduler, step, "
                                            "rng missing."):
        _quick(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"\0" * 64)  # zeros: a tar error inside torch.load
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        _quick(tmp_path)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "a+") as held:  # what a running training holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"pid {os.getpid()}")
        held.flush()
        with pytest.raises(TrainingError, match=rf"another unclip process \(pid {os.getpid()}\) is training in"):
            _quick(tmp_path)
        assert not (tmp_path / "checkpoint.pt").exists()
        held.seek(0)
        held.truncate()
        held.write("pid 999999999")  # a killed run whose data-loader workers still hold the lock
        held.flush()
        assert _quick(tmp_path, stop_at=2).step == 2
    assert _quick(tmp_path).step == 6  # the lock goes with the process that held it


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_the_last_one_stays(tmp_path, monkeypatch):
    _quick(tmp_path, stop_at=2)
    kept = (tmp_path / "checkpoint.pt").read_bytes()

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint .*checkpoint.pt.*MiB free.*intact"):
        _quick(tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == kept
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))


def test_a_checkpoint_between_two_metrics_rows_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path):
    """Stopped at step 3 with rows every 4 steps: the resumed run's row 4 averaged step 4 alone (step 3's
    loss was lost), so metrics.jsonl differed from an uninterrupted run's (ckpt_every=250 with log_every=20
    in the shapes presets does the same)."""
    cfg = TrainConfig(steps=8, batch_size=4, lr=0.1, warmup_steps=1, log_every=4, ckpt_every=1000)
    for stop_at in (3, None):
        train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path / "split", run_config={"x": 1}, progress=False,
              stop_at=stop_at)
    train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path / "whole", run_config={"x": 1}, progress=False)
    split, whole = ([(row["step"], row["loss"], row["lr"]) for row in map(json.loads, lines)]
                    for lines in ((tmp_path / name / "metrics.jsonl").read_text().splitlines()
                                  for name in ("split", "whole")))
    assert [step for step, _, _ in split] == [4, 8]
    assert split == whole


def test_a_run_started_with_another_seed_offset_is_not_resumed(tmp_path):
    """`--init` offsets the seed the trainer gets (`modeldir.continued`) but not the run config: a run
    started with --init and rerun without it (or with another --init) resumed silently and went on
    drawing the data and noise of another seed, replaying the samples its parent had seen."""
    cfg = TrainConfig(steps=6, batch_size=4, lr=0.1, warmup_steps=1, log_every=1, ckpt_every=2, seed=123)
    train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False, stop_at=2)
    with pytest.raises(TrainingError, match=r"seed 123, and this one draws with 0: a run started with --init resumes "
                                            r"only with the same --init.*--no-resume"):
        train(_Slow(0.0), _feed, cfg=replace(cfg, seed=0), run_dir=tmp_path,
              run_config={"x": 1}, progress=False)
    assert train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False).resumed_from == 2


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), 0.0, -60.0])
def test_a_time_budget_that_is_not_a_positive_number_is_refused(tmp_path, budget):
    """inf and nan crashed with an OverflowError or ValueError when the schedule was first fitted; 0
    and negative budgets trained one step and ended the run's schedule there, for good."""
    cfg = TrainConfig(steps=50, batch_size=4, lr=0.1, warmup_steps=1, log_every=2, ckpt_every=100)
    with pytest.raises(ConfigError, match=r"time budget .* s: give a positive number of seconds"):
        train(_Slow(0.0), _feed, cfg=cfg, run_dir=tmp_path, run_config={"x": 1}, progress=False, time_budget=budget)
    assert not (tmp_path / "checkpoint.pt").exists()
