"""A grid of shapes-world scenes with their English and Thai captions under each image."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from unclip.data.render import render
from unclip.data.world import caption, sample
from unclip.errors import DataError
from unclip.io import save_image_atomic

FONTS = {"en": "NotoSans-Latin.ttf", "th": "NotoSansThai-Regular.ttf"}


@lru_cache(maxsize=8)
def font(lang: str, size: int) -> ImageFont.FreeTypeFont:
    """The bundled font for `lang` (English captions never contain Thai and vice versa)."""
    path = resources.files("unclip") / "assets" / "fonts" / FONTS[lang]
    engine = ImageFont.Layout.RAQM if ImageFont.core.HAVE_RAQM else ImageFont.Layout.BASIC
    return ImageFont.truetype(str(path), size, layout_engine=engine)


def wrap(text: str, face: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break `text` into lines no wider than `width`; Thai (no spaces) breaks between characters
    that do not start with a combining mark."""
    lines, line = [], ""
    units = text.split(" ") if " " in text and face.getlength(text) > width else [text]
    for unit in units:
        candidate = f"{line} {unit}".strip()
        if face.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = unit
    lines.append(line)
    out = []
    for line in lines:  # split any line still too long (a long Thai word run)
        while face.getlength(line) > width and len(line) > 1:
            cut = len(line) - 1
            while cut > 1 and (face.getlength(line[:cut]) > width or _combining(line[cut])):
                cut -= 1
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def _combining(ch: str) -> bool:
    import unicodedata

    return unicodedata.category(ch) in ("Mn", "Mc")


def captioned_grid(images: list[Image.Image], captions: list[list[tuple[str, str]]], *, columns: int,
                   font_size: int = 13) -> Image.Image:
    """Images in a grid, each with lines of (lang, text) captions under it."""
    cell = images[0].width
    pad = 8
    width = max(cell, 150)
    faces = {lang: font(lang, font_size) for lang in FONTS}
    laid = [[(lang, line) for lang, text in caps for line in wrap(text, faces[lang], width)] for caps in captions]
    line_h = int(font_size * 1.55)
    text_h = max(len(lines) for lines in laid) * line_h
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (width + pad) + pad, rows * (cell + text_h + 2 * pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, laid)):
        x = pad + (i % columns) * (width + pad)
        y = pad + (i // columns) * (cell + text_h + 2 * pad)
        sheet.paste(image, (x + (width - cell) // 2, y))
        for k, (lang, line) in enumerate(lines):
            draw.text((x, y + cell + 4 + k * line_h), line, fill=(30, 30, 30) if lang == "en" else (20, 60, 140),
                      font=faces[lang])
    return sheet


def write_preview(out_path: str | Path, *, split: str = "train", n: int = 16, size: int = 96, seed: int = 0,
                  lang: str = "both") -> Path:
    """Write a PNG grid of `n` scenes of `split` with captions ("both" languages, or "en"/"th")."""
    if n < 1:
        raise DataError(f"-n {n}: the preview needs at least one scene")
    if size < 8:
        raise DataError(f"--size {size} is too small; use at least 8 pixels")
    langs = ("en", "th") if lang == "both" else (lang,)
    images, captions = [], []
    import numpy as np

    for i in range(n):
        s = sample(split, i, seed=seed, lang="en")
        images.append(render(s.scene, size))
        rng = np.random.default_rng([seed, i, 7])
        captions.append([(lg, caption(s.scene, lang=lg, rng=rng)) for lg in langs])
    grid = captioned_grid(images, captions, columns=min(n, 4 if size >= 96 else 6))
    return save_image_atomic(out_path, grid)
