"""What :func:`torchvitals.preflight` found: :class:`Finding` and :class:`PreflightReport`,
their JSON form (``{run}/preflight.json``) and the rows both reports render."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torchvitals.analysis.events import SEVERITIES, json_safe

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["COLUMNS", "KINDS", "Finding", "PreflightReport"]

#: The checks, in the order they run and are listed.
KINDS = (
    "initial_loss",
    "dead_at_init",
    "saturated_at_init",
    "gradient_check",
    "cannot_overfit",
    "no_gradient",
    "update_ratio",
    "lr_sanity",
)
#: Columns of :meth:`PreflightReport.rows`, the table both reports show.
COLUMNS = ["kind", "severity", "layer", "message"]
FORMAT_VERSION = 1


def short_list(names: list[str], limit: int = 4) -> str:
    """``"a, b, c and 5 more"``: layer lists in one-line messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class Finding:
    """One result of a check.

    Attributes:
        kind: the check, one of :data:`KINDS`.
        severity: ``"info"``, ``"warning"`` or ``"critical"``, as for analysis events.
        layer: the module (or parameter) the finding is about, ``None`` for the model.
        message: one line saying what was measured and what it points at.
        evidence: the measured numbers (plain floats, ints, strings and lists of them).
    """

    kind: str
    severity: str
    layer: str | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layer": self.layer,
            "message": self.message,
            "evidence": json_safe(self.evidence),
        }

    def __str__(self) -> str:
        where = f" [{self.layer}]" if self.layer else ""
        return f"{self.kind}{where} ({self.severity}): {self.message}"


@dataclass
class PreflightReport:
    """The findings of every check, what each check cost, and the settings it ran with."""

    findings: list[Finding]
    seconds: dict[str, float] = field(default_factory=dict)  #: wall time per check, "total"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def worst(self) -> str:
        """The highest severity among the findings (``"info"`` when there are none)."""
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="info")

    @property
    def ok(self) -> bool:
        """Nothing above info."""
        return self.worst == "info"

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def rows(self) -> list[dict[str, str]]:
        """One row per finding (columns :data:`COLUMNS`), the most severe first, then in
        the order the checks run."""
        ordered = sorted(
            self.findings, key=lambda f: (-SEVERITIES.index(f.severity), KINDS.index(f.kind))
        )
        return [
            {"kind": f.kind, "severity": f.severity, "layer": f.layer or "", "message": f.message}
            for f in ordered
        ]

    def title(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        total = self.seconds.get("total")
        took = f" in {total:.1f} s" if total is not None else ""
        return (
            f"Pre-flight checks{took}: {counts['critical']} critical, "
            f"{counts['warning']} warning(s), {counts['info']} info"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "findings": [f.to_dict() for f in self.findings],
            "seconds": json_safe(self.seconds),
            "settings": json_safe(self.settings),
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> PreflightReport:
        """The inverse of :meth:`to_dict` (a ``ValueError`` names what is malformed)."""
        try:
            findings = [Finding(**f) for f in obj["findings"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a pre-flight report: {exc!r}") from exc
        return cls(findings, dict(obj.get("seconds", {})), dict(obj.get("settings", {})))

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> PreflightReport | None:
        """The report stored in a run directory, or ``None`` when the run has none."""
        from torchvitals.store.preflight_file import read_preflight

        obj = read_preflight(run_dir)
        return None if obj is None else cls.from_dict(obj)

    def print(self, console: Console | None = None) -> None:
        """Prints the findings as a table in the terminal (rich)."""
        from torchvitals.report.terminal import print_preflight

        print_preflight(self, console)

    def __str__(self) -> str:
        lines = [self.title()]
        lines += [
            f"  {r['severity']:<8} {r['kind']:<17} {r['layer'] or '-':<16} {r['message']}"
            for r in self.rows()
        ]
        return "\n".join(lines)
