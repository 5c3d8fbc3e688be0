import dataclasses
import json

import numpy as np
import pytest

from unclip.data import vocabulary, world
from unclip.data.world import (
    COLORS, COUNT_EN, COUNT_TH, HELD_OUT, POSITION_EN, POSITION_TH, RELATION_EN, RELATION_TH, SHAPES, SIZE_TH,
    SIZES, Scene, canonical_caption, sample, sample_scene,
)
from unclip.errors import DataError


def _pairs(scene):
    return {(o.colour, o.shape) for o in scene.objects}


def test_no_held_out_pair_in_100k_train_scenes():
    for i in range(100_000):
        scene = sample_scene(np.random.default_rng([0, 0, i]), "train")
        assert not (_pairs(scene) & HELD_OUT), (i, scene)


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_and_test_never_hold_a_held_out_pair(split):
    assert all(not (_pairs(sample(split, i).scene) & HELD_OUT) for i in range(3000))


def test_every_unseen_scene_holds_a_held_out_pair_and_all_eight_appear():
    seen = set()
    for i in range(2000):
        scene = sample("unseen", i).scene
        assert (scene.objects[0].colour, scene.objects[0].shape) in HELD_OUT
        if scene.kind == "pair":  # the reference of a pair is an allowed pair
            assert (scene.objects[1].colour, scene.objects[1].shape) not in HELD_OUT
        seen |= _pairs(scene) & HELD_OUT
    assert seen == HELD_OUT


def test_same_index_same_sample_and_seeds_differ():
    assert sample("train", 12345, seed=3) == sample("train", 12345, seed=3)
    assert sample("train", 5, seed=0).scene != sample("train", 5, seed=1).scene
    assert sample("val", 5).scene != sample("test", 5).scene


def test_scene_json_round_trip():
    for i in range(200):
        scene = sample("train", i).scene
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))).to_dict() == scene.to_dict()


def test_every_attribute_appears_in_captions_in_both_languages():
    en = " ".join(sample("train", i, lang="en").caption for i in range(4000))
    th = " ".join(sample("train", i, lang="th").caption for i in range(4000))
    for name, colour in COLORS.items():
        assert name in en and f"สี{colour.th}" in th
    for name, (thai, classifier) in SHAPES.items():
        assert name in en and thai in th
    for size in SIZES:
        assert f" {size} " in en and f"ขนาด{SIZE_TH[size]}" in th
    for position in POSITION_EN:
        assert any(p in en for p in POSITION_EN[position]) and POSITION_TH[position] in th
    for relation in RELATION_EN:
        assert any(p in en for p in RELATION_EN[relation]) and any(p in th for p in RELATION_TH[relation])
    for count in COUNT_EN:
        assert f"{COUNT_EN[count]} " in en
        assert any(f"{COUNT_TH[count]}{cls}" in th for _, cls in SHAPES.values())
    for background, (_, thai) in world.BACKGROUNDS.items():
        if background != "black":
            assert f"{background} background" in en and f"พื้นหลังสี{thai}" in th


def _colour_words(text, lang):
    """The colours a caption names. English: whole words. Thai has no spaces, so whole words come
    from `thai_words`, and a colour counts only right after สี ("colour"): that rules out look-alikes
    such as ขาว (white) inside ข้าวหลามตัด (diamond) or สี inside สี่ (four)."""
    if lang == "en":
        return {w for w in text.split() if w in COLORS}
    words = vocabulary.thai_words(text)
    by_thai = {c.th: name for name, c in COLORS.items()}
    return {by_thai[b] for a, b in zip(words, words[1:]) if a == "สี" and b in by_thai}


def _longest(text, phrases):
    found = [p for p in phrases if p in text]
    return max(found, key=len) if found else None


