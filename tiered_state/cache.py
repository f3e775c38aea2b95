"""The optional in-process cache in front of every tier (:class:`LocalCache`, off by default).

It holds resolved records for a short ``ttl``: this process's own writes
invalidate it at once, other processes' writes are seen after at most ``ttl``
seconds. That bounded staleness is the price of skipping even HOT's round
trip, which is why it is opt-in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigurationError
from .policy import Seconds, seconds, seconds_of
from .record import Entry, Tier

__all__ = ["LocalCache"]


@dataclass(frozen=True)
class LocalCache:
    """The optional in-process cache in front of every tier (off by default).

    It holds decoded-on-read payloads for ``ttl`` seconds. This process's own
    writes and deletes invalidate it at once; writes by *other* processes are
    seen after at most ``ttl`` seconds -- that is its staleness bound, so keep
    ``ttl`` short, or leave the cache off where several processes write.

    >>> from tiered_state import LocalCache
    >>> bot = tiered_state.open(folder / "bot", cache=LocalCache(max_items=10_000, ttl=0.5))
    >>> version = bot.set("position:BTC", {"qty": 1.5})
    >>> bot.get("position:BTC")  # fills the cache: for 0.5 s, reads skip every tier
    {'qty': 1.5}
    >>> version = bot.set("position:BTC", {"qty": 2.0})  # this process's write: seen at once
    >>> bot.get("position:BTC")
    {'qty': 2.0}
    >>> bot.close()

    :param max_items: most entries kept (least recently used evicted).
    :param max_bytes: most payload bytes kept.
    :param ttl: seconds an entry is trusted (or a :class:`datetime.timedelta`).
    """

    max_items: int = 1024
    max_bytes: int | None = 16 * 1024 * 1024
    ttl: Seconds = 1.0

    def __post_init__(self) -> None:
        if self.max_items < 1 or (self.max_bytes is not None and self.max_bytes < 1):
            raise ConfigurationError("LocalCache limits must be positive")
        object.__setattr__(self, "ttl", seconds("LocalCache ttl", self.ttl))


class CacheStore:
    """The LocalCache store: key -> (entry, tier, trusted until)."""

    def __init__(self, options: LocalCache) -> None:
        self.options = options
        self._data: OrderedDict[str, tuple[Entry, Tier, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[Entry, Tier] | None:
        now = time.monotonic()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[2] <= now or item[0].expired():
                self._drop(key)
                return None
            self._data.move_to_end(key)
            return item[0], item[1]

    def put(self, entry: Entry, tier: Tier) -> None:
        with self._lock:
            self._drop(entry.key)
            self._data[entry.key] = (entry, tier, time.monotonic() + seconds_of(self.options.ttl))
            self._bytes += entry.metadata["size_bytes"]
            limit_items, limit_bytes = self.options.max_items, self.options.max_bytes
            while self._data and (
                len(self._data) > limit_items
                or (limit_bytes is not None and self._bytes > limit_bytes)
            ):
                _, (old, _, _) = self._data.popitem(last=False)
                self._bytes -= old.metadata["size_bytes"]

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._bytes -= item[0].metadata["size_bytes"]

    def discard(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
