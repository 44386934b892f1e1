"""Pre-flight checks: can this model learn from this batch? Run before training."""

from .report import Finding, PreflightReport
from .run import preflight

__all__ = ["Finding", "PreflightReport", "preflight"]
