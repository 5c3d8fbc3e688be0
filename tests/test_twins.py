"""Hard-negative twins for CLIP training (unclip.data.twins) and the shapes feed that weaves them in."""

import pytest
import torch

from unclip.config import preset
from unclip.data.shapes import ShapesDataset
from unclip.data.twins import MAX_GROUP, TWIN_ATTRIBUTES, TwinsDataset, is_twin, twin_group, twin_sample
from unclip.data.world import HELD_OUT, INVERSE, sample
from unclip.errors import ConfigError
from unclip.train.data import shapes_feed

N = 600


def _differences(a, b) -> set[str]:
    """The object fields (and relation) in which two scenes differ; the scene kind and background must not."""
    assert (a.kind, a.background, a.count, len(a.objects)) == (b.kind, b.background, b.count, len(b.objects))
    fields = {f for oa, ob in zip(a.objects, b.objects) for f, v in oa.to_dict().items() if ob.to_dict()[f] != v}
    return fields | ({"relation"} if a.relation != b.relation else set())


def test_a_twin_is_a_pure_function_of_its_index():
    assert twin_sample(17, seed=3) == twin_sample(17, seed=3)
    assert twin_sample(17, seed=3) != twin_sample(17, seed=4)
    a, b = TwinsDataset(size=16, fraction=1.0), TwinsDataset(size=16, fraction=1.0)
    for i in (0, 1, 41):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["key"] == y["key"] and torch.equal(x["image"], y["image"])


def test_twins_differ_in_exactly_the_chosen_attribute_and_never_use_a_held_out_pair():
    seen = set()
    for i in range(N):
        original, twin, attribute = twin_sample(i)
        assert original == sample("train", i)  # the first of a pair is the plain train sample
        assert twin.lang == original.lang and twin.caption != original.caption
        changed = _differences(original.scene, twin.scene)
        allowed = {"shape": {"shape"}, "colour": {"colour"}, "size": {"size", "cx", "cy"},
                   "where": {"cx", "cy", "position", "relation"}}[attribute]
        assert changed and changed <= allowed, (attribute, changed)
        assert attribute != "size" or "size" in changed
        if original.scene.kind == "single" and attribute == "where":
            assert "position" in changed
        if original.scene.kind == "pair" and attribute == "where":
            assert twin.scene.relation == INVERSE[original.scene.relation]
        if attribute in ("shape", "colour") and original.scene.kind != "count":
            moved = sum(oa != ob for oa, ob in zip(original.scene.objects, twin.scene.objects))
            assert moved == 1  # one object of a pair changes; a counting scene's copies change together
        for obj in twin.scene.objects:
            assert (obj.colour, obj.shape) not in HELD_OUT
            assert obj.colour != twin.scene.background
        if twin.scene.kind == "pair":
            a, b = twin.scene.objects
            assert (a.colour, a.shape) != (b.colour, b.shape)
        seen.add(attribute)
    assert seen == set(TWIN_ATTRIBUTES) - {"binding"}  # the default odds give binding none


def test_a_binding_group_rebinds_a_pair_scenes_colours_shapes_and_places():
    weights = (0, 0, 0, 0, 1)
    kinds = set()
    for i in range(300):
        group, attribute = twin_group(i, group=4, weights=weights)
        original = group[0].scene
        if original.kind != "pair":  # one object binds nothing: the group sweeps the shape instead
            assert attribute == "shape"
        if attribute != "binding":  # (or a pair whose objects share a colour, or a trade makes a held-out pair)
            continue
        for s in group[1:]:
            scene = s.scene
            for field in ("colour", "shape"):
                assert sorted(getattr(o, field) for o in scene.objects) == \
                    sorted(getattr(o, field) for o in original.objects)
            assert {(o.cx, o.cy) for o in scene.objects} == {(o.cx, o.cy) for o in original.objects}
            assert all((o.colour, o.shape) not in HELD_OUT for o in scene.objects)
        assert len({str(s.scene.to_dict()) for s in group}) == 4 and len({s.caption for s in group}) == 4
        kinds.add(original.kind)
    assert kinds == {"pair"}
    pairs = [twin_group(i, weights=weights) for i in range(300)]
    changes = {frozenset(_differences(g[0].scene, g[1].scene)) for g, a in pairs if a == "binding"}
    assert {frozenset({"colour"}), frozenset({"shape"})} <= changes  # colours traded, shapes traded
    assert any("relation" in c for c in changes)  # places traded


