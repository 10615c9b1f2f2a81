"""A stand-in for Prometheus in the benchmarks: GET a worker's /metrics every second on a thread.

`queue_bench.py --metrics` and `service_bench.py --metrics-compare` run the worker with its metrics port
on and scraped by this, against the same path with the port off. Prometheus scrapes every 15-30 s in
practice, so one second is the harsher load.
"""

from __future__ import annotations

import threading
import urllib.request

SCRAPE_INTERVAL_S = 1.0


class Scraper:
    """Scrapes `http://127.0.0.1:<port>/metrics` until `stop()`, which returns the scrapes that succeeded."""

    def __init__(self, port: int, interval_s: float = SCRAPE_INTERVAL_S) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.scrapes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self._scrape()

    def _scrape(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                resp.read()
            self.scrapes += 1
        except OSError:
            pass  # not listening yet (the worker is loading)

    def stop(self) -> int:
        """Stop, with one last scrape (so a run shorter than the interval still checks the port)."""
        self._done.set()
        self._thread.join()
        self._scrape()
        return self.scrapes
