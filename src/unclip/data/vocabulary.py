"""Reading text against shapes world's words (`world.py`): Thai split into words, prompts in the
captions' form, the world's vocabulary, the words and relations of a text that no caption uses, and
did-you-mean hints for its typos.
"""

from __future__ import annotations

import functools
import re

from unclip.data.world import (BACKGROUNDS, COLORS, COUNT_EN, COUNT_TH, POSITION_EN, POSITION_TH, RELATION_CELL,
                               RELATION_EN, RELATION_TH, RELATIONS, SHAPES, SIZE_TH, SIZES, THAI_WORDS, plural,
                               sample)


def thai_words(text: str) -> list[str]:
    """Split a Thai caption into words by longest match against `THAI_WORDS`; spaces are dropped.

    Characters that start no known word stay together as one word up to the next known one
    ("หมาสีแดง", a red dog: หมา, สี, แดง), so a wrapped line never breaks inside them.
    """
    def known_at(chunk: str, i: int) -> str | None:
        return max((w for w in THAI_WORDS if chunk.startswith(w, i)), key=len, default=None)

    words = []
    for chunk in text.split():
        i = 0
        while i < len(chunk):
            word = known_at(chunk, i)
            if word is None:
                end = i + 1
                while end < len(chunk) and known_at(chunk, end) is None:
                    end += 1
                word = chunk[i:end]
            words.append(word)
            i += len(word)
    return words


THAI_RUN = re.compile(r"([\u0e00-\u0e7f]+)")  # a run of Thai script (captured, so `split` keeps it)


THAI_BACKGROUND = "บนพื้นหลัง"  # "on a … background": the one Thai word a world caption has a space before
_THAI_SPACE = re.compile(f"(?<=[\u0e00-\u0e7f]) (?=[\u0e00-\u0e7f])(?!{THAI_BACKGROUND})")
_THAI_BACKGROUND = re.compile(f"(?<=[\u0e00-\u0e7f])(?={THAI_BACKGROUND})")


# A count written in digits, Arabic or Thai ("3", "๓"), standing alone: the captions spell counts out.
_DIGIT_COUNT = re.compile(r"(?<![\da-z.,])[2-4\u0e52-\u0e54](?![\da-z]|[.,]\d)")
_JOINERS = re.compile("[\u200c\u200d]")  # ZWNJ, ZWJ: `clean_text` keeps them; no world caption has one


def _spelt_count(match: re.Match) -> str:
    """A count's word in the language of the word after it ("3 ดวง", "3 stars"), else of the one before."""
    after, before = match.string[match.end():].lstrip()[:1], match.string[:match.start()].rstrip()[-1:]
    near = after if after.isalpha() else before
    return (COUNT_TH if THAI_RUN.match(near) else COUNT_EN)[int(match[0])]


def caption_form(text: str) -> str:
    """`text` written the way the world's captions are: as `clean_text` reads it, lower case, without
    joiners, counts spelt out, and Thai words without spaces between them but one before "บนพื้นหลัง",
    as every Thai caption. Typed as "A Red Circle", "ดาว สี เขียว สอง ดวง" or "หัวใจสีเหลือง ๓ ดวง" a
    prompt would reach the model as pieces it never saw together (the shipped model drew three stars
    for the spaced "two green stars"; "หัวใจสีเหลือง๓ดวง" and "3 yellow hearts" were 0.15 and 0.32
    in cosine from the text embeddings of the same prompts spelt out)."""
    from unclip.tokenizer import clean_text

    text = _DIGIT_COUNT.sub(_spelt_count, _JOINERS.sub("", clean_text(text).lower()))
    return _THAI_BACKGROUND.sub(" ", _THAI_SPACE.sub("", text))


def caption_words(text: str) -> list[str]:
    """The words of a caption in either language: lower-case English words without punctuation,
    Thai runs split by `thai_words`."""
    words: list[str] = []
    for chunk in text.lower().split():
        for part in THAI_RUN.split(chunk):
            if THAI_RUN.fullmatch(part):
                words += thai_words(part)
            else:
                words += re.findall(r"[^\W_]+(?:['-][^\W_]+)*", part)
    return words


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    """Every word the world's captions use, in both languages (from 2,000 training captions each,
    which meet every template, colour, shape, size, count and place; tests/test_world.py checks
    this against 21,000 captions of three splits)."""
    return frozenset(w for lang in ("en", "th") for i in range(2000)
                     for w in caption_words(sample("train", i, lang=lang).caption))


