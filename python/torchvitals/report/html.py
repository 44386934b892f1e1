"""A self-contained HTML report of a run, for models of any depth: the loss and LR with
the detected events, the events and worst layers as tables, the featured layers' gradient
norms, per-layer heatmaps over steps (every layer, grouped by module path when there are
many), and histograms over steps of the gradients, activations and weights of any layer;
the pre-flight checks first when the run has them (``preflight.json``).

The file needs no network and no other file: the heatmaps and histograms are small inline
PNGs (:mod:`.raster`), the loss and norm charts inline SVG drawn by a small inline script
(:mod:`.charts`), and a Content-Security-Policy forbids the page to fetch anything. Every
name that came from the run (layers, causes) is HTML-escaped. What the tables and the
histograms show comes from :mod:`torchvitals.analysis.summary`; this module only renders
it. docs/report.md describes every section.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from torchvitals.analysis import Event
from torchvitals.analysis.events import CURVE_KINDS, SEVERITIES
from torchvitals.analysis.runtables import layer_order, series_from_run
from torchvitals.analysis.summary import (
    EVENT_COLUMNS,
    WORST_COLUMNS,
    HistogramSeries,
    event_rows,
    featured_layers,
    histogram_series,
    layer_groups,
    worst_layers,
)
from torchvitals.engine.histogram import hist_edges
from torchvitals.preflight.report import COLUMNS as PREFLIGHT_COLUMNS
from torchvitals.preflight.report import PreflightReport
from torchvitals.store.layout import write_file_atomic
from torchvitals.store.reader import Run

from .charts import SCRIPT, chart, line, log_scale
from .raster import Scale, block_mean, heatmap

HEATMAP_COLUMNS = 400  # step columns of a layer heatmap: longer runs are block-averaged
HIST_COLUMNS = 160  # of a histogram image
FLAT_ROWS = 48  # up to this many layers a heatmap has a row per layer, else one per group
FEATURED = 12  # layers in the histogram grid and the norm chart
EVENT_COLORS = {
    "plateau": "#9e9e9e",
    "kick_in": "#2e7d32",
    "lr_drop": "#1565c0",
    "lr_rise": "#00838f",
    "divergence": "#c62828",
    "spike": "#ef6c00",
    "nonfinite": "#6a1b9a",
}
LINE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")  # fmt: skip
# metric: (title, log scale, colour-bar label, how a group's row is made from its layers)
HEATMAPS = {
    "grad_norm": ("Gradient norm per layer", True, "gradient L2 norm", "norm"),
    "weight_norm": ("Weight norm per layer", True, "weight L2 norm", "norm"),
    "act_grad_norm": ("Activation-gradient norm per layer", True, "L2 norm", "norm"),
    "dead_frac": ("Dead-unit fraction per layer", False, "fraction of units dead", "max"),
    "sat_frac": ("Saturation fraction per layer", False, "fraction saturated", "max"),
    "large_frac": ("Large pre-activation fraction per layer", False, "fraction |x| >= 6", "max"),
}
NOT_MEASURED = {
    "dead_frac": "Dead units: not measured on any layer (they are counted after rectifiers "
    "such as ReLU and on modules named by include=).",
    "sat_frac": "Saturation: not measured on any layer (it is counted on bounded "
    "activations: sigmoid, tanh, hardtanh, hardsigmoid, softmax).",
    "large_frac": "Large pre-activations: not measured on any layer (counted on the outputs "
    "of linear layers and norms, schema version 2).",
}
KIND_NAMES = {"grad": "gradient", "act": "activation", "weight": "weight",
              "act_grad": "activation gradient"}  # fmt: skip


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _loss_chart(step, loss, lr, events: Sequence[Event], metric: str) -> str:
    lines = [line(metric, step, loss, "#37474f")]
    if lr is not None and np.isfinite(lr).any():
        lines.append(line("learning rate", step, lr, "#1565c0", axis="y2"))
    marks = [
        {
            "step": int(ev.step),
            "end": None if ev.end_step is None else int(ev.end_step),
            "label": ev.kind,
            "color": EVENT_COLORS[ev.kind],
        }
        for ev in events
        if ev.kind in EVENT_COLORS and ev.step is not None
    ]
    spec = {
        "lines": lines,
        "ylabel": metric,
        "ylog": log_scale([loss]),
        "y2label": "learning rate",
        "y2log": lr is not None and log_scale([lr], decades=0.9),
        "events": marks,
    }
    return chart(spec, f"{metric} and learning rate over steps, with the detected events")


def _norm_chart(step, series: dict[str, np.ndarray], featured: Sequence[str]) -> str | None:
    # a layer whose gradient is 0 throughout has no line on a log scale: its heatmap row shows it
    names = [n for n in featured if (series.get(f"grad_norm/{n}", np.zeros(1)) > 0).any()]
    names = names[:FEATURED]
    if not names:
        return None
    values = [series[f"grad_norm/{n}"] for n in names]
    lines = [
        line(n, step, v, LINE_COLORS[i]) for i, (n, v) in enumerate(zip(names, values, strict=True))
    ]
    spec = {"lines": lines, "ylabel": "gradient norm", "ylog": log_scale(values), "nearest": True}
    return chart(spec, "gradient norm over steps of the featured layers")


def _nice_max(v: float) -> float:
    """The smallest of 0.01, 0.02, 0.05, 0.1, ... 1 at or above ``v``."""
    for top in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        if v <= top:
            return top
    return 1.0


def _group_rows(matrix: np.ndarray, members: list[np.ndarray], how: str) -> np.ndarray:
    """One row per group: the norm of the group's layers together (root of the sum of
    squares), or the maximum over its layers; NaN where none of them has a value."""
    out = []
    for idx in members:
        part = matrix[idx]
        has = np.isfinite(part).any(axis=0)
        if how == "norm":
            row = np.sqrt(np.nansum(np.where(np.isfinite(part), part, 0.0) ** 2, axis=0))
        else:
            row = np.nanmax(np.where(np.isfinite(part), part, -np.inf), axis=0)
        out.append(np.where(has, row, np.nan))
    return np.stack(out)


def _heatmap_section(step: np.ndarray, series: dict[str, np.ndarray], metric: str) -> str:
    """Every layer with a value of ``metric``: one row each, or one row per module group
    with a drill-down per group when there are more than FLAT_ROWS; a line instead when
    no layer has a value, or every value is 0."""
    title, log, label, how = HEATMAPS[metric]
    names = [k.split("/", 1)[1] for k, v in series.items()
             if k.startswith(metric + "/") and np.isfinite(v).any()]  # fmt: skip
    head = f"<h2>{html.escape(title)}</h2>"
    if not names:
        return (
            head + f"<p class='none'>{html.escape(NOT_MEASURED[metric])}</p>"
            if metric in NOT_MEASURED
            else ""
        )
    matrix = np.stack([series[f"{metric}/{n}"] for n in names])
    recorded = np.isfinite(matrix).any(axis=0)  # weights are recorded every k steps only
    matrix, cols = block_mean(matrix[:, recorded], step[recorded], HEATMAP_COLUMNS)
    groups = layer_groups(names)
    grouped = len(names) > FLAT_ROWS and len(groups) < len(names)
    pos = {n: i for i, n in enumerate(names)}
    members = [np.array([pos[n] for n in group]) for group in groups.values()]
    overview = _group_rows(matrix, members, how) if grouped else matrix
    finite = np.concatenate([matrix[np.isfinite(matrix)], overview[np.isfinite(overview)]])
    if log:
        positive = finite[finite > 0]
        if not positive.size:
            return head + "<p class='none'>Every value is 0.</p>"
        scale = Scale(float(np.log10(positive.min())), float(np.log10(positive.max())),
                      f"{label} (log scale)", log=True)  # fmt: skip
    else:
        if not (finite > 0).any():
            return head + (f"<p class='none'>Measured on {len(names)} layers: 0 at every "
                           "step.</p>")  # fmt: skip
        scale = Scale(0.0, _nice_max(float(finite.max())), label)

    def shown(m: np.ndarray) -> np.ndarray:
        if not log:
            return m
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log10(np.where(m >= 0, m, np.nan))  # 0 -> -inf, its own colour

    what = f"{len(names)} layers"
    if log and (finite == 0).any():
        what += " (light blue: exactly 0)"
    if not grouped:
        body = heatmap(shown(matrix), cols, names, scale, title)
        return head + f"<p class='note'>{what}, one row each; grey: no value.</p>" + body
    group_what = "the norm of its layers together" if how == "norm" else "its highest layer"
    rows = [f"{g} ({len(m)})" for g, m in groups.items()]
    body = heatmap(shown(overview), cols, rows, scale, f"{title}, by module group")
    details = "".join(
        f"<details class='group'><summary>{html.escape(g)} ({len(m)} layers)</summary>"
        f"{heatmap(shown(matrix[idx]), cols, m, scale, f'{title}: {g}')}</details>"
        for (g, m), idx in zip(groups.items(), members, strict=True)
    )
    return head + (
        f"<p class='note'>{what} in {len(groups)} module groups (the path up to its first "
        f"number): one row per group, its colour {group_what}; open a group below for "
        f"its layers. Grey: no value.</p>{body}<div class='groups'>{details}</div>"
    )


def _hist_figure(layer: str, kind: str, h: HistogramSeries, height: int) -> str | None:
    """One (layer, kind) histogram over steps: |x| bins upwards, or, with ``neg``, the
    positive elements' bins upwards and the negative ones' mirrored below them."""
    used = np.flatnonzero(h.counts.sum(axis=1) > 0)
    if not used.size:
        return None
    lo, hi = int(used.min()), int(used.max())
    labels = hist_edges().labels[lo : hi + 1]
    if h.neg is None:
        matrix = h.counts[lo : hi + 1][::-1]
        names = list(labels[::-1])
    else:
        pos, neg = h.counts - h.neg, h.neg
        matrix = np.concatenate([pos[lo : hi + 1][::-1], neg[lo : hi + 1]])
        names = [f"+{t}" for t in labels[::-1]] + [f"-{t}" for t in labels]
    matrix, cols = block_mean(np.log10(1.0 + matrix), h.steps, HIST_COLUMNS)
    every = max(1, len(names) // 6)
    ticks = [(i, names[i]) for i in range(0, len(names), every)]
    scale = Scale(0.0, max(float(np.nanmax(matrix)), 1e-9), "log10(1 + count)", cmap="viridis")
    sign = "x (sign mirrored)" if h.neg is not None else "|x|"
    alt = f"histogram of {sign} of the {KIND_NAMES.get(kind, kind)} of {layer} over steps"
    caption = f"{layer} · {KIND_NAMES.get(kind, kind)}"
    signed = " signed" if h.neg is not None else ""
    quoted = html.escape(layer, quote=True)
    return (
        f"<div class='hist{signed}' data-layer='{quoted}' data-kind='{html.escape(kind)}'>"
        f"<div class='cap'>{html.escape(caption)}</div>"
        f"{heatmap(matrix, cols, names, scale, alt, ticks=ticks, height=height)}</div>"
    )


def _histogram_section(run: Run, featured: Sequence[str]) -> str:
    shown = list(dict.fromkeys(featured))[:FEATURED]
    figures: dict[tuple[str, str], str] = {}
    tiles: dict[tuple[str, str], str] = {}
    for key, h in histogram_series(run):  # one series in memory at a time
        figure = _hist_figure(*key, h, height=260)
        if figure is None:
            continue
        figures[key] = figure
        if key[0] in shown:
            tiles[key] = _hist_figure(*key, h, height=110) or ""
    if not figures:
        return "<h2>Histograms over steps</h2><p class='none'>This run recorded no histograms.</p>"
    kinds = list(dict.fromkeys(k for _, k in figures))
    grid = "".join(
        tiles[(layer, kind)] for layer in shown for kind in kinds if (layer, kind) in tiles
    )
    layers = layer_order(run, list(dict.fromkeys(layer for layer, _ in figures)))
    has = {layer: [k for k in kinds if (layer, k) in figures] for layer in layers}
    layer_options = "".join(
        f"<option value='{html.escape(n, quote=True)}' data-kinds='{' '.join(has[n])}'>"
        f"{html.escape(n)}</option>"
        for n in layers
    )
    kind_options = "".join(
        f"<option value='{k}'>{html.escape(KIND_NAMES.get(k, k))}</option>" for k in kinds
    )
    return f"""<h2>Histograms over steps</h2>
