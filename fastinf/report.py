"""A self-contained HTML gallery of an `InfluenceResult`: one row per query, its proponents,
its opponents.

The page can be mailed or archived as one file: every picture is an inline
`data:image/png;base64,` URI (`fastinf.imaging`), the style is one inline `<style>`
block, and there is no script and no external reference of any kind. Every text (title,
details, captions) is HTML-escaped. Thumbnails are upscaled (nearest-neighbour) to at most
`THUMBNAIL_PX` (64) pixels on their longer side unless a scale is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from html import escape
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from .artifacts import atomic_write_text
from .imaging import data_uri, png_bytes
from .scoring import InfluenceResult, TopK

__all__ = ["THUMBNAIL_PX", "format_score", "render_report", "write_report"]

THUMBNAIL_PX = 64
TrainImages = Callable[[int], Tensor] | Dataset | Tensor

_STYLE = """
body { font: 13px/1.35 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
table.details { border-collapse: collapse; margin: 0 0 8px; }
table.details th { text-align: left; font-weight: normal; color: #555; padding: 1px 12px 1px 0; }
p.note { color: #555; margin: 4px 0 12px; }
section.query { display: flex; gap: 16px; border-top: 1px solid #ddd; padding: 8px 0; }
div.strip { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin: 0 0 6px; }
span.label { width: 84px; font-weight: bold; }
div.proponents span.label { color: #1b6e1b; }
div.opponents span.label { color: #a11a1a; }
figure { margin: 0; text-align: center; font-size: 11px; }
img { display: block; border: 1px solid #ccc; }
figure.missing { color: #999; }
span.estimate { color: #a65f00; }
"""


def format_score(score: float) -> str:
    """τ with its sign and 3 significant digits, scientific when small or large:
    +0.0123, -4.56e-05, +1.23e+03."""
    return f"{score:+.3g}"


def _text(value) -> str:
    """A details value as short text: floats to 3 significant digits, dicts as
    `key value, ...`, lists comma-separated."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_text(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(item) for item in value)
    return str(value)


def _image_getter(train_images: TrainImages) -> Callable[[int], Tensor]:
    """Training image [C, H, W] by dataset position, from a tensor, a callable or a Dataset
    of `(image, cond)` items (or bare images)."""
    if isinstance(train_images, Tensor):
        return train_images.__getitem__
    if callable(train_images):
        return train_images

    def item_image(index: int) -> Tensor:
        item = train_images[index]
        return item[0] if isinstance(item, (tuple, list)) else item

    return item_image


def _img(uri: str, size: tuple[int, int], alt: str) -> str:
    width, height = size
    return f'<img src="{uri}" width="{width}" height="{height}" alt="{escape(alt)}">'


def _strip(
    name: str, topk: TopK, row: int, thumbnail: Callable[[int], str], size: tuple[int, int]
) -> str:
    """One labelled strip of a query's proponents or opponents, each captioned with its
    training index, its score and whether that score is exact or an index estimate."""
    cells = [f'<span class="label">{name}</span>']
    for col in range(topk.indices.shape[1]):
        index = int(topk.indices[row, col])
        if index < 0:  # fewer scored examples than k
            cells.append('<figure class="missing"><figcaption>none</figcaption></figure>')
            continue
        score = float(topk.scores[row, col])
        exact = topk.exact is None or bool(topk.exact[row, col])
        kind = "exact" if exact else "index estimate"
        cells.append(
            f'<figure title="{escape(f"training image {index}, score {score!r}, {kind}")}">'
            + _img(thumbnail(index), size, f"training image {index}")
            + f"<figcaption>#{index}<br>{escape(format_score(score))}<br>"
            + f'<span class="{"exact" if exact else "estimate"}">{kind}</span>'
            + "</figcaption></figure>"
        )
    return f'<div class="strip {name}">' + "".join(cells) + "</div>"


def render_report(
    queries: Tensor,
    result: InfluenceResult,
    train_images: TrainImages,
    *,
    title: str,
    details: dict | None = None,
    scale: int | None = None,
) -> str:
    """The HTML text of a self-contained gallery of `result`.

    Args:
        queries: [Q, C, H, W] query images in the model's range [-1, 1] (C = 1 or 3), in
            the order `result` holds them.
        result: what `engine.score` returned for `queries`; each row shows the query, its
            k proponents (highest τ, made it more likely) and its k opponents (lowest τ),
            each captioned with training index, τ (`format_score`) and "exact" or "index
            estimate" (`TopK.exact`). An entry with index -1 is shown as an empty cell.
        train_images: training image [C, H, W] by dataset position: a callable, a Dataset
            of `(image, cond)` items (e.g. `engine.train_set`) or an [N, C, H, W] tensor.
        title: the page's heading; details: shown under it as a two-column table
            (model, dataset size, curvature, k, timings, ...).
        scale: pixels per model pixel (nearest-neighbour); None: the largest that keeps a
            thumbnail's longer side within `THUMBNAIL_PX` (at least 1).
    """
    rows = result.proponents.indices.shape[0]
    if queries.dim() != 4 or queries.shape[0] != rows:
        raise ValueError(
            f"queries of shape {tuple(queries.shape)} do not match a result of {rows} queries; "
            "pass the [Q, C, H, W] images the result was computed for."
        )
    if scale is None:
        scale = max(1, THUMBNAIL_PX // max(queries.shape[-2:]))
    size = (queries.shape[-1] * scale, queries.shape[-2] * scale)
    train_image = _image_getter(train_images)
    uris: dict[int, str] = {}  # a training image that answers several queries is drawn once

    def thumbnail(index: int) -> str:
        if index not in uris:
            uris[index] = data_uri(png_bytes(train_image(index), scale))
        return uris[index]

    estimates = any(
        topk.exact is not None and not bool(topk.exact.all())
        for topk in (result.proponents, result.opponents)
    )
    notes = (
        "Positive score: proponent (the training image made the query more likely); "
        "negative: opponent. Proponents are sorted by descending score, opponents by "
        "ascending score."
    )
    if estimates:
        notes += " Scores marked “index estimate” come from the index search, not exact τ."
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    if details:
        parts.append('<table class="details">')
        parts += [
            f"<tr><th>{escape(str(key))}</th><td>{escape(_text(value))}</td></tr>"
            for key, value in details.items()
        ]
        parts.append("</table>")
    parts.append(f'<p class="note">{escape(notes)}</p>')
    for row in range(rows):
        caption = f"query {row}<br>id {int(result.query_ids[row])}"
        query = _img(data_uri(png_bytes(queries[row], scale)), size, f"query {row}")
        parts += [
            '<section class="query">',
            f'<figure class="query">{query}<figcaption>{caption}</figcaption></figure><div>',
            _strip("proponents", result.proponents, row, thumbnail, size),
            _strip("opponents", result.opponents, row, thumbnail, size),
            "</div></section>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike,
    queries: Tensor,
    result: InfluenceResult,
    train_images: TrainImages,
    *,
    title: str,
    details: dict | None = None,
    scale: int | None = None,
) -> Path:
    """Write `render_report(...)` to `path` atomically (a killed process leaves the old
    file or the new one); returns `path`."""
    text = render_report(queries, result, train_images, title=title, details=details, scale=scale)
    return atomic_write_text(path, text)
