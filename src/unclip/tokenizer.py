"""Byte-level BPE tokenizer trained on the caption corpus, saved with every model.

Byte-level means there is no unknown word: any text, Thai included, encodes and decodes back to
itself exactly (after `clean_text`: Unicode NFC, invisible characters dropped, whitespace runs as
one space, Thai typing variants in their standard spelling). Every encoded caption is
`[<|startoftext|>, tokens..., <|endoftext|>, <|pad|>...]`; a caption longer than the context is
cut before the end token (CLIP pools at the end token, so it is always present), and the cut is
reported: `TokenBatch.truncated` says which captions were cut and a warning logs what was lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unclip.config import MIN_CONTEXT
from unclip.errors import ModelFormatError, UnclipError
from unclip.io import atomic_write, write_json_atomic
from unclip.words import CaptionWords

if TYPE_CHECKING:
    import tokenizers
    import torch

log = logging.getLogger(__name__)

CUT_LOGS = 5  # captions cut to the context that one tokenizer logs one by one
# The captions each tokenizer file has cut, shared by all its loads in a process (`unclip train all`
# loads its CLIP's for every stage, and logged the same captions five times): the first CUT_LOGS and
# one more, after which a line says more are cut and none is logged or kept.
_CUT: dict[tuple[str, int], set[str]] = {}

PAD, BOS, EOS = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
# Ids 0, 1, 2 in this order. The end token must not get id 2: transformers' CLIP text tower
# treats eos_token_id == 2 as a legacy config and pools at argmax(input_ids) instead of at the
# end token, which silently pools the wrong position for any BPE whose merges have higher ids.
SPECIAL_ORDER = (BOS, EOS, PAD)
# invisible characters that web pages and word processors leave in text: zero-width space, word
# joiner, byte-order mark, soft hyphen (not ZWJ / ZWNJ, which some scripts spell with)
INVISIBLE = re.compile("[\u200b\u2060\ufeff\u00ad]")
# Thai as it is often typed or copied: two sara e for sara ae, sara am as nikhahit + sara aa (PDFs),
# also with the tone mark between them ("นํ้า"), a tone mark typed after sara am instead of before it,
# and a tone mark or thanthakhat typed before the vowel above its consonant ("ส่ี" for "สี่"). Each
# looks the same on screen, and NFC leaves it so (those vowels have combining class 0; it does put a
# vowel below before a tone mark); typed so, the shipped model lost "น้ำเงิน" (blue) and "สี่เหลี่ยม".
THAI_TONES = "\u0e48\u0e49\u0e4a\u0e4b"
THAI_VARIANTS = (("\u0e40\u0e40", "\u0e41"), ("\u0e4d\u0e32", "\u0e33"),
                 *(("\u0e4d" + mark + "\u0e32", mark + "\u0e33") for mark in THAI_TONES),
                 *(("\u0e33" + mark, mark + "\u0e33") for mark in THAI_TONES),
                 *((mark + vowel, vowel + mark) for mark in THAI_TONES + "\u0e4c"
                   for vowel in "\u0e31\u0e34\u0e35\u0e36\u0e37"))
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class TokenBatch:
    """Encoded captions.

    input_ids:      LongTensor [B, L]  token ids, padded with `pad_id`
    attention_mask: LongTensor [B, L]  1 for real tokens (start and end included), 0 for padding
    truncated:      one flag per caption, True where the caption was cut to fit L
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: tuple[bool, ...]

    def trimmed(self) -> TokenBatch:
        """The batch cut to its longest caption (L = the most real tokens in any row)."""
        length = max(int(self.attention_mask.sum(dim=1).max()), 1)
        return TokenBatch(input_ids=self.input_ids[:, :length], attention_mask=self.attention_mask[:, :length],
                          truncated=self.truncated)


def clean_text(text: str) -> str:
    """A caption as every tokenizer reads it, in training and sampling alike: Unicode NFC,
    `INVISIBLE` characters dropped, each run of whitespace (tabs, newlines, no-break spaces) one
    space, none at the ends, and Thai typing variants in their standard spelling. Text that looks
    the same then reads the same: "ดาว\u200bสี" or "a  red circle " would otherwise be other tokens
    than the model learnt (a double space cost the shipped model its colours)."""
    text = " ".join(INVISIBLE.sub("", unicodedata.normalize("NFC", text)).split())
    for variant, standard in THAI_VARIANTS:
        text = text.replace(variant, standard)
    return text


