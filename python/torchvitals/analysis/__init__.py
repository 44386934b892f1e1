"""Offline analysis of training runs: loss-curve events, layer findings, attribution."""

from .detect import detect_events
from .events import Event

__all__ = ["Event", "detect_events"]
