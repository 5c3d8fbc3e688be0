"""Training at scale on this CPU: two gloo processes, exact resume, SIGKILL mid-checkpoint, data splits,
embedding shards aligned with image shards."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_scale_helpers import SIZE, StandInClip, TinyStage, clip_batch, clip_step, config, run

import unclip.precision
from unclip.clip.embed import _write_shard, check_aligned, load_embeddings, tar_keys
from unclip.data.export import export_webdataset
from unclip.errors import ConfigError, DataError
from unclip.modeldir import load_checkpoint
from unclip.train.data import epoch_feed, rank_share, webdataset_feed
from unclip.train.metrics import read_metrics

HELPERS = Path(__file__).with_name("train_scale_helpers.py")
LOSSES = ("loss", "mae", "lr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch_two(job: str, out: Path, *, timeout: int) -> None:
    """Run a train_scale_helpers job in two gloo processes under torchrun; it must finish on both.

    One launch in about 16 still ends with a process aborting at interpreter exit, after its work
    and `dist.finish()` ("terminate called without an active exception", torch's C++ runtime; one
    in 4 without `finish`). That abort alone is tolerated: the tests check what the job wrote."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(HELPERS), job, str(out)]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    exit_abort = done.stdout.count("JOB DONE") == 2 and "terminate called without an active exception" in done.stderr
    assert done.returncode == 0 or exit_abort, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two CPU processes talking over gloo, started by torchrun (what `accelerate launch --multi_gpu` runs;
    accelerate's own `--cpu` launcher needs MPI for several processes): the tiny stage 6 steps, 3 steps,
    and an embed."""
    out = tmp_path_factory.mktemp("ddp")
    export_webdataset(out / "wds", split="val", n=10, size=SIZE, shard_size=3, progress=False)
    _launch_two("ddp", out, timeout=240)
    return out


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_two_processes_agree_with_each_other_and_with_one(ddp_run, tmp_path):
    ranks = [torch.load(ddp_run / "full" / f"rank{r}.pt") for r in (0, 1)]
    assert [r["main"] for r in ranks] == [True, False] and all(r["step"] == 6 for r in ranks)
    _close(ranks[0]["state"], ranks[1]["state"], atol=0)  # EMA weights: identical on both ranks

    single, result = run(tmp_path / "one", config())  # the same global batch of 8 in one process
    assert result.world_size == 1
    _close(single.state_dict(), ranks[0]["state"], atol=1e-5)
    raw_one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    raw_two = load_checkpoint(ddp_run / "full" / "checkpoint.pt")
    assert raw_two["world_size"] == 2 and len(raw_two["rng"]) == 2
    _close(raw_one["model"], raw_two["model"], atol=1e-5)
    assert (raw_one["model"]["net.1.weight"] - TinyStage().net[1].weight).norm() > 0.01  # it did train

    rows_one, rows_two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(ddp_run / "full" / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicate lines
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # averaged over both ranks' halves


def test_two_process_clip_loss_is_the_global_batch_loss(ddp_run):
    """Each rank contrasts its half with every caption of the global batch (gathered with gradients):
    the loss and the DDP-averaged gradients are one process's on the whole batch, and a caption
    repeated on the other rank still counts as a positive."""
    batch = clip_batch()
    assert batch["caption"][1] == batch["caption"][6]  # one copy on each rank
    one = clip_step(batch)
    for rank in (0, 1):
        two = torch.load(ddp_run / "clip" / f"rank{rank}.pt")
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["acc_i2t"] == one["acc_i2t"]
        assert two["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
    half = clip_step({"image": batch["image"][:4], "caption": batch["caption"][:4]})
    assert half["loss"] != pytest.approx(one["loss"], rel=1e-3)  # a rank's slice alone is another loss


def test_a_two_process_checkpoint_resumes_in_one_process(ddp_run, tmp_path, caplog):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(ddp_run / "part", part)
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 3
    with caplog.at_level("WARNING"):
        stage, result = run(part, config())
    assert result.resumed_from == 3 and result.step == 6
    assert "reseeded" in caplog.text  # 2 processes' RNG states, 1 process now: said, not hidden
    reference, _ = run(tmp_path / "one", config())
    _close(stage.state_dict(), reference.state_dict(), atol=1e-5)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """FSDP (configs/accelerate/fsdp.yaml's settings) on two CPU processes over gloo, through the
    test-only shim `train_scale_helpers.fsdp_on_cpu`; OUT/from_one starts as a one-process run
    stopped at step 3."""
    out = tmp_path_factory.mktemp("fsdp")
    run(out / "from_one", config(ema_decay=0.0), stop_at=3)
    _launch_two("fsdp", out, timeout=300)
    return out


def _ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]  # weights_only: plain tensors, no DTensors


def test_a_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint(ddp_run):
    """Rank 1 alone is signalled while drawing its fourth batch (ddp_run's OUT/sigterm): both ranks
    stop after step 4 of 20, and the checkpoint holds step 4."""
    messages = [(ddp_run / "sigterm" / f"stopped{rank}.txt").read_text() for rank in (0, 1)]
    for message in messages:
        assert "stopped by SIGTERM after step 4 of 20" in message and "run the same command to resume" in message
    assert load_checkpoint(ddp_run / "sigterm" / "checkpoint.pt")["step"] == 4


def test_fsdp_trains_as_one_process_and_hands_back_whole_weights(fsdp_run, tmp_path):
    single, _ = run(tmp_path / "one", config(ema_decay=0.0))
    ranks = _ranks(fsdp_run / "full")
    assert [r["main"] for r in ranks] == [True, False] and all(r["step"] == 6 for r in ranks)
    for r in ranks:  # every rank's stage holds the whole trained weights, not its shard
        _close(r["state"], single.state_dict(), atol=1e-5)
    saved = load_checkpoint(fsdp_run / "full" / "checkpoint.pt")  # a plain single-file checkpoint
    _close(saved["model"], single.state_dict(), atol=1e-5)
    assert set(saved["optimizer"]["state"]) == {name for name, _ in single.named_parameters()}
    assert (saved["model"]["net.1.weight"] - TinyStage().net[1].weight).norm() > 0.01  # it did train
    bf16 = _ranks(fsdp_run / "bf16")
    bf16_saved = load_checkpoint(fsdp_run / "bf16" / "checkpoint.pt")
    assert set(bf16_saved["optimizer"]["state"]) == set(saved["optimizer"]["state"])
    _close(bf16[0]["state"], bf16[1]["state"], atol=0)
    _close(bf16[0]["state"], single.state_dict(), atol=0.02)  # bf16 autocast: close, not equal
    refused = (fsdp_run / "ema_refused0.txt").read_text()
    assert "ema_decay=0" in refused and "FSDP" in refused


def test_fsdp_checkpoints_resume_under_fsdp_and_in_one_process(fsdp_run, tmp_path):
    import shutil

    whole = _ranks(fsdp_run / "full")[0]["state"]
    resumed = _ranks(fsdp_run / "part")  # stopped at 3, then the same command again
    assert all(r["resumed_from"] == 3 and r["step"] == 6 for r in resumed)
    _close(resumed[0]["state"], whole, atol=1e-6)
    from_one = _ranks(fsdp_run / "from_one")  # a one-process checkpoint continued under FSDP
    assert from_one[0]["resumed_from"] == 3
    _close(from_one[0]["state"], whole, atol=1e-5)

    to_one = tmp_path / "to_one"  # an FSDP checkpoint at step 3 continued in one process
    shutil.copytree(fsdp_run / "to_one", to_one)
    stage, result = run(to_one, config(ema_decay=0.0))
    assert result.resumed_from == 3 and result.step == 6
    _close(stage.state_dict(), whole, atol=1e-5)


def test_fsdp_trains_the_whole_cascade_with_each_stages_blocks_sharded(fsdp_run):
    """configs/accelerate/fsdp.yaml on every stage of `unclip train all`: each residual, attention and
    transformer block an FSDP unit, then the rest of the stage (accelerate's size-based wrap picked
    ModuleLists, which FSDP2 refuses; CLIP's 0-d temperature was refused too)."""
    import unclip

    from unclip.config import preset

    cfg = preset("tiny")
    units, stages, current = (fsdp_run / "all" / "units0.txt").read_text().split(), {}, []
    for unit in units:  # children first, the stage itself last
        if unit == "list":
            continue  # accelerate's own unit of a final norm (the AR prior's) and output layer
        current.append(unit)
        if unit in ("ClipModel", "DiffusionPrior", "ARPrior", "Decoder", "Upsampler"):
            stages[unit], current = current[:-1], []
    assert stages["ClipModel"] == ["CLIPEncoderLayer"] * (cfg.clip.text_layers + cfg.clip.vision_layers)
    assert stages["DiffusionPrior"] == ["BasicTransformerBlock"] * cfg.prior.layers
    assert stages["ARPrior"] == ["TransformerEncoderLayer"] * cfg.ar_prior.layers
    assert sorted(stages["Decoder"]) == ["BasicTransformerBlock"] * 4 + ["ResnetBlock2D"] * 8
    assert set(stages["Upsampler"]) == {"ResnetBlock2D"}

    saved = load_checkpoint(fsdp_run / "all" / "decoder" / "checkpoint.pt")
    assert saved["world_size"] == 2 and all(isinstance(k, str) for k in saved["optimizer"]["state"])  # by name
    image = unclip.load(fsdp_run / "all" / "model").generate("a red circle", n=1, seed=0, steps=2)[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_stages_of_one_process_may_train_in_different_precisions(tmp_path, monkeypatch):
    """`unclip train all` trains every stage in one process; accelerate keeps one mixed precision per
    process and refused the second stage's own ("AcceleratorState has already been initialized")."""
    monkeypatch.setattr(unclip.precision, "native_bf16", lambda device: True)  # bf16 here, whatever the CPU
    first_stage, first = run(tmp_path / "fp32", config(steps=2))
    second_stage, second = run(tmp_path / "bf16", config(steps=2, mixed_precision="bf16", grad_accum=2))
    assert first.step == second.step == 2 and (first.autocast, second.autocast) == ("no", "bf16")
    assert read_metrics(tmp_path / "bf16" / "metrics.jsonl")[-1]["step"] == 2
    same_in_fp32, _ = run(tmp_path / "fp32 again", config(steps=2, grad_accum=2))
    with pytest.raises(AssertionError):  # it did train in bf16: rounded otherwise than float32
        _close(second_stage.state_dict(), same_in_fp32.state_dict(), atol=0)


def test_bf16_trains_in_float32_where_the_cpu_would_emulate_it(tmp_path, monkeypatch, caplog):
    """A CPU without bf16 units (AVX2 only, as most laptops) emulates bf16 autocast at a 30th of
    float32's speed: there `mixed_precision="bf16"` (every preset's) trains in float32, says so once
    per stage, and computes exactly what "no" computes."""
    monkeypatch.setattr(unclip.precision, "native_bf16", lambda device: False)
    monkeypatch.setattr(unclip.precision, "_TOLD", set())
    with caplog.at_level("WARNING", logger="unclip.precision"):
        bf16, _ = run(tmp_path / "bf16", config(steps=3, ckpt_every=1, mixed_precision="bf16"), stop_at=1)
        bf16, result = run(tmp_path / "bf16", config(steps=3, ckpt_every=1, mixed_precision="bf16"))  # resumed
    assert result.autocast == "no"  # what the stage's provenance records (`clip.stage.provenance`)
    fp32, _ = run(tmp_path / "fp32", config(steps=3, ckpt_every=1))
    _close(bf16.state_dict(), fp32.state_dict(), atol=0)
    said = [r.getMessage() for r in caplog.records if "no bfloat16 units" in r.getMessage()]
    assert len(said) == 1 and "training in float32 instead" in said[0], said


def test_validation_is_fixed_leaves_training_alone_and_is_the_same_on_two_processes(ddp_run, tmp_path):
    """`train.eval_every`: mean losses over fixed held-out batches (shapes world's val split here) every
    k steps and at the end, with the same random draws each pass; training is what it was without
    them (losses, weights, exact resume); two processes log one process's numbers."""
    cfg = config(steps=8, ckpt_every=4, log_every=2, eval_every=3, eval_batches=2)
    whole, result = run(tmp_path / "whole", cfg, noise=0.1)
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6, 8] and result.validation == val[-1]
    assert set(val[0]) == {"step", "val_loss", "val_mae"} and val[-1]["val_loss"] < val[0]["val_loss"]
    plain, _ = run(tmp_path / "plain", config(steps=8, ckpt_every=4, log_every=2), noise=0.1)
    _close(whole.state_dict(), plain.state_dict(), atol=0)  # validating drew nothing from the training RNG
    train_rows = [{k: r[k] for k in LOSSES} for r in rows if "loss" in r]
    assert train_rows == [{k: r[k] for k in LOSSES} for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]

    run(tmp_path / "split", cfg, noise=0.1, stop_at=4)  # stopped between two validations, resumed
    resumed, _ = run(tmp_path / "split", cfg, noise=0.1)
    _close(resumed.state_dict(), whole.state_dict(), atol=0)
    assert [r for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "val_loss" in r] == val

    run(tmp_path / "one", config(eval_every=3, eval_batches=2))  # no input noise: ranks draw alike
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "val_loss" in r]
    two = [r for r in read_metrics(ddp_run / "val" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in two] == [3, 6] and len(one) == len(two)
    for a, b in zip(one, two, strict=True):  # each rank validated its half of each batch, averaged
        assert a["val_mae"] == pytest.approx(b["val_mae"], rel=1e-4)


def test_resume_is_exact(tmp_path):
    """Stopped at step 4 of 8 and resumed: the same losses and bit-identical weights, with noise drawn
    from the global RNG, EMA, warmup + cosine, gradient accumulation and a data-loader worker."""
    cfg = config(steps=8, ckpt_every=4, log_every=2, grad_accum=2, num_workers=1)
    whole, _ = run(tmp_path / "whole", cfg, noise=0.1)
    _, first = run(tmp_path / "split", cfg, noise=0.1, stop_at=4)
    assert first.step == 4
    stopped = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["seconds"]
    assert 0 < stopped <= first.seconds
    resumed, second = run(tmp_path / "split", cfg, noise=0.1)
    assert second.resumed_from == 4 and second.step == 8
    assert second.seconds > stopped  # the run's training time counts both calls, not only the last

    rows_whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    rows_split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in rows_split] == [2, 4, 6, 8]
    assert [{k: r[k] for k in LOSSES} for r in rows_split] == [{k: r[k] for k in LOSSES} for r in rows_whole]
    _close(resumed.state_dict(), whole.state_dict(), atol=0)  # EMA weights
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    _close(a["model"], b["model"], atol=0)
    assert a["scheduler"] == b["scheduler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        _close(sa, sb, atol=0)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    threads = str(torch.get_num_threads())
    child = subprocess.Popen([sys.executable, str(HELPERS), "killsave", str(run_dir), "--threads", threads],
                             env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        began = time.monotonic()
        line = child.stdout.readline()
        while line and "WRITING" not in line and time.monotonic() - began < 120:
            line = child.stdout.readline()
        assert "WRITING" in line, child.stderr.read()[-3000:]
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert list(run_dir.glob(".checkpoint.pt.*.tmp")), "the killed write left its half-written temporary file"
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2  # the previous checkpoint, whole

    cfg = config(ckpt_every=2)
    resumed, result = run(run_dir, cfg, noise=0.1)
    assert result.resumed_from == 2 and result.step == 6
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))  # cleaned up on resume
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    whole, _ = run(tmp_path / "whole", cfg, noise=0.1)
    _close(resumed.state_dict(), whole.state_dict(), atol=1e-6)


def test_ranks_take_disjoint_slices_that_make_up_the_global_batch():
    data = [{"i": i} for i in range(10)]
    one = epoch_feed(data, batch_size=4, seed=3)(0)
    first_one = next(one)["i"].tolist()
    slices = [list(rank_share(iter(range(8)), batch_size=4, rank=r, world=2)) for r in (0, 1)]
    assert slices == [[0, 1, 4, 5], [2, 3, 6, 7]]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert first_one == order[:4]
    with pytest.raises(ConfigError, match="multiple of 3"):
        list(rank_share(iter(range(8)), batch_size=4, rank=0, world=3))


def test_webdataset_feed_streams_endlessly_and_reproducibly(tmp_path):
    export_webdataset(tmp_path / "wds", split="val", n=6, size=SIZE, shard_size=2, progress=False)
    feed = webdataset_feed(str(tmp_path / "wds" / "{000000..000002}.tar"), size=SIZE, batch_size=4, seed=1,
                           shuffle_buffer=4)
    batches = [next(it) for it in [feed(0)] for _ in range(5)]  # 20 samples from 6: resampled, endless
    assert batches[0]["image"].shape == (4, 3, SIZE, SIZE) and len(batches[0]["caption"]) == 4
    again = feed(0)
    assert [next(again)["key"] for _ in range(5)] == [b["key"] for b in batches]  # seeded: the same stream
    keys = {k for b in batches for k in b["key"]}
    assert keys <= {f"{i:09d}" for i in range(6)} and len(keys) > 3
    with pytest.raises(DataError, match="000007.tar"):
        webdataset_feed(str(tmp_path / "wds" / "{000006..000007}.tar"), size=SIZE, batch_size=4, seed=1)


def _damaged_shard(path: Path, source: Path) -> None:
    """`source` with sample 1's image cut to a third, sample 2's image replaced by garbage, sample 3's
    caption in Latin-1, sample 4's image made non-square (wide) and sample 5's a PNG whose pixels end
    early, each a common flaw of scraped shards."""
    import io
    import tarfile

    from PIL import Image

    from png_helpers import short_png

    with tarfile.open(source) as src, tarfile.open(path, "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if (key, ext) == ("000000001", "jpg"):
                data = data[: len(data) // 3]
            elif (key, ext) == ("000000002", "jpg"):
                data = b"not an image at all"
            elif (key, ext) == ("000000003", "txt"):
                data = "un carré rouge".encode("latin-1")
            elif (key, ext) == ("000000004", "jpg"):
                wide, image = io.BytesIO(), Image.new("RGB", (48, 16), (200, 30, 30))
                image.paste((30, 200, 30), (16, 0, 32, 16))  # red | green | blue: the centre square is green
                image.paste((30, 30, 200), (32, 0, 48, 16))
                image.save(wide, format="PNG")
                data = wide.getvalue()
            elif (key, ext) == ("000000005", "jpg"):
                data = short_png(np.full((SIZE, SIZE, 3), 200, dtype=np.uint8), rows=SIZE // 2)
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_damaged_shard_samples_are_skipped_in_training_and_embedding(tmp_path, caplog, monkeypatch):
    """A cut or garbage image, or a caption that is not UTF-8, in a shard stopped training with PIL's or
    Python's error; now each is skipped and logged, in the training feed and in `unclip embed` (whose
    shards record the keys they skipped, so they still line up), and embed centre-crops as training does."""
    from unclip.clip.embed import embed_dataset, load_embeddings

    export_webdataset(tmp_path / "clean", split="val", n=8, size=SIZE, shard_size=8, progress=False)
    (tmp_path / "wds").mkdir()
    _damaged_shard(tmp_path / "wds" / "000000.tar", tmp_path / "clean" / "000000.tar")
    pattern = str(tmp_path / "wds" / "000000.tar")
    monkeypatch.setattr("unclip.train.data._skipped", set())  # what this process has logged so far
    with caplog.at_level("WARNING", logger="unclip.train.data"):
        feed = webdataset_feed(pattern, size=SIZE, batch_size=4, seed=0, shuffle_buffer=4)(0)
        keys = {k for _ in range(10) for k in next(feed)["key"]}
    bad = {"000000002", "000000003", "000000005"}  # garbage, Latin-1 caption, PNG cut short (a cut JPEG may decode)
    assert not keys & bad and len(keys) >= 4
    assert "unreadable image" in caplog.text and "non-UTF-8 caption" in caplog.text

    embed_dataset(StandInClip(), tmp_path / "emb", source="webdataset", path=pattern, progress=False)
    embeddings = load_embeddings(tmp_path / "emb", images=pattern)  # lines up with the shard, less the skipped
    assert not set(embeddings["keys"]) & bad and len(embeddings["keys"]) >= 4
    from unclip.data.check import check_data

    report = check_data(pattern, size=SIZE, progress=False)  # `unclip data check` reads them as training does
    assert report.usable == len(embeddings["keys"]) and report.not_square == 1
    assert report.skipped.get("corrupt or unreadable images", 0) + report.skipped["empty or non-UTF-8 captions"] == \
        8 - report.usable
    wide = list(embeddings["keys"]).index("000000004")
    green = StandInClip().encode_image(torch.tensor([-0.76, 0.57, -0.76])[None, :, None, None].expand(1, 3, SIZE, SIZE))
    np.testing.assert_allclose(embeddings["image_embeds"][wide].astype(np.float32)[:3], green[0, :3].numpy(),
                               atol=0.02)  # the centre square, as training crops it; squashed it was a mix


def test_embed_on_two_ranks_writes_every_shard_aligned(ddp_run):
    meta = json.loads((ddp_run / "emb" / "meta.json").read_text())
    assert [s["name"] for s in meta["shards"]] == [f"{i:06d}.npz" for i in range(4)] and meta["total"] == 10
    embeddings = load_embeddings(ddp_run / "emb")  # checked against the image shards it names
    assert list(embeddings["keys"]) == [f"{i:09d}" for i in range(10)]
    check_aligned(ddp_run / "emb", str(ddp_run / "wds" / "{000000..000003}.tar"))


def test_misaligned_or_missing_embedding_shards_are_errors_naming_the_shard(tmp_path):
    export_webdataset(tmp_path / "wds", split="val", n=6, size=SIZE, shard_size=3, progress=False)
    pattern = str(tmp_path / "wds" / "{000000..000001}.tar")
    emb = tmp_path / "emb"
    for i in range(2):
        keys = tar_keys(tmp_path / "wds" / f"{i:06d}.tar")
        _write_shard(emb / f"{i:06d}.npz", keys, torch.zeros(3, 4), torch.zeros(3, 4), ["c"] * 3)
    check_aligned(emb, pattern)

    keys = tar_keys(tmp_path / "wds" / "000001.tar")
    _write_shard(emb / "000001.npz", [keys[0], keys[2], keys[1]], torch.zeros(3, 4), torch.zeros(3, 4), ["c"] * 3)
    with pytest.raises(DataError, match=r"000001\.npz does not line up with image shard .*000001\.tar.*position 1"):
        check_aligned(emb, pattern)
    (emb / "000001.npz").unlink()
    with pytest.raises(DataError, match=r"000001\.npz is missing"):
        check_aligned(emb, pattern)


class _TurnsNaN(TinyStage):
    def __init__(self, at_call: int):
        super().__init__()
        self.calls, self.at_call = 0, at_call

    def forward(self, batch):
        self.calls += 1
        losses = super().forward(batch)
        return {**losses, "loss": losses["loss"] * float("nan")} if self.calls >= self.at_call else losses


def test_a_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path):
    from unclip.train.data import shapes_feed
    from unclip.train.trainer import TrainingError, train

    cfg = config(ckpt_every=2)
    feed = shapes_feed(size=SIZE, batch_size=cfg.batch_size, lang="en", seed=0)
    with pytest.raises(TrainingError, match=r"non-finite at step 4 .*checkpoint.pt\) is intact"):
        train(_TurnsNaN(at_call=5), feed, cfg=cfg, run_dir=tmp_path, run_config={}, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    with pytest.raises(TrainingError, match="non-finite at step 0 .*no checkpoint was written yet"):
        train(_TurnsNaN(at_call=1), feed, cfg=cfg, run_dir=tmp_path / "fresh", run_config={}, progress=False)


def test_metrics_go_to_jsonl_and_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import unclip.train.metrics as metrics

    scalars = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def flush(self):
            pass

        def close(self):
            scalars.append("closed")

    purges = []

    def writer(directory, purge_step):
        purges.append(purge_step)
        return Writer()

    monkeypatch.setattr(metrics, "_tensorboard_writer", writer)
    run(tmp_path, config(steps=2))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert ("loss", 1) in scalars and ("lr", 2) in scalars and scalars[-1] == "closed"
    # a resumed run hides what TensorBoard holds past its checkpoint, as metrics.jsonl drops it
    run(tmp_path / "resumed", config(steps=4, ckpt_every=2), stop_at=3)
    run(tmp_path / "resumed", config(steps=4, ckpt_every=2))
    assert purges == [1, 1, 4]  # the checkpoint at step 3 (stop_at writes one)


def test_holdout_keeps_the_same_pairs_out_of_every_training_feed(tmp_path):
    """`data.holdout` picks pairs by a hash of their keys: no training feed of a folder or of shards ever
    yields one, the evaluations read exactly those, and the choice is the same everywhere."""
    from dataclasses import replace

    from unclip.config import DataConfig, UnclipConfig, check
    from unclip.data.export import export_folder
    from unclip.train.data import feed_for, first_pairs, held_out

    assert abs(sum(held_out(f"key{i}", 0.3) for i in range(4000)) / 4000 - 0.3) < 0.03
    assert not any(held_out(f"key{i}", 0.0) for i in range(100))
    export_folder(tmp_path / "folder", split="val", n=80, size=SIZE, progress=False)
    export_webdataset(tmp_path / "wds", split="val", n=80, size=SIZE, shard_size=40, progress=False)
    shards = str(tmp_path / "wds" / "{000000..000001}.tar")
    for source, path in (("folder", str(tmp_path / "folder")), ("webdataset", shards)):
        data = DataConfig(source=source, path=path, holdout=0.3)
        keys = [f"{i:09d}" for i in range(80)]
        kept_out = {k for k in keys if held_out(k, 0.3)}
        assert 10 < len(kept_out) < 40
        feed = feed_for(data, size=SIZE, batch_size=8)(0)
        seen = {k for _ in range(30) for k in next(feed)["key"]}  # 240 samples: every training pair, some twice
        assert seen == set(keys) - kept_out, source
        images, captions = first_pairs(data, 100, size=SIZE, part="holdout")
        assert len(captions) == len(kept_out) and images.shape == (len(kept_out), 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="data.holdout"):
        check(replace(UnclipConfig(), data=DataConfig(source="folder", path="x", holdout=1.0)))
    with pytest.raises(ConfigError, match="shapes world has its own"):
        check(replace(UnclipConfig(), data=DataConfig(holdout=0.1)))


def test_shards_without_one_usable_sample_are_an_error_not_an_endless_wait(tmp_path):
    """A shard of undecodable images kept the resampled stream looking for a sample forever, at full CPU,
    deaf to SIGTERM (no step ever ended): the feed now reads the shards once up front."""
    import io
    import tarfile

    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            for ext, data in (("jpg", b"not an image at all"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    started = time.monotonic()
    with pytest.raises(DataError, match=r"000000.tar holds no usable image-caption pair.*unclip data check"):
        webdataset_feed(str(path), size=SIZE, batch_size=2, seed=0)
    assert time.monotonic() - started < 10
    export_webdataset(tmp_path / "good", split="val", n=4, size=SIZE, shard_size=4, progress=False)
    with pytest.raises(DataError, match="keeps all 4 pairs out of training, so there is nothing to train on"):
        webdataset_feed(str(tmp_path / "good" / "000000.tar"), size=SIZE, batch_size=2, seed=0, holdout=1.0)
    assert next(webdataset_feed(str(tmp_path / "good" / "000000.tar"), size=SIZE, batch_size=2, seed=0)(0))


def test_a_shard_holds_the_image_kinds_a_folder_does(tmp_path):
    """Shards were read for jpg/jpeg/png/webp only; a folder also for bmp, gif and tif(f): the same
    pairs trained from a folder were "samples without an image" once packed into shards."""
    import io
    import tarfile

    from PIL import Image

    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, ext in enumerate(("bmp", "gif", "tiff")):
            image = io.BytesIO()
            Image.new("RGB", (SIZE, SIZE), (200, 30 * i, 0)).save(image, format={"tiff": "TIFF"}.get(ext, ext.upper()))
            for name, data in ((f"{i:09d}.{ext}", image.getvalue()), (f"{i:09d}.txt", b"a red square")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batch = next(webdataset_feed(str(path), size=SIZE, batch_size=3, seed=0)(0))
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["image"][:, 0].mean() > 0.5  # red, decoded
