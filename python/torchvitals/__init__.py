"""torchvitals: every-step training telemetry for PyTorch."""

from torchvitals.histogram import HistLayout, hist_edges
from torchvitals.ops import tensor_stats

__version__ = "0.1.0"

__all__ = ["HistLayout", "__version__", "hist_edges", "tensor_stats"]
