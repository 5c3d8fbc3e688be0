import logging

import pytest

from unclip.errors import ModelFormatError
from unclip.tokenizer import Tokenizer, shapes_corpus, train_shapes_tokenizer

THAI = [
    "วงกลมสีแดง",
    "ดาวสีน้ำเงินอยู่เหนือสี่เหลี่ยมจัตุรัสสีเขียว",
    "หัวใจสีเหลืองสามดวง",
    "ข้าวหลามตัดสีม่วงขนาดเล็กที่มุมบนซ้าย",
]


@pytest.fixture(scope="module")
def tok():
    return train_shapes_tokenizer(vocab_size=1024, context_length=32, corpus_size=6000)


def test_corpus_has_both_languages():
    corpus = shapes_corpus(200)
    thai = [c for c in corpus if any("\u0e00" <= ch <= "\u0e7f" for ch in c)]
    assert 80 <= len(thai) <= 120


def test_thai_and_english_round_trip_exactly(tok):
    for text in THAI + ["a small blue star above a green square", "three yellow hearts"]:
        batch = tok.encode(text)
        assert batch.truncated == (False,)
        assert tok.decode(batch.input_ids[0]) == text


def test_unknown_words_and_scripts_round_trip(tok):
    text = "a zebra 🦓 ñandú кошка 猫 ยีราฟ"
    assert tok.decode(tok.encode(text, context_length=128).input_ids[0]) == text


def test_bpe_learned_thai_merges(tok):
    # A trained BPE uses far fewer tokens than UTF-8 bytes (3 per Thai character).
    ids = tok.tokenize(THAI[1])
    assert len(ids) < len(THAI[1].encode("utf-8")) / 4


def test_layout_start_end_padding(tok):
    batch = tok.encode(["a red circle", "วงกลมสีแดง"])
    assert batch.input_ids.shape == (2, 32)
    for row, mask in zip(batch.input_ids, batch.attention_mask):
        n = int(mask.sum())
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all() and (mask[:n] == 1).all()


def test_truncation_is_reported_and_keeps_end_token(tok, caplog):
    long = " ".join(["a small blue star above a green square"] * 6)
    with caplog.at_level(logging.WARNING, logger="unclip.tokenizer"):
        batch = tok.encode([long, "a red circle"], context_length=16)
    assert batch.truncated == (True, False)
    assert batch.input_ids[0, -1] == tok.eos_id and batch.attention_mask[0].all()
    assert "cut to 16 tokens" in caplog.text and "green square" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclip.tokenizer"):  # a batch repeats a prompt per candidate
        batch = tok.encode([long * 20] * 3 + ["a red circle"], context_length=16)
    assert batch.truncated == (True, True, True, False)
    assert len(caplog.records) == 1 and len(caplog.text) < 300, caplog.text


def test_training_on_long_captions_logs_a_few_then_says_more_are_cut(tok, caplog):
    """Every batch of a data set of long captions logged each of them again (a warning per caption per
    step); now each once, the first CUT_LOGS, then one line that more are cut."""
    from unclip.tokenizer import CUT_LOGS, Tokenizer

    fresh = Tokenizer(backend=tok.backend, context_length=8)
    long = [f"a small blue star above a green square number {i}" for i in range(CUT_LOGS + 4)]
    with caplog.at_level(logging.WARNING, logger="unclip.tokenizer"):
        for _ in range(3):  # three epochs
            assert all(fresh.encode(long).truncated)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == CUT_LOGS + 1 and len(fresh.cut_captions) == CUT_LOGS + 1  # no more are kept
    assert messages[-1].startswith(f"more captions are cut to 8 tokens ({CUT_LOGS + 1} so far)")


def test_a_cut_thai_caption_is_told_in_thai(tok, caplog):
    fresh = Tokenizer(backend=tok.backend, context_length=8)
    with caplog.at_level(logging.WARNING, logger="unclip.tokenizer"):
        assert fresh.encode(["ดาวสีเขียวขนาดใหญ่อยู่เหนือวงกลมสีแดง"]).truncated == (True,)
    assert caplog.records[0].getMessage().startswith("คำบรรยายถูกตัดเหลือ 8 โทเคน ส่วนท้ายที่ตัดทิ้ง: '")