@pytest.mark.parametrize("lang", ["en", "th"])
def test_captions_agree_with_their_scene(lang):
    position_phrases = ({p: k for k, ps in POSITION_EN.items() for p in ps} if lang == "en"
                        else {p: k for k, p in POSITION_TH.items()})
    said_positions = set()
    for i in range(3000):
        s = sample("train", i, lang=lang)
        scene, text = s.scene, s.caption
        assert _colour_words(text, lang) - {scene.background} == {o.colour for o in scene.objects}, (text, scene)
        for o in scene.objects:
            assert (o.shape if lang == "en" else SHAPES[o.shape][0]) in text, (text, o)
        if scene.kind == "count":
            word = COUNT_EN[scene.count] if lang == "en" else COUNT_TH[scene.count] + SHAPES[scene.objects[0].shape][1]
            assert word in text
        if scene.kind == "single":  # a position phrase, when the template has one, is the object's cell
            phrase = _longest(text, position_phrases)
            if phrase is not None:
                assert position_phrases[phrase] == scene.objects[0].position, (text, scene)
                said_positions.add(position_phrases[phrase])
        if scene.kind == "pair":  # the relation, read from whichever object the caption names first
            a, b = scene.objects
            if lang == "en":
                ia, ib = text.index(f"{a.colour} {a.shape}"), text.index(f"{b.colour} {b.shape}")
                said = next(r for r, phrases in RELATION_EN.items() if any(f" {p} " in text for p in phrases))
            else:
                ia = text.index(f"{SHAPES[a.shape][0]}สี{COLORS[a.colour].th}")
                ib = text.index(f"{SHAPES[b.shape][0]}สี{COLORS[b.colour].th}")
                said = next(r for r, phrases in RELATION_TH.items() if any(p in text for p in phrases))
            assert said == (scene.relation if ia < ib else world.INVERSE[scene.relation]), text
        if scene.background != "black":
            assert (f"{scene.background} background" if lang == "en" else "พื้นหลัง") in text, text
    assert said_positions == set(POSITION_TH)


def test_thai_captions_are_made_of_known_words():
    for i in range(2000):
        text = sample("unseen" if i % 2 else "train", i, lang="th").caption
        words = vocabulary.thai_words(text)
        assert all(w in world.THAI_WORDS for w in words) and "".join(words) == text.replace(" ", ""), text


def test_the_vocabulary_holds_every_caption_word_and_flags_the_rest():
    captions = [sample(split, i, lang=lang).caption for split in ("train", "unseen", "val") for lang in ("en", "th")
                for i in range(3500)]
    vocab = vocabulary.vocabulary()
    assert vocab == {w for text in captions for w in vocabulary.caption_words(text)}  # 2,000 per language meet all
    assert [text for text in captions if vocabulary.unknown_relations(text)] == []  # nor is a relation of theirs odd
    assert {"circle", "hexagons", "top-left", "วงกลม", "ข้าวหลามตัด", "สี่"} <= vocab
    assert vocabulary.unknown_words("a red circle above a blue square") == []
    assert vocabulary.unknown_words("A Dog, a dog and a red skateboard!") == ["dog", "and", "skateboard"]
    # สี่เหลี่ยม: inside สี่เหลี่ยมจัตุรัส
    assert vocabulary.unknown_words("วงกลมสีแดงอยู่เหนือสี่เหลี่ยมสีน้ำเงิน") == []
    assert vocabulary.unknown_words("หมาสีแดงกินวงกลม") == ["หมา", "กิน"]  # dog, eats: unknown runs kept whole
    assert vocabulary.unknown_words("a red circle 42") == ["42"]


