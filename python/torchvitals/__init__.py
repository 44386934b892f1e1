"""torchvitals: every-step training telemetry for PyTorch."""

from torchvitals.analysis import Event, detect_events
from torchvitals.collect.monitor import Monitor
from torchvitals.engine.histogram import HistLayout, hist_edges
from torchvitals.engine.op import tensor_stats
from torchvitals.preflight import Finding, PreflightReport, preflight
from torchvitals.store.merge import MissingRanksWarning, merge_ranks, rank_coverage
from torchvitals.store.reader import Run, SchemaVersionError, SegmentRecovery, load_run
from torchvitals.store.schema import SCHEMA_VERSION
from torchvitals.store.writer import RunWriter

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "Finding",
    "HistLayout",
    "MissingRanksWarning",
    "Monitor",
    "PreflightReport",
    "Run",
    "RunWriter",
    "SchemaVersionError",
    "SegmentRecovery",
    "__version__",
    "detect_events",
    "hist_edges",
    "load_run",
    "merge_ranks",
    "preflight",
    "rank_coverage",
    "tensor_stats",
]
