"""The terminal summary of a run: events and worst layers as rich tables, and the
pre-flight checks when the run has them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from torchvitals.analysis import Event
from torchvitals.analysis.events import CURVE_KINDS
from torchvitals.analysis.summary import EVENT_COLUMNS, WORST_COLUMNS, event_rows, worst_layers
from torchvitals.preflight.report import COLUMNS as PREFLIGHT_COLUMNS
from torchvitals.preflight.report import PreflightReport

SEVERITY_STYLE = {"info": "dim", "warning": "yellow", "critical": "bold red"}


def _rich_table(
    title: str, rows: list[dict[str, object]], columns: list[str], style_key=None
) -> Table:
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        style = SEVERITY_STYLE.get(str(r.get(style_key, ""))) if style_key else None
        table.add_row(*(str(r.get(c, "")) for c in columns), style=style)
    return table


def print_preflight(report: PreflightReport, console: Console | None = None) -> None:
    """The pre-flight findings as one table, the most severe first."""
    console = console or Console()
    console.print(_rich_table(report.title(), report.rows(), PREFLIGHT_COLUMNS, "severity"))


def print_summary(
    events: Sequence[Event],
    series: dict[str, np.ndarray],
    console: Console | None = None,
    *,
    preflight: PreflightReport | None = None,
) -> None:
    """Events and worst layers; the run's pre-flight checks first when it has them."""
    console = console or Console()
    if preflight is not None:
        print_preflight(preflight, console)
    # The attribution is in each cause already; the HTML report has it as a column.
    columns = [c for c in EVENT_COLUMNS if c != "attribution"]
    # Curve events always; layer findings only when they warn: info ones are in the report.
    shown = [e for e in events if e.kind in CURVE_KINDS or e.severity != "info"]
    title = f"{len(shown)} of {len(events)} events (info-level layer findings: see the report)"
    console.print(_rich_table(title, event_rows(shown), columns, "severity"))
    console.print(_rich_table("Worst layers", worst_layers(series), WORST_COLUMNS))
