"""A grid of shapes-world scenes with their English and Thai captions under each image."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unclip.data.render import render
from unclip.data.vocabulary import thai_words
from unclip.data.world import SPLITS, caption, sample
from unclip.errors import DataError
from unclip.io import save_image_atomic

# the Latin font holds ASCII, Latin-1, Latin Extended-A, Greek and punctuation (assets/fonts/OFL.txt)
FONTS = {"en": "NotoSans-Latin.ttf", "th": "NotoSansThai-Regular.ttf"}
INK = {"en": (30, 30, 30), "th": (20, 60, 140)}
# Thai words kept on one line with the word after them: สีแดง, ขนาดเล็ก, มุมบนซ้าย, มุมล่างขวา, บนพื้นหลังสีเทา
_GLUED = frozenset({"สี", "ขนาด", "ด้าน", "มุม", "ทาง", "ตรง", "บน", "ล่าง", "พื้นหลัง"})
_THAI = re.compile("([\u0e00-\u0e7f]+)")


@lru_cache(maxsize=8)
def font(lang: str, size: int) -> ImageFont.FreeTypeFont:
    """The bundled font for `lang` (a line mixing scripts draws each run in its own: `ScriptFaces`)."""
    path = resources.files("unclip") / "assets" / "fonts" / FONTS[lang]
    engine = ImageFont.Layout.RAQM if ImageFont.core.HAVE_RAQM else ImageFont.Layout.BASIC
    return ImageFont.truetype(str(path), size, layout_engine=engine)


class ScriptFaces:
    """The bundled fonts at one size, each run of a line drawn in the font of its script: the Thai
    font has no Latin letters or Arabic digits, the Latin one no Thai, and a caption may mix them
    ("วงกลมสีแดง 3 วง", a prompt typed half in English)."""

    def __init__(self, size: int):
        self.faces = {lang: font(lang, size) for lang in FONTS}

    def runs(self, text: str) -> list[tuple[str, str]]:
        """(lang, piece) for each run of Thai and of other script in `text`."""
        return [("th" if _THAI.fullmatch(piece) else "en", piece) for piece in _THAI.split(text) if piece]

    def getlength(self, text: str) -> float:
        return sum(self.faces[lang].getlength(piece) for lang, piece in self.runs(text))

    def draw(self, draw: ImageDraw.ImageDraw, centre: float, top: float, text: str, fill, lang: str) -> None:
        """`text` centred on x = `centre`, its `lang` font's ascender at y = `top`."""
        x, baseline = centre - self.getlength(text) / 2, top + self.faces[lang].getmetrics()[0]
        for run_lang, piece in self.runs(text):
            draw.text((x, baseline), piece, fill=fill, font=self.faces[run_lang], anchor="ls")
            x += self.faces[run_lang].getlength(piece)


def _units(text: str, lang: str) -> list[tuple[str, bool]]:
    """Pieces a line may break between, each with whether a space precedes it.

    English breaks at spaces. Thai has no spaces between words, so it breaks between the words
    of the caption vocabulary (`vocabulary.thai_words`), never inside one.
    """
    units: list[tuple[str, bool]] = []
    for chunk in text.split():
        pieces = thai_words(chunk) if lang == "th" else [chunk]
        merged: list[str] = []
        glue = False
        for piece in pieces:
            if merged and glue:
                merged[-1] += piece
            else:
                merged.append(piece)
            glue = piece in _GLUED
        units += [(piece, k == 0) for k, piece in enumerate(merged)]
    return units


def wrap(text: str, face: ImageFont.FreeTypeFont | ScriptFaces, width: int, lang: str = "en") -> list[str]:
    """Break `text` into lines no wider than `width` pixels, at word boundaries where possible.

    A single word wider than the line is cut between characters, never before a combining mark
    (a Thai vowel or tone mark stays with its consonant).
    """
    lines, line = [], ""
    for piece, spaced in _units(text, lang):
        candidate = f"{line} {piece}" if line and spaced else line + piece
        if not line or face.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = piece
    lines.append(line)
    out = []
    for line in lines:
        while face.getlength(line) > width and len(line) > 1:
            cut = len(line) - 1
            while cut > 1 and (face.getlength(line[:cut]) > width or _combining(line[cut])):
                cut -= 1
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def _combining(ch: str) -> bool:
    return unicodedata.category(ch) in ("Mn", "Mc")


def captioned_grid(images: list[Image.Image], captions: list[list[tuple[str, str]]], *, columns: int,
                   font_size: int = 13) -> Image.Image:
    """Images in a grid on white, each with its (lang, text) captions wrapped and centred under it.

    Each row is as tall as its longest caption; Thai lines get the extra height their marks need.
    """
    cell = images[0].width
    pad = 10
    width = max(cell, 150)
    faces = ScriptFaces(font_size)
    line_h = {"en": int(font_size * 1.45), "th": int(font_size * 1.7)}
    laid = [[(lang, line) for lang, text in caps for line in wrap(text, faces, width, lang)]
            for caps in captions]
    heights = [sum(line_h[lang] for lang, _ in lines) for lines in laid]
    rows = [range(r, min(r + columns, len(images))) for r in range(0, len(images), columns)]
    row_h = [cell + 6 + max(heights[i] for i in row) + pad for row in rows]
    sheet = Image.new("RGB", (columns * (width + pad) + pad, sum(row_h) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    top = pad
    for row, h in zip(rows, row_h):
        for col, i in enumerate(row):
            x = pad + col * (width + pad)
            sheet.paste(images[i], (x + (width - cell) // 2, top))
            y = top + cell + 6
            for lang, line in laid[i]:
                faces.draw(draw, x + width / 2, y, line, INK[lang], lang)
                y += line_h[lang]
        top += h
    return sheet


def write_preview(out_path: str | Path, *, split: str = "train", n: int = 16, size: int = 96, seed: int = 0,
                  lang: str = "both") -> Path:
    """Write a PNG grid of scenes 0..n-1 of `split`, each with captions in `lang` (or "both").

    Both captions describe the same scene; each comes from the random templates of its language.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if n < 1:
        raise DataError(f"-n {n}: the preview needs at least one scene")
    if size < 8:
        raise DataError(f"--size {size} is too small; use at least 8 pixels")
    if lang not in ("both", "en", "th"):
        raise DataError(f"unknown caption language {lang!r}; use both, en or th")
    langs = ("en", "th") if lang == "both" else (lang,)
    images, captions = [], []
    for i in range(n):
        scene = sample(split, i, seed=seed, lang="en").scene
        images.append(render(scene, size))
        rng = np.random.default_rng([seed, SPLITS[split], i, 7])  # the captions' own stream
        captions.append([(lg, caption(scene, lang=lg, rng=rng)) for lg in langs])
    grid = captioned_grid(images, captions, columns=min(n, 4 if size >= 96 else 6))
    return save_image_atomic(out_path, grid)
