"""torchvitals: every-step training telemetry for PyTorch."""

from torchvitals.analysis import Event, detect_events
from torchvitals.histogram import HistLayout, hist_edges
from torchvitals.monitor import Monitor
from torchvitals.ops import tensor_stats
from torchvitals.run import Run, load_run

__version__ = "0.1.0"

__all__ = [
    "Event",
    "HistLayout",
    "Monitor",
    "Run",
    "__version__",
    "detect_events",
    "hist_edges",
    "load_run",
    "tensor_stats",
]
