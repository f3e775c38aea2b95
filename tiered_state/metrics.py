"""Metrics collectors.

A collector has the method names of the ``statsd`` package's client
(``incr``, ``timing``, ``gauge``) plus ``histogram`` (sent as a StatsD timer),
so a ``statsd.StatsClient`` can be passed to ``open(metrics=...)`` directly.
``metrics=None`` (the default) records nothing and costs nothing: the manager
then does not wrap its repositories at all.

A collector must never raise into the caller: a metrics backend that is down
is not a reason for a state operation to fail.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

__all__ = ["InMemoryMetrics", "MetricsCollector", "NullMetrics"]


class MetricsCollector:
    """The interface; every method defaults to doing nothing."""

    def incr(self, stat: str, count: int = 1, rate: float = 1) -> None:
        """Add ``count`` to the counter ``stat``."""

    def timing(self, stat: str, delta: float, rate: float = 1) -> None:
        """Record a duration in milliseconds."""

    def gauge(self, stat: str, value: float, rate: float = 1, delta: bool = False) -> None:
        """Set (or, with ``delta``, adjust) a gauge."""

    def histogram(self, stat: str, value: float, rate: float = 1) -> None:
        """Record a distribution sample; StatsD has none, so it is a timer."""
        self.timing(stat, value, rate)

    def close(self) -> None:
        """Flush and release resources."""


class NullMetrics(MetricsCollector):
    """Records nothing."""


class InMemoryMetrics(MetricsCollector):
    """Keeps counters, gauges and timer samples in memory (tests, ``stats()``)."""

    def __init__(self, max_samples: int = 10_000) -> None:
        self.counters: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, float] = {}
        self.timers: dict[str, list[float]] = defaultdict(list)
        self._max_samples = max_samples
        self._lock = threading.Lock()

    def incr(self, stat: str, count: int = 1, rate: float = 1) -> None:
        with self._lock:
            self.counters[stat] += count

    def timing(self, stat: str, delta: float, rate: float = 1) -> None:
        with self._lock:
            samples = self.timers[stat]
            if len(samples) >= self._max_samples:
                del samples[: len(samples) // 2]
            samples.append(float(delta))

    def gauge(self, stat: str, value: float, rate: float = 1, delta: bool = False) -> None:
        with self._lock:
            self.gauges[stat] = self.gauges.get(stat, 0.0) + value if delta else value

    def snapshot(self) -> dict[str, Any]:
        """Counters, gauges and timer percentiles (p50/p95/p99) as plain data."""
        with self._lock:
            timers = {}
            for name, samples in self.timers.items():
                ordered = sorted(samples)
                n = len(ordered)
                timers[name] = {
                    "count": n,
                    "p50": ordered[int(0.50 * (n - 1))],
                    "p95": ordered[int(0.95 * (n - 1))],
                    "p99": ordered[int(0.99 * (n - 1))],
                }
            return {"counters": dict(self.counters), "gauges": dict(self.gauges), "timers": timers}