def test_loads_of_one_tokenizer_log_a_cut_caption_once(tok, tmp_path, caplog):
    """`unclip train all` loads its CLIP's tokenizer for every stage, and each load logged the same cut
    captions again (five times over)."""
    Tokenizer(backend=tok.backend, context_length=8).save(tmp_path / "tokenizer")
    long = "a small blue star above a green square far away"
    with caplog.at_level(logging.WARNING, logger="unclip.tokenizer"):
        for _ in range(3):  # three stages
            assert Tokenizer.load(tmp_path / "tokenizer").encode([long]).truncated == (True,)
    assert len(caplog.records) == 1, caplog.text


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    again = Tokenizer.load(tmp_path / "tokenizer")
    batch = THAI + ["a red circle"]
    assert (again.encode(batch).input_ids == tok.encode(batch).input_ids).all()
    assert again.context_length == tok.context_length


def test_a_loaded_tokenizer_is_saved_as_the_file_it_came_from(tok, tmp_path):
    """Stages compare their CLIP by file sha256: a tokenizer.json written before the normalizer went
    into it (the shipped model's: NFC alone) re-saved with the new one made every continued stage a
    stranger to the shipped priors (`unclip assemble` refused them)."""
    import json

    tok.save(tmp_path / "old")
    data = json.loads((tmp_path / "old" / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFC"}  # as tokenizers were saved before
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(data))
    loaded = Tokenizer.load(tmp_path / "old")
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "old" / "tokenizer.json").read_bytes()
    text = "ดาว\u200bสี  เขียว"  # and it still reads text through clean_text's normalizer
    assert Tokenizer.load(tmp_path / "again").backend.encode(text).ids == tok.backend.encode(text).ids


def test_corrupt_tokenizer_file_names_the_file(tok, tmp_path):
    d = tok.save(tmp_path / "tokenizer")
    path = d / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFormatError, match="tokenizer.json is truncated or corrupt"):
        Tokenizer.load(d)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer_config.json is missing"):
        Tokenizer.load(d)


def test_end_token_id_is_not_the_legacy_clip_value(tok):
    # transformers' CLIPTextTransformer pools at argmax(input_ids) when eos_token_id == 2.
    assert tok.eos_id != 2
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


def test_every_shapes_caption_fits_the_context_in_both_languages(tok):
    from unclip.data.world import sample

    for lang in ("en", "th"):
        captions = [sample(split, i, lang=lang).caption for split in ("train", "unseen") for i in range(400)]
        assert not any(tok.encode(captions).truncated), lang


def test_thai_words_are_not_merged_into_phrases(tok):
    # Byte cap per token: a held-out pair (green star) is made of pieces seen in training.
    pieces = [tok.backend.decode([i]) for i in tok.tokenize("ดาวสีเขียว")]
    assert len(pieces) >= 3 and all(len(p.encode("utf-8")) <= 15 for p in pieces)


def test_text_that_looks_the_same_reads_the_same(tok):
    """Invisible characters, whitespace runs and Thai typing variants are read as the captions were
    written: typed otherwise, the shipped model lost its colours (double spaces) or its shapes (ZWSP)."""
    from unclip.tokenizer import clean_text

    same = {"a red circle": ["  a  red\tcircle \n", "a\u00a0red circle", "a red\u200b circle", "\ufeffa red circle"],
            "วงกลมสีแดง": ["วงกลม\u200bสี\u200bแดง", "วงกลมสีเเดง"],  # ZWSP; two sara e typed for sara ae
            "สีน้ำเงิน": ["สีน้\u0e4d\u0e32เงิน", "สีน\u0e33\u0e49เงิน",  # sara am decomposed; tone mark after it
                         "สีน\u0e4d\u0e49\u0e32เงิน"],  # the tone mark between nikhahit and sara aa ("นํ้า")
            "สี่เหลี่ยมจัตุรัส": ["ส\u0e48\u0e35เหล\u0e48\u0e35ยมจัตุรัส"]}  # tone mark before the vowel above
    for standard, variants in same.items():
        for text in variants:
            assert clean_text(text) == standard
            assert tok.tokenize(text) == tok.tokenize(standard)
            assert tok.encode(text).input_ids.tolist() == tok.encode(standard).input_ids.tolist()
    assert clean_text("\u200b \u2060") == "" and clean_text("ก\u200dข") == "ก\u200dข"  # ZWJ spells some scripts
    captions = shapes_corpus(2000)
    assert [clean_text(c) for c in captions] == captions  # what the world writes is already in that form