def has_thai(text: str) -> bool:
    """Whether `text` holds Thai letters: what unclip says about it is then said in Thai, and a grid
    draws it in a Thai font."""
    return any("\u0e00" <= ch <= "\u0e7f" for ch in text)


def _backend_normalizer():
    """`clean_text` as a `tokenizers` normalizer: set on every tokenizer trained or loaded, and
    written into the tokenizer.json of `export-diffusers`, whose AutoTokenizer then reads text as
    unclip does. A model directory's own tokenizer.json keeps the bytes it was first saved with
    (`Tokenizer.save`); the shipped model's predates this normalizer (NFC alone), so
    AutoTokenizer pointed at that folder, not at an export, reads doubled spaces and Thai spelling
    variants as typed."""
    from tokenizers import Regex, normalizers

    steps = [normalizers.NFC(), normalizers.Replace(Regex(INVISIBLE.pattern), ""),
             normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    steps += [normalizers.Replace(variant, standard) for variant, standard in THAI_VARIANTS]
    return normalizers.Sequence(steps)


class Tokenizer:
    """A trained byte-level BPE with a fixed context length."""

    def __init__(self, *, backend: tokenizers.Tokenizer, context_length: int):
        if context_length < MIN_CONTEXT:
            raise UnclipError(f"context_length={context_length} leaves no room for a caption; use at least {MIN_CONTEXT}")
        self.backend = backend
        self.context_length = context_length
        self.cut_captions: set[str] = set()  # captions cut to its context and logged (`_CUT`)
        self.loaded_from: bytes | None = None  # the tokenizer.json it was read from, written back by `save`
        self.words: CaptionWords | None = None  # the words of the captions it learnt from, other data than shapes world's
        self.pad_id, self.bos_id, self.eos_id = (backend.token_to_id(t) for t in (PAD, BOS, EOS))
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise ModelFormatError(f"tokenizer lacks one of the special tokens {PAD}, {BOS}, {EOS}")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int, context_length: int,
              max_token_bytes: int = 15) -> Tokenizer:
        """Train a byte-level BPE of at most `vocab_size` tokens on `texts`.

        Merged tokens are at most `max_token_bytes` bytes (15 = five Thai characters). Thai has
        no spaces between words, so without the cap BPE merges whole phrases into single
        tokens ("ดาวสีแดงอยู่เหนือ..."), and a caption that recombines known words (a held-out
        colour–shape pair) would tokenize unlike anything seen in training.
        """
        from tokenizers import Tokenizer as Backend
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

        backend = Backend(models.BPE())
        backend.normalizer = _backend_normalizer()
        # Words with their leading space, then bytes. Not GPT-2's regex: it splits Thai at every
        # vowel and tone mark (they are not \p{L}), so BPE could never merge a Thai word.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" ?[^\s]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_ORDER),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            max_token_length=max_token_bytes,
        )
        backend.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
        return cls(backend=backend, context_length=context_length)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (as `clean_text` reads it) without start, end or padding."""
        return self.backend.encode(clean_text(text), add_special_tokens=False).ids

    def encode(self, texts: str | Sequence[str], *, context_length: int | None = None) -> TokenBatch:
        """Encode captions into a padded batch of `context_length` (default: the tokenizer's) tokens."""
        import torch

        texts = [clean_text(t) for t in ([texts] if isinstance(texts, str) else texts)]
        length = context_length or self.context_length
        room = length - 2
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        truncated = []
        for row, encoding in enumerate(self.backend.encode_batch(texts, add_special_tokens=False)):
            tokens = encoding.ids
            cut = len(tokens) > room
            if cut:
                keep = self._whole_characters(tokens, room)
                if len(self.cut_captions) <= CUT_LOGS and texts[row] not in self.cut_captions:  # once per caption
                    self._log_cut(texts[row], self.backend.decode(tokens[keep:]), length)
                tokens = tokens[:keep]
            seq = [self.bos_id, *tokens, self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            truncated.append(cut)
        return TokenBatch(input_ids=ids, attention_mask=mask, truncated=tuple(truncated))

    def _whole_characters(self, tokens: list[int], room: int) -> int:
        """How many of `tokens` (at most `room`) to keep so that no character is cut in two: a
        byte-level token can end inside a Thai character's three UTF-8 bytes, or between a
        consonant and its vowel and tone marks."""
        def splits(keep: int) -> bool:
            kept, dropped = self.backend.decode(tokens[:keep]), self.backend.decode(tokens[keep:])
            return kept.endswith("\ufffd") or dropped.startswith("\ufffd") or \
                bool(dropped) and unicodedata.category(dropped[0]) in ("Mn", "Mc")  # a vowel or tone mark

        keep = room
        while keep > max(1, room - 12) and splits(keep):  # a character with its marks: 12 bytes at most
            keep -= 1
        return keep

    def _log_cut(self, caption: str, lost: str, length: int) -> None:
        """Log the first CUT_LOGS captions cut to the context, then once that more are (training on
        long captions would log every one, batch after batch)."""
        self.cut_captions.add(caption)
        if len(self.cut_captions) <= CUT_LOGS:
            shown = lost if len(lost) <= 60 else f"{lost[:60]}… ({len(lost)} characters)"
            if has_thai(caption):  # said in Thai for a Thai caption
                log.warning("คำบรรยายถูกตัดเหลือ %d โทเคน ส่วนท้ายที่ตัดทิ้ง: %r", length, shown)
            else:
                log.warning("caption cut to %d tokens; dropped the end: %r", length, shown)
        elif len(self.cut_captions) == CUT_LOGS + 1:
            log.warning("more captions are cut to %d tokens (%d so far); no more are logged. A longer "
                        "tokenizer.context_length keeps more of them (a new CLIP run)", length, CUT_LOGS + 1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping start, end and padding."""
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self.backend.decode([int(i) for i in ids if int(i) not in special])

    def normalize(self, text: str) -> str:
        """The form a caption round-trips to (`clean_text`)."""
        return clean_text(text)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a `tokenizer_config.json` that `transformers.AutoTokenizer` reads
        (and `words.json` when it keeps its captions' words)."""
        directory = Path(directory)
        if self.loaded_from is not None:
            # A tokenizer read from a file is saved as that file, byte for byte: stages compare their CLIP
            # by the files' sha256, and one saved before the normalizer went into tokenizer.json (the
            # shipped model's) would otherwise differ from every copy of itself saved since, so `unclip
            # assemble` refused the shipped priors beside a decoder continued from the same CLIP. The
            # normalizer is set on every load, so the text is read the same either way.
            with atomic_write(directory / TOKENIZER_FILE, "wb") as handle:
                handle.write(self.loaded_from)
        else:
            write_json_atomic(directory / TOKENIZER_FILE, json.loads(self.backend.to_str()))
        write_json_atomic(directory / CONFIG_FILE, {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.context_length,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
        })
        if self.words is not None:
            self.words.save(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        paths = [directory / TOKENIZER_FILE, directory / CONFIG_FILE]
        for path in paths:
            if not path.is_file():
                raise ModelFormatError(f"{path} is missing: a tokenizer directory holds {TOKENIZER_FILE} and "
                                       f"{CONFIG_FILE}; put back a copy from the model it came with, or train "
                                       "its CLIP again (a model's other stages read text through this tokenizer)")
        try:
            backend = Backend.from_file(str(paths[0]))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFormatError(f"{paths[0]} is truncated or corrupt: {err}") from None
        backend.normalizer = _backend_normalizer()  # tokenizers saved before it had NFC alone
        try:
            config = json.loads(paths[1].read_text(encoding="utf-8"))
            context_length = int(config["model_max_length"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{paths[1]} is corrupt or lacks model_max_length: {err}") from None
        tokenizer = cls(backend=backend, context_length=context_length)
        tokenizer.loaded_from = paths[0].read_bytes()
        tokenizer.cut_captions = _CUT.setdefault((hashlib.sha256(tokenizer.loaded_from).hexdigest(), context_length),
                                                 set())
        tokenizer.words = CaptionWords.load(directory)
        return tokenizer


def shapes_corpus(n: int, *, seed: int = 0) -> list[str]:
    """`n` captions from the shapes-world train split, half English and half Thai."""
    from unclip.data.world import sample

    return [sample("train", i, seed=seed, lang=("en", "th")[i % 2]).caption for i in range(n)]


def train_shapes_tokenizer(*, vocab_size: int, context_length: int, corpus_size: int, seed: int = 0,
                           max_token_bytes: int = 15) -> Tokenizer:
    """The tokenizer of the bundled default: BPE trained on shapes-world captions in both languages."""
    return Tokenizer.train(shapes_corpus(corpus_size, seed=seed), vocab_size=vocab_size, context_length=context_length,
                           max_token_bytes=max_token_bytes)
