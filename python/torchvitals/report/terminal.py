"""The terminal summary of a run: events and worst layers as rich tables, and the
pre-flight checks when the run has them.

Readable at 80 columns: each row says what happened in one short line (the first clause
of its message), the columns that hold one word never wrap, and ``verbose`` prints every
event's full cause and attribution under the table. The HTML report has everything."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from torchvitals.analysis import Event
from torchvitals.analysis.events import CURVE_KINDS
from torchvitals.analysis.summary import attribution_text, worst_layers
from torchvitals.preflight.report import PreflightReport

SEVERITY_STYLE = {"info": "dim", "warning": "yellow", "critical": "bold red"}
# Fractions shown for a layer, in this order: (worst_layers key, label).
_LAYER_MEASURES = (
    ("max_dead_frac", "dead"),
    ("max_sat_frac", "saturated"),
    ("max_large_frac", "large"),
)


def headline(text: str) -> str:
    """The first clause of a message: up to its first ``;``, or ``(`` that opens details."""
    head = re.split(r";|\s\(", text, maxsplit=1)[0].strip()
    return head.rstrip(":,")


def _table(title: str, columns: Sequence[tuple[str, bool]]) -> Table:
    """A table whose ``(name, one_word)`` columns either never wrap (and never break their
    header mid-word) or take the room that is left, folding at word boundaries."""
    table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
    for name, one_word in columns:
        if one_word:
            table.add_column(name, no_wrap=True, min_width=len(name))
        else:
            table.add_column(name, overflow="fold", ratio=1, min_width=12)
    return table


def _steps(event: Event) -> str:
    if event.step is None:
        return ""
    if event.end_step is None or event.end_step == event.step:
        return str(event.step)
    return f"{event.step}-{event.end_step}"


def print_preflight(report: PreflightReport, console: Console | None = None) -> None:
    """The pre-flight findings as one table, the most severe first."""
    console = console or Console()
    table = _table(report.title(), [("severity", True), ("check", True), ("finding", False)])
    for row in report.rows():
        where = f"{row['layer']}: " if row["layer"] else ""
        table.add_row(
            row["severity"],
            row["kind"],
            where + row["message"],
            style=SEVERITY_STYLE.get(row["severity"]),
        )
    console.print(table)


def print_events(events: Sequence[Event], console: Console, *, verbose: bool = False) -> None:
    # Curve events always; layer findings only when they warn: info ones are in the report.
    shown = [e for e in events if e.kind in CURVE_KINDS or e.severity != "info"]
    title = f"{len(shown)} of {len(events)} events (info-level layer findings: see the report)"
    table = _table(title, [("severity", True), ("kind", True), ("steps", True), ("what", False)])
    for event in shown:
        table.add_row(
            event.severity,
            event.kind,
            _steps(event),
            headline(event.cause),
            style=SEVERITY_STYLE[event.severity],
        )
    console.print(table)
    if not verbose:
        if shown:
            console.print("[dim]full causes and attributions: --verbose, or the HTML report[/dim]")
        return
    for event in shown:
        console.print(f"[bold]{event.kind}[/bold] at step {_steps(event)}: {event.cause}")
        attribution = attribution_text(event)
        if attribution:
            console.print(f"  attribution: {attribution}")


def print_worst_layers(
    series: dict[str, np.ndarray], events: Sequence[Event], console: Console
) -> None:
    columns = [("layer", False), ("severity", True), ("findings", False), ("at worst", False)]
    table = _table("Worst layers", columns)
    for row in worst_layers(series, events=events):
        measures = [
            f"{label} {row[key]:.0%}" for key, label in _LAYER_MEASURES if row.get(key) is not None
        ]
        if row.get("nonfinite"):
            measures.append(f"{int(row['nonfinite'])} non-finite")
        if row.get("grad_norm_range") is not None:
            measures.append(f"grad norm spans 10^{row['grad_norm_range']:.1f}")
        severity = str(row.get("severity") or "")
        table.add_row(
            str(row["layer"]),
            severity,
            str(row.get("findings") or ""),
            ", ".join(measures),
            style=SEVERITY_STYLE.get(severity),
        )
    console.print(table)


def print_summary(
    events: Sequence[Event],
    series: dict[str, np.ndarray],
    console: Console | None = None,
    *,
    preflight: PreflightReport | None = None,
    verbose: bool = False,
) -> None:
    """Events and worst layers; the run's pre-flight checks first when it has them."""
    console = console or Console()
    if preflight is not None:
        print_preflight(preflight, console)
    print_events(events, console, verbose=verbose)
    print_worst_layers(series, events, console)
