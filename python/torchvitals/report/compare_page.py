"""``torchvitals compare``: a :class:`~torchvitals.analysis.compare.Comparison` as a
self-contained HTML page (the metric curves overlaid, the layers that differ most, events
side by side) and as terminal tables readable at 80 columns.

Runs are lettered A, B, ... (A is the baseline) so that the terminal tables stay narrow;
the runs table says which directory each letter is. The plots and tables come from the
comparison; this module computes nothing of its own. Plots use the helpers of
:mod:`torchvitals.report.html` (matplotlib, Agg, base64 PNG, names HTML-escaped).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from torchvitals.analysis.compare import Comparison, LayerDifference, PairComparison, RunData
from torchvitals.report.html import _png, _table
from torchvitals.report.terminal import SEVERITY_STYLE, headline
from torchvitals.report.terminal import _table as _term_table
from torchvitals.store.layout import write_file_atomic

#: Layers per pair in the tables, and layers per pair plotted.
TOP_LAYERS = 8
PLOTTED_LAYERS = 3
_COLORS = ("#37474f", "#c62828", "#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a")
_MEASURE_LABEL = {"grad_norm": "grad norm", "dead_frac": "dead", "sat_frac": "saturated"}


def letter(i: int) -> str:
    """A, B, ..., Z, then A2, B2, ..."""
    return chr(ord("A") + i % 26) + (str(i // 26 + 1) if i >= 26 else "")


def _onset(step: int | None) -> str:
    return "never" if step is None else str(step)


def layer_row(row: LayerDifference) -> dict[str, str]:
    """One layer's differences as text: decades of gradient norm, fractions."""
    d = row.distances
    return {
        "layer": row.layer,
        "score": f"{row.score:.2f}",
        "grad norm (decades)": f"{d['grad_norm']:.2f}" if "grad_norm" in d else "",
        "dead": f"{d['dead_frac']:.0%}" if "dead_frac" in d else "",
        "saturated": f"{d['sat_frac']:.0%}" if "sat_frac" in d else "",
        "diverges at": _onset(row.first_divergence),
        "in": ", ".join(_MEASURE_LABEL[m] for m in row.diverged),
    }


LAYER_COLUMNS = ["layer", "score", "grad norm (decades)", "dead", "saturated", "diverges at", "in"]


# ---------------------------------------------------------------------------- terminal
def print_comparison(
    comparison: Comparison, runs: Sequence[RunData], paths: Sequence[str], console: Console
) -> None:
    """The runs, where each parts from the baseline, the layers that differ most and the
    events side by side; every column that holds one word never wraps."""
    table = _term_table("Runs", [("run", True), ("steps", True), ("directory", False)])
    for i, (run, path) in enumerate(zip(runs, paths, strict=True)):
        table.add_row(letter(i) + (" (baseline)" if i == 0 else ""), str(run.step.size), path)
    console.print(table)

    title = f"Where {comparison.metric} parts from A"
    table = _term_table(title, [("run", True), ("common steps", True), ("diverges at", True)])
    for i, pair in enumerate(comparison.pairs, start=1):
        table.add_row(letter(i), str(pair.common_steps), _onset(pair.first_divergence))
    console.print(table)

    for i, pair in enumerate(comparison.pairs, start=1):
        columns = [("layer", False), ("score", True), ("grad", True), ("dead", True)]
        columns += [("sat", True), ("diverges", True)]
        table = _term_table(f"Layers that differ most, {letter(i)} against A", columns)
        for row in pair.layers[:TOP_LAYERS]:
            text = layer_row(row)
            table.add_row(
                row.layer,
                text["score"],
                text["grad norm (decades)"],
                text["dead"],
                text["saturated"],
                text["diverges at"] + (f" ({text['in']})" if text["in"] else ""),
            )
        console.print(table)
        for side, names in (("A", pair.only_in_baseline), (letter(i), pair.only_in_other)):
            if names:
                shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
                console.print(f"[dim]only in {side}: {len(names)} layer(s): {shown}[/dim]")
    console.print(
        "[dim]grad: mean |Δ log10 grad norm| (decades); dead, sat: mean |Δ fraction|[/dim]"
    )

    columns = [("kind", True)] + [(letter(i), True) for i in range(len(runs))] + [("what", False)]
    table = _term_table("Events side by side (step in each run)", columns)
    for row in comparison.events:
        first = next(e for e in row.events if e is not None)
        worst = max((e for e in row.events if e is not None), key=_severity_rank)
        cells = [str(e.step) if e is not None else "-" for e in row.events]
        table.add_row(
            row.kind, *cells, headline(first.cause), style=SEVERITY_STYLE.get(worst.severity)
        )
    console.print(table)


def _severity_rank(event) -> int:
    return ("info", "warning", "critical").index(event.severity)


