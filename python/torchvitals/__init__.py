"""torchvitals: every-step training telemetry for PyTorch."""

from torchvitals.analysis import Event, detect_events
from torchvitals.histogram import HistLayout, hist_edges
from torchvitals.merge import MissingRanksWarning, merge_ranks, rank_coverage
from torchvitals.monitor import Monitor
from torchvitals.ops import tensor_stats
from torchvitals.run import Run, SchemaVersionError, SegmentRecovery, load_run
from torchvitals.schema import SCHEMA_VERSION
from torchvitals.writer import RunWriter

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "Event",
    "HistLayout",
    "MissingRanksWarning",
    "Monitor",
    "Run",
    "RunWriter",
    "SchemaVersionError",
    "SegmentRecovery",
    "__version__",
    "detect_events",
    "hist_edges",
    "load_run",
    "merge_ranks",
    "rank_coverage",
    "tensor_stats",
]
