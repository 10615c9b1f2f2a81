"""Observability: JSON logs, loop counters, the stats stream and its live view (`top`), GPU readings."""