def test_a_relation_put_in_known_words_the_captions_never_put_together_is_named():
    """"อยู่บน" (is on) and "on top of" are made of the world's words ("อยู่", "บน"; "on", "top", "of"), so
    no word was flagged, but no caption says either: they say "อยู่เหนือ", "above"."""
    above, everything = ("above",), world.RELATIONS
    said = {"วงกลมสีแดงอยู่บนสี่เหลี่ยมสีน้ำเงิน": [("อยู่บน", above)],  # สี่เหลี่ยม: a piece of สี่เหลี่ยมจัตุรัส
            "ดาวสีเขียว ขนาดเล็ก อยู่ด้านบน หัวใจสีแดง": [("อยู่ด้านบน", above)],  # the place "at the top", not "above"
            "ดาวสีเขียวอยู่ใต้ของหัวใจสีแดงขนาดใหญ่": [("อยู่ใต้ของ", ("below",))],
            "ดาวสีเขียวอยู่หลังหัวใจสีแดง": [("อยู่หลัง", everything)],  # behind: หลัง only inside พื้นหลัง
            "A red circle on top of a blue square": [("on top of", above)],
            "a red circle on the left of a blue square, on a blue star": [("on the left of", ("left of",)),
                                                                          ("on", everything)]}
    assert {text: vocabulary.unknown_relations(vocabulary.caption_form(text)) for text in said} == said
    assert all(vocabulary.unknown_words(vocabulary.caption_form(text)) == [] for text in said)
    for fine in ("วงกลมสีแดงอยู่เหนือสี่เหลี่ยมสีน้ำเงิน", "a red circle above the blue square",
                 "two red circles under a gray star", "หัวใจสีชมพูขนาดเล็กมุมบนซ้าย บนพื้นหลังสีเทา",
                 "a red circle next to a blue square",  # 'next' is unknown_words' to name
                 "a red circle on top", "หมาสีแดงอยู่บนแมว"):  # one shape, no shape: nothing is placed by another
        assert vocabulary.unknown_relations(vocabulary.caption_form(fine)) == [], fine


def test_a_word_that_looks_like_a_typo_of_a_known_one_is_named():
    """The warning said only "never saw 'ชมภู'"; a Thai user misspelling ชมพู (pink) got an orange star."""
    assert vocabulary.did_you_mean(["ชมภู"]) == " (did you mean 'ชมพู'?)"
    assert vocabulary.did_you_mean(vocabulary.unknown_words("วงกลมสีแดงอยู๋เหนือ")) == " (did you mean 'อยู่'?)"
    assert vocabulary.did_you_mean(["circel", "and", "dog", "squre"]) == \
        " (did you mean 'circle' for 'circel', 'square' for 'squre'?)"  # not 'an' for "and"
    for other in (["dog", "skateboard"], ["rectangle"], ["ค่ะ"], ["เหลีย่ม"], ["42"]):  # nothing close: no hint
        assert vocabulary.did_you_mean(other) == "", other


def test_relations_and_positions_are_geometrically_true():
    for i in range(3000):
        scene = sample("train", i).scene
        if scene.kind == "pair":
            a, b = scene.objects
            dx, dy = b.cx - a.cx, b.cy - a.cy  # reference minus subject, y down
            expect = {"left of": dx > 0.3, "right of": dx < -0.3, "above": dy > 0.3, "below": dy < -0.3}
            assert expect[scene.relation] and min(abs(dx), abs(dy)) < 0.15, scene
        for o in scene.objects:
            r = SIZES[o.size]
            assert r <= o.cx <= 1 - r and r <= o.cy <= 1 - r
            assert world.cell_of(o.cx, o.cy) == o.position
        if scene.kind == "single":  # jittered a little around its cell's centre (a large shape near an
            o = scene.objects[0]    # edge is pulled inwards to stay on the canvas, still in its cell)
            col, row = world.POSITIONS[o.position]
            assert abs(o.cx - (col + 0.5) / 3) < 0.1 and abs(o.cy - (row + 0.5) / 3) < 0.1, scene
        for j, a in enumerate(scene.objects):
            for b in scene.objects[j + 1:]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) >= SIZES[a.size] + SIZES[b.size] - 1e-9, scene


