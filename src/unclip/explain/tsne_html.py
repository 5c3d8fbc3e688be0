"""A self-contained interactive scatter plot as one HTML file: inline SVG, a little JavaScript.

Every sample is one `<circle class="pt">` (a ring, class "pt ring", for a second kind of sample); the
mouse over it, or a finger tapping beside it, shows its class name and its image (drawn on a canvas
from pixel bytes embedded in the page); clicking a legend entry hides or shows that class. Each
legend entry counts its class's samples of each kind by name ("12 images, 12 captions"). The page
loads nothing from anywhere (no CDN, no external file), so it works offline and can be attached to a
report or an e-mail as it is.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unclip.explain.digits import DIGIT_COLORS
from unclip.io import atomic_write

if TYPE_CHECKING:
    import numpy as np

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; background: #fff; }
h1 { font-size: 1.15em; margin: 0 0 .2em; } p.sub { margin: 0 0 .8em; color: #555; font-size: .9em; }
.wrap { display: flex; align-items: flex-start; gap: 1em; flex-wrap: wrap; }
svg { border: 1px solid #ccc; background: #fcfcfc; max-width: 100%; height: auto; }
circle.pt { stroke: #fff; stroke-width: .5; cursor: crosshair; }
circle.pt.ring { fill: #fff; stroke: currentColor; stroke-width: 1.5; }
circle.pt.hot { stroke: #000; stroke-width: 1.5; }
circle.off { display: none; }
text.axis { font-size: 12px; fill: #555; }
#legend { font-size: .9em; } #legend .item { cursor: pointer; padding: 2px 4px; user-select: none; }
#legend .item.off { opacity: .35; } #legend .sw { display: inline-block; width: 12px; height: 12px;
  border-radius: 50%; margin-right: 6px; vertical-align: -1px; } #legend .n { color: #777; }
#tip { position: fixed; display: none; pointer-events: none; background: #fff; border: 1px solid #888;
  border-radius: 4px; padding: 6px; box-shadow: 0 2px 6px rgba(0,0,0,.25); font-size: .9em; }
#tip canvas { width: 96px; height: 96px; image-rendering: pixelated; display: block;
  border: 1px solid #ddd; margin-bottom: 4px; }
"""

_SCRIPT = """
(function () {
  const D = JSON.parse(document.getElementById('data').textContent);
  const tip = document.getElementById('tip'), text = document.getElementById('tiptext');
  const canvas = document.getElementById('tipimg'), ctx = canvas.getContext('2d');
  canvas.width = D.w; canvas.height = D.h;
  function draw(i) {
    const hex = D.px[i], img = ctx.createImageData(D.w, D.h);
    for (let p = 0; p < D.w * D.h; p++) {
      for (let ch = 0; ch < 3; ch++) {
        const k = D.c === 1 ? p : p * 3 + ch;
        let v = parseInt(hex.substr(2 * k, 2), 16);
        if (D.c === 1 && D.invert) v = 255 - v;
        img.data[4 * p + ch] = v;
      }
      img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }
  const svg = document.getElementById('plot'), pts = Array.from(svg.querySelectorAll('circle.pt'));
  const xs = pts.map(function (el) { return +el.getAttribute('cx'); });
  const ys = pts.map(function (el) { return +el.getAttribute('cy'); });
  let hot = null;
  // The shown point nearest the pointer within REACH screen pixels: on a phone the map shrinks to half
  // size and its points to 4 px, too small to hit with a finger (or, at 1,797 points, a mouse).
  const REACH = 20;
  function nearest(e) {
    const m = svg.getScreenCTM().inverse(), p = new DOMPoint(e.clientX, e.clientY).matrixTransform(m);
    let best = null, bestD = Math.pow(REACH * m.a, 2);
    for (let k = 0; k < pts.length; k++) {
      const d = Math.pow(xs[k] - p.x, 2) + Math.pow(ys[k] - p.y, 2);
      if (d <= bestD && !pts[k].classList.contains('off')) { best = pts[k]; bestD = d; }
    }
    return best;
  }
  function hide() { tip.style.display = 'none'; if (hot) hot.classList.remove('hot'); hot = null; }
  function show(e) {
    const t = nearest(e);
    if (!t) { hide(); return; }
    if (t !== hot) {
      if (hot) hot.classList.remove('hot');
      hot = t;
      t.classList.add('hot');
      const i = +t.dataset.i;
      draw(i);
      text.textContent = D.label + ': ' + D.names[+t.dataset.c] + (D.notes ? ' (' + D.notes[i] + ')' : '')
        + ' \u00b7 #' + i;
    }
    tip.style.display = 'block';
    tip.style.left = Math.max(4, Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4)) + 'px';
    tip.style.top = Math.max(4, Math.min(e.clientY + 14, window.innerHeight - tip.offsetHeight - 4)) + 'px';
  }
  // pointermove: a mouse hovering; pointerdown: a finger tapping (its pointer leaves when lifted)
  svg.addEventListener('pointermove', show);
  svg.addEventListener('pointerdown', show);
  svg.addEventListener('pointerleave', function (e) { if (e.pointerType === 'mouse') hide(); });
  document.querySelectorAll('#legend .item').forEach(function (item) {
    item.addEventListener('click', function () {
      item.classList.toggle('off');
      svg.querySelectorAll('circle.pt[data-c="' + item.dataset.c + '"]')
        .forEach(function (el) { el.classList.toggle('off'); });
      if (hot && hot.classList.contains('off')) hide();
    });
  });
})();
"""


