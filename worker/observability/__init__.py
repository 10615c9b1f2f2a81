"""Observability: JSON logs, the stats stream and its live view (`top`), GPU readings, loop phase times."""