<p class='note'>Each image: steps across, the histogram's bins (powers of two of |x|) upwards,
colour log10(1 + count); mirrored below the axis for negative values where the run records
signs. Shown: the layers the events name and the worst layers, for each kind recorded
({", ".join(html.escape(KIND_NAMES.get(k, k)) for k in kinds)}).</p>
<div class='grid'>{grid}</div>
<h3>Any layer</h3>
<p class='pick'><label>layer <select id='hist-layer'>{layer_options}</select></label>
<label>kind <select id='hist-kind'>{kind_options}</select></label>
({len(layers)} layers, {len(figures)} histograms)</p>
<div id='hist-view'></div>
<template id='hist-store'>{"".join(figures.values())}</template>"""


def _lr_probe_plot(report: PreflightReport) -> str | None:
    """Loss after the probe's few steps against the LR, the user's LR marked."""
    import matplotlib.pyplot as plt

    found = [f for f in report.of_kind("lr_sanity") if "lrs" in f.evidence]
    if not found:
        return None
    ev = found[0].evidence
    lrs = np.asarray(ev["lrs"], dtype=float)
    # Diverged points are stored as null (JSON has no inf): marked on the top edge.
    losses = np.asarray([np.nan if v is None else v for v in ev["losses"]], dtype=float)
    ok = np.isfinite(losses)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(lrs[ok], losses[ok], "o-", color="#37474f", label=f"loss after {ev['steps']} steps")
    ax.axhline(ev["start"], color="#9e9e9e", ls=":", label="initial loss")
    ax.axvline(ev["user_lr"], color="#c62828", ls="--", label="your LR")
    if (losses[ok] > 0).all() and ev["start"] > 0:
        ax.set_yscale("log")
    if not ok.all():
        top = ax.get_ylim()[1]
        ax.plot(lrs[~ok], np.full((~ok).sum(), top), "x", color="#c62828", label="diverged")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("LR probe on one batch")
    return _png(fig)


def _preflight_section(report: PreflightReport | None) -> str:
    if report is None:
        return ""
    plot = _lr_probe_plot(report)
    image = f"<img alt='LR probe' src='data:image/png;base64,{plot}'>" if plot else ""
    table = _table(report.rows(), PREFLIGHT_COLUMNS)
    return f"<h2>{html.escape(report.title())}</h2>{table}{image}"


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def check_layer_names(names: Sequence[str], known: set[str]) -> None:
    """``ValueError`` naming every unknown layer with the closest known names."""
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ValueError(
        f"no layer {', '.join(hints)} in this run; it has {len(known)} layers, e.g. "
        f"{', '.join(sorted(known)[:5])}"
    )


def write_report(
    run: Run,
    events: Sequence[Event],
    out: str | Path,
    *,
    layers: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    arrays: tuple | None = None,
) -> Path:
    """Writes the HTML report for ``run`` to ``out`` and returns its path. ``arrays`` is
    ``series_from_run(run)`` when the caller already has it. A pre-flight report stored in
    the run directory is shown first."""
    import matplotlib

    matplotlib.use("Agg")
    say = progress or (lambda _: None)
    step, loss, lr, series = arrays if arrays is not None else series_from_run(run)
    layer_names = {key.split("/", 1)[1] for key in series if "/" in key}
    if layers:
        check_layer_names(layers, layer_names)
    preflight = _preflight_section(PreflightReport.load(run.path))
    say("loss curve")
    loss_chart = _loss_chart(step, loss, lr, events, "loss")
    # Curve events first, then layer findings from the most severe down.
    ordered = sorted(
        events,
        key=lambda e: (e.kind not in CURVE_KINDS, -SEVERITIES.index(e.severity), e.step),
    )
    worst = worst_layers(series, events=events)
    featured = featured_layers(worst, ordered, first=layers or ())
    say("layer norms")
    norm_chart = _norm_chart(step, series, featured) or ""
    heatmaps = []
    for metric, (title, *_) in HEATMAPS.items():
        say(title)
        heatmaps.append(_heatmap_section(step, series, metric))
    say("histograms")
    histograms = _histogram_section(run, featured)
    title = html.escape(f"torchvitals report: {run.path}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{STYLE}</style></head><body>
<h1>{title}</h1>
<p>{len(step)} steps, {len(layer_names)} layers, ranks {html.escape(str(run.ranks))}.
What every section shows: docs/report.md in the torchvitals repository.</p>
{preflight}
<h2>Loss and learning rate</h2>{loss_chart}
<h2>Events</h2>{_table(event_rows(ordered), EVENT_COLUMNS)}
<h2>Worst layers</h2>{_table(worst, WORST_COLUMNS)}
<p class='note'>score: the highest dead, saturated and large fractions added, plus 10 if
the layer had a NaN or inf, plus 0.2 per decade that its gradient norm spanned
(grad_norm_range: log10 of its largest over its smallest positive gradient norm).</p>
{"<h2>Gradient norm of the featured layers</h2>" + norm_chart if norm_chart else ""}
{"".join(heatmaps)}
{histograms}
<script>{SCRIPT}</script>
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, page.encode("utf-8"))  # never through a link at ``out``
    return out


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em;
  max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
p.note, p.none, figcaption { color: #555; font-size: 0.9em; }
figure { margin: 0.5em 0 1.5em; }
figure.chart svg { width: 100%; height: auto; display: block; }
figure.raster { display: grid; grid-template-columns: minmax(6em, max-content) 1fr;
  column-gap: 6px; align-items: start; }
figure.raster .rows { font-size: 11px; text-align: right; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; max-width: 22em; }
figure.raster .cell { position: relative; min-width: 0; }
figure.raster .cell img { width: 100%; display: block; image-rendering: pixelated;
  outline: 1px solid #ccc; }
figure.raster .ticks { position: relative; font-size: 10px; text-align: right; min-width: 4.5em;
  height: 100%; }
figure.raster .ticks span { position: absolute; right: 0; transform: translateY(-50%); }
.xaxis { position: relative; height: 1.2em; font-size: 10px; color: #555; }
.xaxis span { position: absolute; transform: translateX(-50%); }
.xlabel { text-align: center; font-size: 11px; color: #555; }
.cbar { grid-column: 2; display: flex; align-items: center; gap: 6px; font-size: 11px;
  color: #555; }
.cbar i { display: inline-block; width: 160px; height: 10px; outline: 1px solid #ccc; }
.groups { display: flex; flex-wrap: wrap; gap: 2px 14px; margin-bottom: 1.5em; }
details.group summary { cursor: pointer; font-size: 0.85em; }
details.group[open] { flex-basis: 100%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
.hist .cap { font-size: 0.85em; font-weight: 600; overflow-wrap: anywhere; }
.cbar-label { white-space: nowrap; }
"""
