"""Zero-shot accuracy of a model's CLIP when the captions are typed the ways people type them.

    .venv/bin/python bench/prompt_forms.py [MODEL] [-n 150] [--threads 2]

For the first n one-object `test` scenes, CLIP picks the scene's caption among the same caption
with its colour (or shape) swept over every value, as `unclip clip eval` does, but with every
caption written in another form: with spaces between Thai words, with zero-width spaces between
words, with double spaces, in title case. Each form is read twice: as unclip reads a prompt
(`pipe.read_form`, then the tokenizer's `clean_text`) and as the tokenizer read text before they
existed (Unicode NFC alone). The numbers in docs/pipeline.md ("Prompts are read as the captions
were written").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch

ZWSP = "\u200b"


def _spaced(caption: str, joiner: str) -> str:
    """The caption's Thai runs cut into words joined by `joiner`; English words joined by `joiner` + " "."""
    from unclip.data.vocabulary import THAI_RUN, thai_words

    parts = []
    for chunk in caption.split(" "):
        if THAI_RUN.fullmatch(chunk):
            parts.append(joiner.join(thai_words(chunk)) if joiner else " ".join(thai_words(chunk)))
        else:
            parts.append(chunk + joiner)
    return " ".join(parts)


FORMS: dict[str, tuple[str, Callable[[str], str]]] = {
    "as the captions": ("both", lambda c: c),
    "spaces between Thai words": ("th", lambda c: _spaced(c, "")),
    "zero-width spaces between words": ("both", lambda c: _spaced(c, ZWSP)),
    "double spaces": ("both", lambda c: c.replace(" ", "  ")),
    "Title Case": ("en", lambda c: c.title()),
}


@contextlib.contextmanager
def raw_tokens(pipe) -> Iterator[None]:
    """The pipeline's CLIP tokenizing as before `clean_text`: text as given, NFC alone."""
    from tokenizers import normalizers

    tokenizer = pipe.clip.tokenizer
    backend = tokenizer.backend
    plain = copy.deepcopy(backend)
    plain.normalizer = normalizers.NFC()
    tokenizer.backend = plain
    quiet = logging.getLogger("unclip.tokenizer")  # spaced Thai runs past the context: said once, not here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with mock.patch("unclip.tokenizer.clean_text", lambda text: text):
            yield
    finally:
        tokenizer.backend = backend
        quiet.setLevel(level)


@torch.inference_mode()
def accuracy(pipe, scenes: list, attribute: str, lang: str, form: Callable[[str], str], *, read: bool) -> float:
    """Fraction of `scenes` whose own caption, written in `form`, wins against its swept twins."""
    from unclip.clip.zeroshot import candidates, render_and_encode
    from unclip.data.world import canonical_caption

    options = [[form(canonical_caption(c, lang=lang)) for c in candidates(s, attribute)] for s in scenes]
    if read:
        options = [[pipe.read_form(c) for c in row] for row in options]
    z_i = render_and_encode(pipe.clip)(scenes, lang)
    wins = 0
    for row, z in zip(options, z_i):
        wins += int((pipe.clip.encode_captions(row) @ z).argmax()) == 0
    return wins / len(scenes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("-n", type=int, default=150, help="one-object test scenes (default: 150)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.clip.zeroshot import scenes_for

    pipe = unclip.load(args.model)
    scenes = {a: list(scenes_for("test", a, args.n, seed=0)) for a in ("colour", "shape")}
    started = time.perf_counter()
    print(f"zero-shot colour / shape accuracy, {args.n} one-object test renders each, "
          f"model {args.model or 'shipped'}\n")
    print("| form | lang | read as unclip reads prompts | read as text was read before (NFC alone) |")
    print("|---|---|---|---|")
    for name, (langs, form) in FORMS.items():
        for lang in (("en", "th") if langs == "both" else (langs,)):
            now = [accuracy(pipe, scenes[a], a, lang, form, read=True) for a in ("colour", "shape")]
            with raw_tokens(pipe):
                before = [accuracy(pipe, scenes[a], a, lang, form, read=False) for a in ("colour", "shape")]
            print(f"| {name} | {lang} | {now[0]:.2f} / {now[1]:.2f} | {before[0]:.2f} / {before[1]:.2f} |",
                  flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
