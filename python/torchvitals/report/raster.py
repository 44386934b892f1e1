"""Heatmaps as small inline PNGs with HTML labels: one pixel per (row, column) of the
matrix, scaled up by the browser without smoothing, and its row labels, step axis and
colour bar in HTML (readable at any number of rows, searchable, selectable).

A matrix becomes a PNG here in NumPy and zlib (no figure is drawn), so a report with
hundreds of layers and a histogram for each of them is written in seconds and stays small.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NAN_RGB = (232, 232, 232)  # cells with no value: light grey, never a colour of the scale
ZERO_RGB = (120, 190, 255)  # exactly 0 on a log scale (-inf): light blue
ROW_PX = 14  # height of one labelled row: the labels' line height


def _lut(cmap: str, n: int = 256) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, n))[:, :3] * 255).round().astype(np.uint8)


def png(index: np.ndarray, palette: np.ndarray) -> bytes:
    """An 8-bit palette PNG: pixel ``index[row, col]`` has the colour ``palette[index]``
    (one byte a pixel: a third of RGB's size before compression)."""
    height, width = index.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = np.concatenate([np.zeros((height, 1), np.uint8), index.astype(np.uint8)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


LEVELS = 254  # colours of a scale; palette entries 254 and 255 are ZERO_RGB and NAN_RGB


def colorize(matrix: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``matrix`` as palette indices: [vmin, vmax] onto 0..LEVELS-1 (clipped), -inf (the
    log of 0) onto LEVELS, NaN onto LEVELS + 1 (see :func:`palette`)."""
    span = vmax - vmin if vmax > vmin else 1.0
    finite = np.isfinite(matrix)
    scaled = (np.where(finite, matrix, vmin) - vmin) / span * (LEVELS - 1)
    idx = np.clip(scaled.round(), 0, LEVELS - 1).astype(np.uint8)
    idx[matrix == -np.inf] = LEVELS
    idx[np.isnan(matrix)] = LEVELS + 1
    return idx


def palette(cmap: str) -> np.ndarray:
    return np.concatenate([_lut(cmap, LEVELS), np.array([ZERO_RGB, NAN_RGB], np.uint8)])


def block_mean(matrix: np.ndarray, steps: np.ndarray, columns: int):
    """Averages columns in blocks so that at most ``columns`` remain, NaN-aware (a block
    with no value stays NaN); returns the matrix and the first step of each block."""
    n = matrix.shape[1]
    if n <= columns:
        return matrix, steps
    starts = np.linspace(0, n, columns + 1).astype(int)[:-1]
    finite = np.isfinite(matrix)
    sums = np.add.reduceat(np.where(finite, matrix, 0.0), starts, axis=1)
    counts = np.add.reduceat(finite, starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts, steps[starts]


@dataclass(frozen=True)
class Scale:
    """The colour scale of a heatmap: ``label`` names what the colour shows."""

    vmin: float
    vmax: float
    label: str
    cmap: str = "magma"
    log: bool = False  # the values are log10 of what ``label`` names


def _fmt(v: float, log: bool) -> str:
    return f"{10.0**v:.2g}" if log else f"{v:.3g}"


def colorbar(scale: Scale) -> str:
    stops = ", ".join(
        f"rgb({r},{g},{b})" for r, g, b in _lut(scale.cmap)[np.linspace(0, 255, 9).astype(int)]
    )
    return (
        "<div class='cbar'>"
        f"<span>{html.escape(_fmt(scale.vmin, scale.log))}</span>"
        f"<i style='background:linear-gradient(to right, {stops})'></i>"
        f"<span>{html.escape(_fmt(scale.vmax, scale.log))}</span>"
        f" <span class='cbar-label'>{html.escape(scale.label)}</span></div>"
    )


def step_axis(steps: np.ndarray) -> str:
    """Round step labels under an image (about five), each at its column: ``steps`` are
    the first steps of the image's columns."""
    if steps.size == 0:
        return ""
    lo, hi = int(steps[0]), int(steps[-1])
    raw = max((hi - lo) / 5, 1)
    base = 10 ** np.floor(np.log10(raw))
    every = int(next(m * base for m in (1, 2, 5, 10) if m * base >= raw))
    ticks = range(-(-lo // every) * every, hi + 1, every)
    # a step's place: its (fractional) column, from the columns' first steps
    where = np.interp(list(ticks), steps, np.arange(steps.size)) + 0.5
    spans = "".join(
        f"<span style='left:{x / steps.size * 100:.2f}%'>{t}</span>"
        for t, x in zip(ticks, where, strict=True)
    )
    return f"<div class='xaxis'>{spans}</div><div class='xlabel'>step</div>"


def heatmap(
    matrix: np.ndarray,
    steps: np.ndarray,
    rows: Sequence[str],
    scale: Scale,
    alt: str,
    *,
    row_px: int = ROW_PX,
    ticks: Sequence[tuple[int, str]] | None = None,
    height: int = 120,
) -> str:
    """A ``<figure>`` of ``matrix`` (rows top to bottom, one per step column). Every row is
    labelled, ``row_px`` high, unless ``ticks`` (``(row, label)`` pairs) label a few (the
    image then ``height`` pixels high)."""
    index = colorize(matrix, scale.vmin, scale.vmax)
    image = base64.b64encode(png(index, palette(scale.cmap))).decode()
    height = row_px * len(rows) if ticks is None else height
    if ticks is None:
        labels = "".join(
            f"<div title='{html.escape(r, quote=True)}'>{html.escape(r)}</div>" for r in rows
        )
        ylab = f"<div class='rows' style='line-height:{row_px}px'>{labels}</div>"
    else:
        n = max(len(rows), 1)
        spans = "".join(
            f"<span style='top:{(i + 0.5) / n * 100:.2f}%'>{html.escape(t)}</span>"
            for i, t in ticks
        )
        ylab = f"<div class='ticks' style='height:{height}px'>{spans}</div>"
    return (
        f"<figure class='plot raster'>{ylab}<div class='cell'>"
        f"<img alt='{html.escape(alt, quote=True)}' style='height:{height}px' "
        f"src='data:image/png;base64,{image}'>{step_axis(steps)}</div>"
        f"{colorbar(scale)}</figure>"
    )
