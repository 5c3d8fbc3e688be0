import json

import pytest
import torch
from torch.utils.data import DataLoader

from unclip.data.shapes import DEFAULT_TRAIN_LENGTH, ShapesDataset, ShapesStream, to_pil, to_tensor
from unclip.data.world import Scene, sample
from unclip.errors import DataError


def test_items_and_tensor_conversion():
    ds = ShapesDataset("val", size=32)
    assert len(ds) == 5000
    item = ds[7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert Scene.from_dict(json.loads(item["scene"])) == sample("val", 7).scene
    assert torch.equal(to_tensor(to_pil(item["image"])), item["image"])


def test_same_samples_whatever_the_worker_count():
    ds = ShapesDataset("train", size=16, length=24)
    serial = list(DataLoader(ds, batch_size=6, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=6, num_workers=2))
    for a, b in zip(serial, parallel):
        assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"] and a["caption"] == b["caption"]


def test_stream_splits_indices_disjointly_across_workers():
    one = next(iter(DataLoader(ShapesStream(size=8), batch_size=20, num_workers=0)))["key"]
    two = [b["key"] for b, _ in zip(DataLoader(ShapesStream(size=8), batch_size=10, num_workers=2), range(2))]
    keys = two[0] + two[1]
    assert len(set(keys)) == 20
    assert set(keys) == set(one)


def test_stream_resumes_at_any_sample():
    full = next(iter(DataLoader(ShapesStream(size=8, lang="th"), batch_size=12)))
    tail = next(iter(DataLoader(ShapesStream(size=8, lang="th", start=5), batch_size=7)))
    assert full["key"][5:] == tail["key"]
    assert torch.equal(full["image"][5:], tail["image"])


def test_languages():
    ds = ShapesDataset("test", size=8, lang="mix")
    langs = [ds[i]["lang"] for i in range(200)]
    assert 60 < langs.count("th") < 140
    assert all(ShapesDataset("test", size=8, lang="th")[i]["lang"] == "th" for i in range(10))


def test_seeds_and_splits_give_different_images():
    a = ShapesDataset("train", size=16, seed=0, length=8)
    b = ShapesDataset("train", size=16, seed=1, length=8)
    assert not all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    assert all(torch.equal(a[i]["image"], ShapesDataset("train", size=16, length=8)[i]["image"]) for i in range(8))


def test_finite_splits_end_and_lengths_are_checked():
    tail = list(ShapesStream("val", size=8, start=4995))
    assert [item["key"] for item in tail] == [f"val-{i:09d}" for i in range(4995, 5000)]
    assert len(ShapesDataset("train", size=8)) == DEFAULT_TRAIN_LENGTH
    assert len(ShapesDataset("unseen", size=8, length=10)) == 10
    with pytest.raises(DataError, match="1..5000"):
        ShapesDataset("val", size=8, length=6000)
    with pytest.raises(DataError, match="valid splits"):
        ShapesDataset("validation", size=8)
    with pytest.raises(DataError, match="at least 8"):
        ShapesStream(size=4)


@pytest.mark.parametrize("hard_negatives", [0.0, 0.5])
def test_training_feed_draws_scene_kinds_with_the_configured_odds(hard_negatives):
    from collections import Counter

    from unclip.config import DataConfig
    from unclip.train.data import feed_for

    def kinds(scenes, n=240):
        feed = feed_for(DataConfig(scenes=scenes), size=8, batch_size=n, hard_negatives=hard_negatives)
        batch = next(feed(0))
        return [json.loads(s)["kind"] for s in batch["scene"]], batch["caption"]

    default, captions = kinds(DataConfig.scenes)
    pairs, pair_captions = kinds((0.1, 0.8, 0.1))
    assert Counter(default)["pair"] / 240 < 0.5 < Counter(pairs)["pair"] / 240
    assert Counter(kinds((0.0, 1.0, 0.0))[0]) == {"pair": 240}
    # the kind takes one draw whatever the odds: a sample that is a pair either way is the same pair
    same = [i for i in range(240) if default[i] == pairs[i] == "pair"]
    assert same and all(captions[i] == pair_captions[i] for i in same)