def test_a_cut_caption_keeps_whole_characters(tok, caplog):
    import unicodedata

    text = "ยีราฟ" * 20  # few merges: bytes of three-byte Thai characters, vowels above consonants
    with caplog.at_level(logging.WARNING, logger="unclip.tokenizer"):
        for length in range(8, 16):
            ids = tok.encode(text, context_length=length).input_ids[0]
            kept = tok.decode(ids)
            assert kept and "\ufffd" not in kept and text.startswith(kept)
            assert unicodedata.category(text[len(kept)]) not in ("Mn", "Mc")  # no mark cut from its consonant
    assert "\ufffd" not in caplog.text


def test_a_saved_tokenizer_reads_text_in_transformers_as_unclip_does(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    exported = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ["a  red circle ", "a red\u00adcircle\n", "ดาว\u200bสี เเดง", "สีน\u0e33\u0e49เงิน", *THAI]:
        assert exported(text, add_special_tokens=False)["input_ids"] == tok.tokenize(text)


def test_the_words_of_own_captions_travel_with_the_tokenizer(tok, tmp_path):
    """A model trained on other data than shapes world keeps its captions' words, so prompts with words it
    never read are warned about (`unclip.words`); a damaged words.json is named, not a traceback."""
    from unclip.words import CaptionWords, did_you_mean, split_words

    assert split_words("A T-shirt, don't: 3 cats & 2.5 dogs—Straße “quoted” 3d") == [
        "a", "t-shirt", "don't", "cats", "dogs", "strasse", "quoted", "3d"]  # numbers alone are not words
    assert split_words("नमस्ते दुनिया สวัสดีครับ 你好 'hi'") == ["नमस्ते", "दुनिया", "hi"]  # marks kept; no-space scripts left
    words = CaptionWords.of(["A dog on a skateboard.", "a red bus"])
    assert words.unknown("a Cat on a red bus, a cat!") == ["cat"] and words.captions == 2
    assert did_you_mean(["buss"], words.words) == " (did you mean 'bus'?)" and did_you_mean(["bus"], {"bus"}) == ""
    # read as the tokenizer reads them (a soft hyphen dropped), hyphenated words by their parts too, case-folded
    others = CaptionWords.of(["a skateboard-like toy on a black-and-white floor", "a red\u00adbus", "STRASSE"])
    assert others.unknown("a skateboard on a white floor, a redbus, Straße") == []
    assert others.unknown("a black-white dog") == ["dog"]
    assert Tokenizer.load(tok.save(tmp_path / "plain")).words is None  # shapes world's: its grammar knows its words
    own = Tokenizer(backend=tok.backend, context_length=tok.context_length)
    own.words = words
    assert Tokenizer.load(own.save(tmp_path / "own")).words == words
    again = Tokenizer.load(tmp_path / "own")
    again.save(tmp_path / "copy")  # a stage saving its CLIP's tokenizer writes the same bytes (files compare by sha256)
    assert (tmp_path / "copy" / "words.json").read_bytes() == (tmp_path / "own" / "words.json").read_bytes()
    (tmp_path / "own" / "words.json").write_text('{"captions": 2, "words": ["a", "d')
    with pytest.raises(ModelFormatError, match="words.json is truncated or corrupt.*delete it"):
        Tokenizer.load(tmp_path / "own")