def unknown_words(text: str) -> list[str]:
    """The words of `text` that no shapes-world caption uses, in order, each once.

    Thai letters that are part of a known word count as known ("สี่เหลี่ยม", a rectangle, is the
    start of the world's "สี่เหลี่ยมจัตุรัส", a square): the tokenizer shares their pieces.
    """
    return list(dict.fromkeys(w for w in caption_words(text) if not _known(w)))


def _known(word: str) -> bool:
    return word in vocabulary() or bool(THAI_RUN.fullmatch(word) and any(word in k for k in vocabulary()))


@functools.lru_cache(maxsize=1)
def _relation_tables() -> tuple[frozenset, frozenset, frozenset, dict[str, frozenset]]:
    """RELATION_EN's and RELATION_TH's phrases as tuples of words; the words that name, count or
    colour a shape, with the articles before one; the shape words; and each relation's own words,
    of its phrases and its RELATION_CELL's and of no other relation's ("above", "top", "บน" for above)."""
    def words(*phrases: str) -> list[str]:
        return caption_words(" ".join(phrases))

    phrases = frozenset(tuple(words(p)) for table in (RELATION_EN, RELATION_TH) for said in table.values()
                        for p in said)
    naming = frozenset(words("a an the สี ขนาด", *COLORS, *SIZES, *COUNT_EN.values(), *BACKGROUNDS,
                             *(c.th for c in COLORS.values()), *SIZE_TH.values(), *COUNT_TH.values(),
                             *(th for _, th in BACKGROUNDS.values()), *(cls for _, cls in SHAPES.values())))
    shapes = frozenset([*SHAPES, *map(plural, SHAPES), *(th for th, _ in SHAPES.values())])
    said = {r: set(words(*RELATION_EN[r], *RELATION_TH[r], *POSITION_EN[RELATION_CELL[r]],
                         POSITION_TH[RELATION_CELL[r]])) for r in RELATIONS}
    own = {r: frozenset(said[r].difference(*(said[o] for o in RELATIONS if o != r))) for r in RELATIONS}
    return phrases, naming, shapes, own


def unknown_relations(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Phrases of `text` that place one shape by another as no caption of the world does, each once,
    in order, with the relations (of RELATIONS) each seems to mean, or all four: the words between
    two shapes, less those naming the shapes, when they are none of RELATION_EN's or RELATION_TH's
    phrases. Each word of "อยู่บน" (is on) or "on top of" is a word of the world, but the phrases
    are not: the captions say "อยู่เหนือ", "above". A phrase with a word of no caption is left to
    `unknown_words`; "สี่เหลี่ยม", a piece of a shape's name (`unknown_words`), counts as a shape.
    """
    phrases, naming, shapes, own = _relation_tables()
    words, known = caption_words(text), vocabulary()

    def shape(word: str) -> bool:
        return word in shapes or (word not in known and bool(THAI_RUN.fullmatch(word))
                                  and any(word in s for s in shapes))

    found: dict[str, tuple[str, ...]] = {}
    at = [i for i, w in enumerate(words) if shape(w)]
    for start, end in zip(at, at[1:]):
        run = words[start + 1:end]
        while run and run[0] in naming:
            run = run[1:]
        while run and run[-1] in naming:
            run = run[:-1]
        if run and tuple(run) not in phrases and all(map(_known, run)):
            phrase = ("" if all(THAI_RUN.fullmatch(w) for w in run) else " ").join(run)
            found.setdefault(phrase, tuple(r for r in RELATIONS if own[r] & set(run)) or RELATIONS)
    return list(found.items())


def did_you_mean(unknown: list[str], *, thai: bool = False) -> str:
    """A hint naming the world's word each unknown one looks like a typo of (" (did you mean 'ชมพู'?)"
    for "ชมภู", 'circle' for "circel"), or "" (`words.did_you_mean`); nor is the fragment "เหลีย่ม" of
    "สี่เหลีย่ม" a misspelt "หกเหลี่ยม"."""
    from unclip.words import did_you_mean as hint

    return hint(unknown, vocabulary(), thai=thai)
