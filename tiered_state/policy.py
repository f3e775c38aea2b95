"""The tiering policy.

:class:`TieringPolicy` says how long a copy stays in HOT, where reads below HOT
are promoted to, when WARM records go COLD, how big the memory tier may grow
and how many records a sweep handles per batch. The sweep itself, and the
:class:`~tiered_state.sweep.SweepReport` it returns, live in :mod:`tiered_state.sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigurationError
from .record import Tier

__all__ = ["TieringPolicy"]


def _check_seconds(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds or None, not {value!r}")


@dataclass(frozen=True)
class TieringPolicy:
    """How records move between tiers.

    :param hot_ttl: seconds a copy stays in HOT after a write or promotion
        (None: until evicted or the record expires). Not the record's TTL.
    :param promote_to: where a read hit below HOT is copied (``"hot"``,
        ``"warm"``, or None for never). A promotion copies; the lower copy stays.
    :param cold_after: a sweep moves WARM records neither written nor read
        for this many seconds to COLD (None: never).
    :param hot_max_items: cap on the embedded memory tier's item count.
    :param hot_max_bytes: cap on the embedded memory tier's payload bytes.
    :param batch_size: records a sweep handles per batch (bounds its memory).
    :param purge_after: seconds a dead entry -- a delete's tombstone, an
        expired record -- stays in the catalog before a sweep purges it. While
        it stays it orders later writes of its key after it, so a write that
        was already under way when the key was deleted cannot land with an
        older version; writes that take longer than half of this start over
        with a new version. 0 purges at once (and gives that up).
    :param hot_trust_window: seconds a process serves copies from a shared
        HOT (Redis) after its last look at the catalog's write-around
        marker. A process that cannot reach Redis while others can writes
        around it: it records the marker and waits this long before its
        write commits, so no process serves an older copy afterwards. The
        trade: each process pays one catalog read per window while it reads
        from HOT, and each write made while Redis is unreachable pays up to
        this wait (once per outage per process, not per write, when writes
        keep coming).
    """

    hot_ttl: float | None = 3600
    promote_to: Tier | str | None = "hot"
    cold_after: float | None = 7 * 86400
    hot_max_items: int | None = None
    hot_max_bytes: int | None = None
    batch_size: int = 500
    purge_after: float = 300.0
    hot_trust_window: float = 0.1

    def __post_init__(self) -> None:
        _check_seconds("hot_ttl", self.hot_ttl)
        _check_seconds("hot_trust_window", self.hot_trust_window)
        if self.hot_trust_window is None:
            raise ConfigurationError("hot_trust_window must be a positive number of seconds")
        _check_seconds("cold_after", self.cold_after)
        if (isinstance(self.purge_after, bool) or not isinstance(self.purge_after, (int, float))
                or not self.purge_after >= 0):
            raise ConfigurationError(
                f"purge_after must be a number of seconds >= 0, not {self.purge_after!r}")
        if self.promote_to is not None:
            tier = Tier.parse(self.promote_to)
            if tier is Tier.COLD:
                raise ConfigurationError("promote_to must be 'hot', 'warm' or None")
            object.__setattr__(self, "promote_to", tier)
        for name in ("hot_max_items", "hot_max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, not {value!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, not {self.batch_size!r}")