def test_canonical_caption_is_deterministic_and_complete():
    scene = next(sample("train", i).scene for i in range(100) if sample("train", i).scene.kind == "single")
    o = scene.objects[0]
    text = canonical_caption(scene, lang="en")
    assert text == canonical_caption(scene, lang="en")
    assert f"{o.size} {o.colour} {o.shape}" in text and POSITION_EN[o.position][0] in text
    moved = dataclasses.replace(scene, objects=(dataclasses.replace(o, position="center"),))
    assert "in the center" in canonical_caption(moved, lang="en")
    assert POSITION_TH["center"] in canonical_caption(moved, lang="th")


def test_bad_split_or_index_is_a_clear_error():
    with pytest.raises(DataError, match="valid splits"):
        sample("training", 0)
    with pytest.raises(DataError, match="outside split 'val'"):
        sample("val", 10_000_000)


def test_bad_language_or_scene_odds_are_clear_errors():
    with pytest.raises(DataError, match="use en, th or mix"):  # said "use en or th", leaving out mix
        sample("train", 0, lang="fr")
    for odds in ((0, 0, 0), (1, 1), (-1, 1, 1), (float("nan"), 1, 1)):  # were numpy's "Probabilities contain NaN"…
        with pytest.raises(DataError, match="non-negative numbers, not all zero, for single, pair, count"):
            sample("train", 0, scenes=odds)
    assert sample("train", 0, scenes=(0, 1, 0)).scene.kind == "pair"


def test_prompts_are_read_in_the_form_of_the_captions():
    """Spaces between Thai words, capitals and invisible characters are not how the world writes
    its captions; typed so, "two green stars" drew three on the shipped model."""
    assert vocabulary.caption_form("ดาว สี เขียว สอง ดวง") == "ดาวสีเขียวสองดวง"
    assert vocabulary.caption_form(" ดาว\u200bสี\u200bเขียว ") == "ดาวสีเขียว"
    assert vocabulary.caption_form("A  Red Circle") == "a red circle"
    assert vocabulary.caption_form("ดาวสีเขียวบนพื้นหลัง สีขาว") == "ดาวสีเขียว บนพื้นหลังสีขาว"
    assert vocabulary.caption_form("วงกลมสีแดง red circle") == "วงกลมสีแดง red circle"
    assert vocabulary.caption_form("ดาว\u200cสี\u200dเขียว") == "ดาวสีเขียว"  # joiners: Thai spells with neither
    # counts in digits, Arabic or Thai, spelt out in the language of the word beside them
    assert vocabulary.caption_form("หัวใจสีเหลือง ๓ ดวง") == vocabulary.caption_form("หัวใจสีเหลือง3ดวง") \
        == "หัวใจสีเหลืองสามดวง"
    assert vocabulary.caption_form("ดาว 2 ดวง สีเขียว") == "ดาวสองดวงสีเขียว"
    assert vocabulary.caption_form("4 Red Circles") == "four red circles"
    assert vocabulary.caption_form("a 2.5 star, 23 stars, a 2nd star") == "a 2.5 star, 23 stars, a 2nd star"
    for split in ("train", "unseen"):
        for i in range(1500):
            for lang in ("en", "th"):
                text = world.sample(split, i, lang=lang).caption
                assert vocabulary.caption_form(text) == text


def test_the_thai_quickstarts_prompts_use_only_words_the_world_knows():
    """docs/quickstart.th.md shows Thai users what to type; a prompt there with a word of no caption
    would teach them a word the shipped model ignores."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "quickstart.th.md").read_text(encoding="utf-8")
    prompts = re.findall(r'unclip generate ((?:"[^"]+" )+)', text) + re.findall(r"^- `([^`]+)`$", text, re.M)
    prompts = [p for chunk in prompts for p in re.findall(r'"([^"]+)"', chunk) or [chunk]]
    assert len(prompts) >= 6 and all(vocabulary.THAI_RUN.search(p) for p in prompts)
    assert {p: vocabulary.unknown_words(vocabulary.caption_form(p)) for p in prompts} == {p: [] for p in prompts}
    assert {p: vocabulary.unknown_relations(vocabulary.caption_form(p)) for p in prompts} == {p: [] for p in prompts}
