"""The words of a model's training captions, for warnings about prompt words it never read.

A shapes-world model knows its words from the world's grammar (`vocabulary.vocabulary`). A model trained
on other data keeps the words of the captions its tokenizer learnt from (those of the first
`tokenizer.corpus_size` pairs training can use, `unclip.clip.stage.own_captions`) in
`tokenizer/words.json`, written when its CLIP run trains the tokenizer. Words are read as the
tokenizer reads text (`clean_text`), split at spaces and punctuation and compared case-folded;
numbers alone are not words, and a hyphenated word is known when it or each of its parts is
("black-and-white" in a caption makes "white" known). Text in scripts written without spaces
between words (Thai, Lao, Khmer, Myanmar, Chinese, Japanese) cannot be split without a dictionary
of that data, so such a model does not check it.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

WORDS_FILE = "words.json"
# scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, kana, CJK ideographs
NO_SPACES = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
JOINERS = "'’-"  # kept inside a word ("don't", "t-shirt"), dropped at its ends


def split_words(text: str) -> list[str]:
    """The words of `text` as the tokenizer reads it (`clean_text`), case-folded: runs of letters, marks
    and digits (with apostrophes and hyphens inside them) holding at least one letter, except runs in
    scripts written without spaces."""
    from unclip.tokenizer import clean_text

    words, current = [], []
    for ch in clean_text(text).casefold() + " ":
        if unicodedata.category(ch)[0] in "LMN" or (ch in JOINERS and current):
            current.append(ch)
            continue
        word = "".join(current).strip(JOINERS)
        current = []
        if any(c.isalpha() for c in word) and not NO_SPACES.search(word):
            words.append(word)
    return words


@dataclass(frozen=True)
class CaptionWords:
    """The words of `captions` training captions: what `unknown` checks a prompt against."""

    words: frozenset[str]
    captions: int

    @classmethod
    def of(cls, captions: Sequence[str]) -> CaptionWords:
        """The words of `captions`, and the parts of their hyphenated words."""
        words = {w for caption in captions for w in split_words(caption)}
        return cls(words=frozenset(words | {part for w in words if "-" in w for part in _parts(w)}),
                   captions=len(captions))

    def unknown(self, text: str) -> list[str]:
        """The words of `text` that none of the captions uses (a hyphenated one: neither whole nor
        each of its parts), in order, each once."""
        def known(word: str) -> bool:
            return word in self.words or "-" in word and all(part in self.words for part in _parts(word))

        return list(dict.fromkeys(w for w in split_words(text) if not known(w)))

    def save(self, directory: str | Path) -> Path:
        from unclip.io import write_json_atomic

        return write_json_atomic(Path(directory) / WORDS_FILE, {"captions": self.captions, "words": sorted(self.words)})

    @classmethod
    def load(cls, directory: str | Path) -> CaptionWords | None:
        """The words saved in `directory`, or None when it has none (a shapes-world model's tokenizer,
        or one saved before unclip kept them)."""
        from unclip.errors import ModelFormatError

        path = Path(directory) / WORDS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(words=frozenset(str(w) for w in data["words"]), captions=int(data["captions"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{path} is truncated or corrupt ({err}); delete it to load the model "
                                   "without warnings about unknown words") from None


def _parts(word: str) -> list[str]:
    """The parts of a hyphenated word that hold a letter ("t-shirt": t, shirt; "covid-19": covid)."""
    return [part for part in word.split("-") if any(c.isalpha() for c in part)]


def did_you_mean(unknown: Sequence[str], known: Iterable[str], *, thai: bool = False) -> str:
    """A hint naming the known word each unknown one looks like a typo of (" (did you mean 'ชมพู'?)"
    for "ชมภู", 'circle' for "circel"), or "" when none does: a close word of about the same length
    only, so "rectangle" is not a misspelt "triangle". `thai` words the hint in Thai."""
    by_length: dict[int, list[str]] = {}
    for word in known:
        if len(word) > 2:  # not 'an' for "and": words of one or two letters are too close to anything
            by_length.setdefault(len(word), []).append(word)
    close = {}
    for word in unknown:
        near = [k for n in (len(word) - 1, len(word), len(word) + 1) for k in by_length.get(n, ()) if k != word]
        if match := difflib.get_close_matches(word, near, n=1, cutoff=0.75):
            close[word] = match[0]
    if not close:
        return ""
    if len(unknown) == 1:
        return f" (หมายถึง {close[unknown[0]]!r} หรือเปล่า?)" if thai else f" (did you mean {close[unknown[0]]!r}?)"
    pairs = ", ".join(f"{k!r} แทน {w!r}" if thai else f"{k!r} for {w!r}" for w, k in close.items())
    return f" (หมายถึง {pairs} หรือเปล่า?)" if thai else f" (did you mean {pairs}?)"