# ---------------------------------------------------------------------------- HTML
def _curves_plot(
    runs: Sequence[RunData], comparison: Comparison, label: str, key: str | None, title: str
) -> str | None:
    """Each run's metric (``key`` None) or series ``key``, overlaid, with each pair's first
    divergence marked in the colour of the run that parts."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.6))
    positive, drawn = True, False
    for i, run in enumerate(runs):
        values = run.values if key is None else run.series.get(key)
        if values is None:
            continue
        ok = np.isfinite(values)
        if not ok.any():
            continue
        positive &= bool((values[ok] > 0).all())
        color = _COLORS[i % len(_COLORS)]
        name = f"{letter(i)}: {run.name}".replace("$", r"\$")  # a path is no math
        ax.plot(run.step[ok], values[ok], lw=0.8, color=color, label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if positive:
        ax.set_yscale("log")
    for i, onset in _onsets(comparison, key):
        color = _COLORS[i % len(_COLORS)]
        ax.axvline(onset, color=color, lw=1.2, ls="--")
        ax.text(onset, 1.0, f"{letter(i)} parts", transform=ax.get_xaxis_transform(),
                rotation=90, va="top", ha="right", fontsize=8, color=color)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(label, parse_math=False)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, parse_math=False)  # layer names as written
    return _png(fig)


def _onsets(comparison: Comparison, key: str | None) -> list[tuple[int, int]]:
    """(run index, first divergence) of each pair, for the metric or a layer series."""
    out = []
    for i, pair in enumerate(comparison.pairs, start=1):
        if key is None:
            onset = pair.first_divergence
        else:
            row = next((r for r in pair.layers if r.layer == key.partition("/")[2]), None)
            onset = row.first_divergence if row is not None else None
        if onset is not None:
            out.append((i, onset))
    return out


def _img(title: str, png: str | None) -> str:
    if png is None:
        return ""
    return f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"


def _pair_section(i: int, pair: PairComparison, runs: Sequence[RunData], comparison) -> str:
    rows = [layer_row(r) for r in pair.layers[:TOP_LAYERS]]
    parts = [
        f"<h2>Layers that differ most: {letter(i)} against A</h2>",
        f"<p>{pair.common_steps} common steps; {html.escape(comparison.metric)} diverges at "
        f"{_onset(pair.first_divergence)} (noise band {pair.band:.3g}"
        f"{' decades' if pair.log else ''}).</p>",
        _table(rows, LAYER_COLUMNS),
    ]
    for side, names in (("A", pair.only_in_baseline), (letter(i), pair.only_in_other)):
        if names:
            parts.append(f"<p>Only in {side}: {html.escape(', '.join(names))}</p>")
    for row in pair.layers[:PLOTTED_LAYERS]:
        measure = row.diverged[0] if row.diverged else max(row.distances, key=row.distances.get)
        title = f"{_MEASURE_LABEL[measure]} of {row.layer}"
        parts.append(f"<h3>{html.escape(title)}</h3>")
        key = f"{measure}/{row.layer}"
        plot = _curves_plot(runs, comparison, _MEASURE_LABEL[measure], key, f"{title}, all runs")
        parts.append(_img(title, plot))
    return "".join(parts)


def write_compare_page(
    comparison: Comparison, runs: Sequence[RunData], paths: Sequence[str], out: str | Path
) -> Path:
    """Writes the comparison page to ``out`` (atomically, never through a link)."""
    import matplotlib

    matplotlib.use("Agg")
    run_rows = [
        {"run": letter(i), "directory": path, "steps": run.step.size, "events": len(run.events)}
        for i, (run, path) in enumerate(zip(runs, paths, strict=True))
    ]
    metric = comparison.metric
    divergence = [
        {
            "run": letter(i),
            "common steps": pair.common_steps,
            "diverges at": _onset(pair.first_divergence),
            "noise band": f"{pair.band:.3g}" + (" decades" if pair.log else ""),
        }
        for i, pair in enumerate(comparison.pairs, start=1)
    ]
    event_rows = []
    for row in comparison.events:
        cells = {
            letter(i): f"{e.step} ({e.severity}): {headline(e.cause)}" if e else ""
            for i, e in enumerate(row.events)
        }
        event_rows.append({"kind": row.kind, **cells})
    event_columns = ["kind"] + [letter(i) for i in range(len(runs))]
    curves = _curves_plot(runs, comparison, metric, None, f"{metric}, all runs")
    title = html.escape(f"torchvitals compare: {', '.join(paths)}")
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
{_table(run_rows, ["run", "directory", "steps", "events"])}
<h2>{html.escape(metric)}: where the runs part from A</h2>
{_table(divergence, ["run", "common steps", "diverges at", "noise band"])}
{_img(metric, curves)}
{"".join(_pair_section(i, p, runs, comparison) for i, p in enumerate(comparison.pairs, 1))}
<h2>Events side by side</h2>
{_table(event_rows, event_columns)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, page.encode("utf-8"))
    return out
