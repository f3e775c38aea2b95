"""The tiering policy.

:class:`TieringPolicy` says how long a copy stays in HOT, where reads below HOT
are promoted to, when WARM records go COLD, how big the memory tier may grow
and how many records a sweep handles per batch. The sweep itself, and the
:class:`~tiered_state.sweep.SweepReport` it returns, live in :mod:`tiered_state.sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import overload

from .errors import ConfigurationError
from .record import Tier

__all__ = ["Seconds", "TieringPolicy", "seconds", "seconds_of"]

#: A duration: a number of seconds or a :class:`datetime.timedelta`.
Seconds = float | timedelta


def seconds(name: str, value: Seconds | None, *, zero: bool = False) -> float | None:
    """``value`` as float seconds (None stays None).

    :param zero: whether 0 is allowed (else the duration must be positive).
    :raises ConfigurationError: not a number or timedelta, negative, or not finite.
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{name} must be a number of seconds or a timedelta, not {value!r}")
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        bound = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number of seconds {bound}, not {value!r}")
    return float(value)


@overload
def seconds_of(value: Seconds) -> float: ...
@overload
def seconds_of(value: None) -> None: ...
@overload
def seconds_of(value: Seconds | None) -> float | None: ...
def seconds_of(value: Seconds | None) -> float | None:
    """A duration already checked by :func:`seconds` (a policy's), as float seconds."""
    return value.total_seconds() if isinstance(value, timedelta) else value


@dataclass(frozen=True)
class TieringPolicy:
    """How records move between tiers.

    Every duration is in seconds and may also be given as a
    :class:`datetime.timedelta`; each is kept as float seconds.

    >>> from datetime import timedelta
    >>> from tiered_state import TieringPolicy
    >>> policy = TieringPolicy(hot_ttl=600, cold_after=timedelta(days=1))
    >>> policy.cold_after, policy.promote_to
    (86400.0, <Tier.HOT: 'hot'>)
    >>> bot = tiered_state.open(folder / "bot", policy=policy)
    >>> bot.close()
    >>> TieringPolicy(promote_to="cold")
    Traceback (most recent call last):
      ...
    tiered_state.errors.ConfigurationError: promote_to must be 'hot', 'warm' or None

    :param hot_ttl: seconds a copy stays in HOT after a write or promotion
        (None: until evicted or the record expires). Not the record's TTL.
    :param promote_to: where a read hit below HOT is copied (``"hot"``,
        ``"warm"``, or None for never). A promotion copies; the lower copy stays.
    :param cold_after: a sweep moves WARM records neither written nor read
        for this many seconds to COLD (0: every WARM record, at the next
        sweep; None: never).
    :param hot_max_items: cap on the embedded memory tier's item count.
    :param hot_max_bytes: cap on the embedded memory tier's payload bytes.
    :param batch_size: records a sweep handles per batch (bounds its memory);
        also the most records one COLD segment holds.
    :param compact_below: a sweep rewrites COLD segments whose live fraction
        of bytes has fallen below this (overwrites and deletes leave dead
        bytes behind), packing their live records into a new segment; it packs
        the one-record segments a single demote writes the same way. 0: never.
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

    hot_ttl: Seconds | None = 3600
    promote_to: Tier | str | None = "hot"
    cold_after: Seconds | None = 7 * 86400
    hot_max_items: int | None = None
    hot_max_bytes: int | None = None
    batch_size: int = 500
    purge_after: Seconds = 300.0
    hot_trust_window: Seconds = 0.1
    compact_below: float = 0.5

    def __post_init__(self) -> None:
        # Durations may be given as timedelta; they are kept as float seconds.
        for name, zero in (("hot_ttl", False), ("hot_trust_window", False),
                           ("cold_after", True), ("purge_after", True)):
            object.__setattr__(self, name, seconds(name, getattr(self, name), zero=zero))
        for name in ("hot_trust_window", "purge_after"):
            if getattr(self, name) is None:
                raise ConfigurationError(f"{name} must be a number of seconds, not None")
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
        if (isinstance(self.compact_below, bool) or not isinstance(self.compact_below, (int, float))
                or not 0 <= self.compact_below <= 1):
            raise ConfigurationError(
                f"compact_below must be a fraction from 0 to 1, not {self.compact_below!r}")
