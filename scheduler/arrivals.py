"""How soon the next request is expected: the input that tells the time window whether waiting pays.

The time window holds an idle engine so that requests arriving close together start as one
microbatch. Holding a request that nobody follows only adds latency: a lone request on a quiet
worker would always wait the whole window. So the window holds only while the recent arrival gap
says another request is due before the window ends; after a quiet spell the first request starts
at once, and the requests right behind it join the running batch at the next step (continuous
batching), while under a steady stream the gap is short and the window fills microbatches.

The estimate is an exponentially weighted mean of the gaps between arrivals (simultaneous
arrivals, e.g. a backlog read in one call, are gaps of zero), and a quiet spell longer than the
mean counts as a gap of its own length, so one burst long ago does not keep the window holding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ArrivalGap:
    """Exponentially weighted mean gap between arrivals, on the caller's monotonic clock."""

    weight: float = 0.2  # of the newest gap in the mean
    mean_gap_s: float | None = None
    last_arrival_s: float | None = None

    def observe(self, arrival_s: float) -> None:
        """Record an arrival (times may repeat; they must not go backwards by more than clock noise)."""
        if self.last_arrival_s is not None:
            gap = max(0.0, arrival_s - self.last_arrival_s)
            self.mean_gap_s = gap if self.mean_gap_s is None else (
                self.weight * gap + (1.0 - self.weight) * self.mean_gap_s
            )  # fmt: skip
        self.last_arrival_s = (
            arrival_s if self.last_arrival_s is None else max(self.last_arrival_s, arrival_s)
        )

    def next_arrival_s(self, now: float) -> float | None:
        """When the next request is expected; None before two arrivals have been seen (no estimate).

        If the expected time has already passed, the silence since the last arrival is itself a gap
        longer than the mean: the next arrival is then expected one such silence from now.
        """
        if self.mean_gap_s is None or self.last_arrival_s is None:
            return None
        expected = self.last_arrival_s + self.mean_gap_s
        if expected >= now:
            return expected
        return now + (now - self.last_arrival_s)
