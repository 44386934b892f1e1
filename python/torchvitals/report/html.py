"""A self-contained HTML report of a run: loss and LR with event markers, per-layer
heatmaps over steps, histogram evolution, and the events and worst layers as tables; the
pre-flight checks first when the run has them (``preflight.json``).

Plots are rendered with matplotlib (Agg) and embedded as base64 PNG, so the file opens
in any browser with no network and no other files. Every name that came from the run
(layers, causes) is HTML-escaped. What the tables and the histogram plots show comes
from :mod:`torchvitals.analysis.summary`; this module only renders it.
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
from torchvitals.analysis.runtables import series_from_run
from torchvitals.analysis.summary import (
    EVENT_COLUMNS,
    WORST_COLUMNS,
    event_rows,
    histogram_layers,
    histogram_matrix,
    worst_layers,
)
from torchvitals.engine.histogram import hist_edges
from torchvitals.preflight.report import COLUMNS as PREFLIGHT_COLUMNS
from torchvitals.preflight.report import PreflightReport
from torchvitals.store.layout import write_file_atomic
from torchvitals.store.reader import Run

MAX_COLUMNS = 800  # steps per heatmap column budget: long runs are block-averaged
MAX_HEATMAP_LAYERS = 60
EVENT_COLORS = {
    "plateau": "#9e9e9e",
    "kick_in": "#2e7d32",
    "lr_drop": "#1565c0",
    "divergence": "#c62828",
    "spike": "#ef6c00",
    "nonfinite": "#6a1b9a",
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _block_mean(matrix: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Averages columns in blocks so that at most MAX_COLUMNS remain (NaN-aware)."""
    n = matrix.shape[1]
    if n <= MAX_COLUMNS:
        return matrix, steps
    starts = np.linspace(0, n, MAX_COLUMNS + 1).astype(int)[:-1]
    finite = np.isfinite(matrix)
    sums = np.add.reduceat(np.where(finite, matrix, 0.0), starts, axis=1)
    counts = np.add.reduceat(finite, starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts, steps[starts]  # 0/0 leaves NaN where a block had no value


def _loss_plot(step, loss, lr, events: Sequence[Event], metric: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    finite = np.isfinite(loss)
    ax.plot(step[finite], loss[finite], lw=0.8, color="#37474f", label=metric)
    if finite.any() and np.nanmin(loss[finite]) > 0:
        ax.set_yscale("log")
    for ev in events:
        color = EVENT_COLORS.get(ev.kind)
        if color is None or ev.step is None:
            continue
        end = ev.end_step if ev.end_step is not None else ev.step
        if end > ev.step:
            ax.axvspan(ev.step, end, color=color, alpha=0.15)
        ax.axvline(ev.step, color=color, lw=1.2, ls="--")
        ax.text(ev.step, 1.0, ev.kind, transform=ax.get_xaxis_transform(), rotation=90,
                va="top", ha="right", fontsize=8, color=color)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if lr is not None and np.isfinite(lr).any():
        ax2 = ax.twinx()
        ax2.plot(step, lr, color="#1565c0", lw=1.0, alpha=0.7)
        ax2.set_ylabel("learning rate", color="#1565c0")
    ax.set_title(f"{metric} and learning rate, with detected events")
    return _png(fig)


def _heatmap(step, series: dict[str, np.ndarray], metric: str, title: str, log: bool) -> str | None:
    import matplotlib.pyplot as plt

    rows = [(k.split("/", 1)[1], v) for k, v in series.items() if k.startswith(metric + "/")]
    rows = [(name, v) for name, v in rows if np.isfinite(v).any()]
    if not rows:
        return None
    rows = rows[:MAX_HEATMAP_LAYERS]
    matrix = np.stack([v for _, v in rows])
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            matrix = np.log10(np.where(matrix > 0, matrix, np.nan))
    matrix, cols = _block_mean(matrix, step)
    fig, ax = plt.subplots(figsize=(11, 0.25 * len(rows) + 1.5))
    extent = (float(cols[0]), float(cols[-1]) + 1, len(rows) - 0.5, -0.5)
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma", extent=extent)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([name for name, _ in rows], fontsize=7, parse_math=False)  # literal $
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=("log10 " if log else "") + metric)
    return _png(fig)


def _histogram_plot(run: Run, layer: str, kind: str) -> str | None:
    import matplotlib.pyplot as plt

    found = histogram_matrix(run, layer, kind)
    if found is None:
        return None
    steps, counts = found
    labels = hist_edges().labels
    used = np.flatnonzero(counts.sum(axis=1) > 0)
    lo, hi = used.min(), used.max()
    matrix, cols = _block_mean(np.log10(1 + counts[lo : hi + 1]), steps)
    fig, ax = plt.subplots(figsize=(11, 3.2))
    extent = (float(cols[0]), float(cols[-1]) + 1, lo - 0.5, hi + 0.5)
    im = ax.imshow(matrix, aspect="auto", origin="lower", cmap="viridis", extent=extent)
    ticks = range(lo, hi + 1, max(1, (hi - lo) // 12))
    ax.set_yticks(list(ticks))
    ax.set_yticklabels([labels[t] for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("|x| bin")
    ax.set_title(f"histogram of log2|{kind}| for {layer}", parse_math=False)  # names as written
    fig.colorbar(im, ax=ax, label="log10(1 + count)")
    return _png(fig)


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
    if layers:
        check_layer_names(layers, {key.split("/", 1)[1] for key in series if "/" in key})
    preflight = _preflight_section(PreflightReport.load(run.path))
    sections = []
    say("loss curve")
    sections.append(("Loss and learning rate", _loss_plot(step, loss, lr, events, "loss")))
    for metric, title, log in (
        ("grad_norm", "Gradient norm per layer", True),
        ("dead_frac", "Dead-unit fraction per layer", False),
        ("sat_frac", "Saturation fraction per layer", False),
    ):
        say(title)
        sections.append((title, _heatmap(step, series, metric, title, log)))
    for layer in layers or histogram_layers(run, series):
        say(f"histogram {layer}")
        sections.append((f"Histogram evolution: {layer}", _histogram_plot(run, layer, "grad")))

    loss_figure, *figures = [
        f"<h2>{html.escape(title)}</h2>"
        f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
        for title, png in sections
        if png is not None
    ]
    # Curve events first, then layer findings from the most severe down.
    ordered = sorted(
        events,
        key=lambda e: (e.kind not in CURVE_KINDS, -SEVERITIES.index(e.severity), e.step),
    )
    event_table = _table(event_rows(ordered), EVENT_COLUMNS)
    worst = worst_layers(series, events=events)
    worst_columns = WORST_COLUMNS
    title = html.escape(f"torchvitals report: {run.path}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{len(step)} steps, {len({k.split("/", 1)[1] for k in series if "/" in k})} layers,
ranks {html.escape(str(run.ranks))}.</p>
{preflight}
{loss_figure}
<h2>Events</h2>{event_table}
<h2>Worst layers</h2>{_table(worst, worst_columns)}
{"".join(figures)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, page.encode("utf-8"))  # never through a link at ``out``
    return out