def scatter_html(
    *,
    points: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    class_names: Sequence[str],
    title: str,
    subtitle: str = "",
    notes: Sequence[str] | None = None,
    rings: Sequence[bool] | None = None,
    label_name: str = "digit",
    point_names: tuple[str, str] = ("image", "caption"),
    axis_names: tuple[str, str] = ("t-SNE 1", "t-SNE 2"),
    invert: bool = True,
    size: int = 640,
) -> str:
    """Return the page's HTML text.

    Args:
        points: [N, 2] coordinates (any scale; fitted into the plot with equal aspect).
        labels: [N] integer class of each point, indexing `class_names` (and the colours).
        images: [N, H, W] grayscale or [N, H, W, 3] RGB, values in [0, 1], shown on hover.
        class_names: the legend's names, one per class.
        notes: optional [N] short text shown after the class name on hover (e.g. "train").
        rings: optional [N] bools: draw these points as rings in their class's colour, the others as dots
            (CLIP's captions beside its images); say which is which in `subtitle`.
        point_names: what a dot and a ring each stand for (singular nouns that take an "s"), so that the
            legend says what it counts: "circle (12 images, 12 captions)", not the 24 points.
        invert: draw grayscale images dark-on-light (ink on paper), as digits are usually shown.
        size: the plot's width and height in CSS pixels.
    """
    import numpy as np

    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    images = np.asarray(images)
    n = len(points)
    rings = np.zeros(n, dtype=bool) if rings is None else np.asarray(rings, dtype=bool)
    if points.shape != (n, 2) or labels.shape != (n,) or len(images) != n or rings.shape != (n,):
        raise ValueError(f"need points [N,2], labels [N], images [N,...], rings [N]; got {points.shape}, "
                         f"{labels.shape}, {images.shape}, {rings.shape}")
    channels = 3 if images.ndim == 4 else 1
    h, w = images.shape[1:3]
    pixels = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8).reshape(n, -1)  # [N, H*W*C]

    pad = 24.0
    lo, hi = points.min(axis=0), points.max(axis=0)
    scale = (size - 2 * pad) / max(float((hi - lo).max()), 1e-12)
    offset = pad + ((size - 2 * pad) - (hi - lo) * scale) / 2
    xy = (points - lo) * scale + offset
    xy[:, 1] = size - xy[:, 1]  # SVG's y grows downwards
    colors = [DIGIT_COLORS[k % len(DIGIT_COLORS)] for k in range(len(class_names))]
    circles = "\n".join(
        f'<circle class="pt ring" data-i="{i}" data-c="{c}" cx="{x:.1f}" cy="{y:.1f}" r="3.5" color="{colors[c]}"/>'
        if ring else
        f'<circle class="pt" data-i="{i}" data-c="{c}" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colors[c]}"/>'
        for i, ((x, y), c, ring) in enumerate(zip(xy, labels, rings))
    )
    kinds = [(np.bincount(labels[~rings], minlength=len(class_names)), point_names[0])]
    if rings.any():
        kinds.append((np.bincount(labels[rings], minlength=len(class_names)), point_names[1]))

    def counted(k: int) -> str:  # "12 images, 12 captions": a class's samples of each kind
        return ", ".join(f"{counts[k]} {name}{'' if counts[k] == 1 else 's'}" for counts, name in kinds if counts[k])

    legend = "\n".join(
        f'<div class="item" data-c="{k}"><span class="sw" style="background:{colors[k]}"></span>'
        f'{html.escape(name)} <span class="n">({html.escape(counted(k))})</span></div>'
        for k, name in enumerate(class_names) if any(counts[k] for counts, _ in kinds)
    )
    data = {"w": int(w), "h": int(h), "c": channels, "invert": bool(invert), "label": label_name,
            "names": list(class_names), "px": [row.tobytes().hex() for row in pixels],
            "notes": list(notes) if notes is not None else None}
    data_json = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p class="sub">{esc(subtitle)}</p>
<div class="wrap">
<svg id="plot" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" aria-label="{esc(title)}">
<text class="axis" x="{size / 2}" y="{size - 6}" text-anchor="middle">{esc(axis_names[0])}</text>
<text class="axis" x="12" y="{size / 2}" text-anchor="middle" transform="rotate(-90 12 {size / 2})">{esc(axis_names[1])}</text>
<g id="points">
{circles}
</g>
</svg>
<div id="legend"><strong>{esc(label_name)}</strong> (click to hide)
{legend}
</div>
</div>
<div id="tip"><canvas id="tipimg"></canvas><div id="tiptext"></div></div>
<script type="application/json" id="data">{data_json}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_scatter_html(path: str | Path, **kwargs) -> Path:
    """Write `scatter_html(**kwargs)` to `path` atomically and return the path."""
    path = Path(path)
    with atomic_write(path, "w") as handle:
        handle.write(scatter_html(**kwargs))
    return path