def test_a_twin_group_sets_one_attribute_of_one_object_to_distinct_values():
    fields = {"shape": {"shape"}, "colour": {"colour"}, "where": {"cx", "cy", "position", "relation"}}
    seen = set()
    for i in range(200):
        assert twin_group(i)[0] == list(twin_sample(i)[:2])  # a group of two is a twin pair
        group, attribute = twin_group(i, group=4)
        assert group[0] == sample("train", i) and len(group) == 4
        assert len({s.caption for s in group}) == 4 and len({s.key for s in group}) == 4
        for a in range(4):
            for b in range(a + 1, 4):
                changed = _differences(group[a].scene, group[b].scene)
                assert changed and changed <= fields[attribute], (attribute, changed)
        for s in group[1:]:
            assert all((o.colour, o.shape) not in HELD_OUT and o.colour != s.scene.background for o in s.scene.objects)
        seen.add(attribute)
    assert seen == {"shape", "colour", "where"}  # a size only flips: a size group of four falls back to shape
    with pytest.raises(ValueError, match="2 to"):
        twin_group(0, group=MAX_GROUP + 1)


def test_the_twin_stream_keeps_a_group_together_in_a_batch():
    data = TwinsDataset(size=16, fraction=1.0, group=4)
    for k in range(5):
        assert [data.sample(4 * k + j) for j in range(4)] == twin_group(4 * k, group=4)[0]
    batch = next(shapes_feed(size=16, batch_size=8, lang="mix", seed=0, hard_negatives=1.0, twin_group=4)(0))
    assert batch["key"][1:4] == [batch["key"][0] + s for s in ("-twin", "-twin2", "-twin3")]
    assert batch["key"][5] == batch["key"][4] + "-twin"


def test_the_twin_stream_pairs_neighbours_and_keeps_the_plain_split_elsewhere():
    fraction = 0.5
    data = TwinsDataset(size=16, fraction=fraction)
    twins = [k for k in range(200) if is_twin(k, seed=0, fraction=fraction)]
    assert 60 < len(twins) < 140
    for k in range(40):
        assert data.sample(2 * k) == sample("train", 2 * k)
        second = data.sample(2 * k + 1)
        if k in twins:
            assert second == twin_sample(2 * k)[1]
        else:
            assert second == sample("train", 2 * k + 1)
    plain = ShapesDataset("train", size=16, length=2**62)
    assert all(TwinsDataset(size=16, fraction=0.0).sample(i) == sample("train", i) for i in range(20))
    assert torch.equal(TwinsDataset(size=16, fraction=0.0)[5]["image"], plain[5]["image"])
    with pytest.raises(ValueError, match="fraction"):
        TwinsDataset(size=16, fraction=1.5)


def test_the_feed_resumes_exactly_and_keeps_twins_in_one_batch():
    feed = shapes_feed(size=16, batch_size=8, lang="mix", seed=0, hard_negatives=1.0)
    stream = feed(0)
    batches = [next(stream) for _ in range(3)]
    for b in batches:
        for k in range(4):
            first, second = b["caption"][2 * k], b["caption"][2 * k + 1]
            assert first != second and b["key"][2 * k + 1] == b["key"][2 * k] + "-twin"
    resumed = next(feed(16))  # step 2 of the same run
    assert resumed["caption"] == batches[2]["caption"] and torch.equal(resumed["image"], batches[2]["image"])


def test_hard_negatives_is_a_checked_clip_setting():
    assert preset("tiny").clip.hard_negatives == 0.0
    assert preset("shapes").override(["clip.hard_negatives=0.5"]).clip.hard_negatives == 0.5
    with pytest.raises(ConfigError, match="hard_negatives"):
        preset("shapes").override(["clip.hard_negatives=1.5"])
    assert preset("shapes").override(["clip.twin_group=4"]).clip.twin_group == 4
    with pytest.raises(ConfigError, match="twin_group"):
        preset("shapes").override([f"clip.twin_group={MAX_GROUP + 1}"])
    with pytest.raises(ConfigError, match="twin_weights"):
        preset("shapes").override(["clip.twin_weights=[0, 0, 0, 0]"])


def test_twin_weights_choose_what_a_group_changes():
    only = {"shape": (1, 0, 0, 0), "colour": (0, 1, 0, 0)}
    for attribute, weights in only.items():
        assert {twin_group(i, group=3, weights=weights)[1] for i in range(100)} == {attribute}
    data = TwinsDataset(size=16, fraction=1.0, weights=only["colour"])
    assert data.sample(1) == twin_group(0, weights=only["colour"])[0][1]
    with pytest.raises(ValueError, match="weights"):
        twin_group(0, weights=(1, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="weights"):
        twin_group(0, weights=(1, -1))
    # weights written before "binding" existed read as its odds being 0
    assert twin_group(5, group=3, weights=(0.7, 0.1, 0.1, 0.1)) == twin_group(5, group=3)
