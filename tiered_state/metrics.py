"""Metrics collectors.

A collector has the method names of the ``statsd`` package's client
(``incr``, ``timing``, ``gauge``) plus ``histogram`` (sent as a StatsD timer),
so a ``statsd.StatsClient`` can be passed to ``open(metrics=...)`` directly.
``metrics=None`` (the default) records nothing and costs nothing: the manager
then does not wrap its repositories at all.

A collector must never raise into the caller: a metrics backend that is down
is not a reason for a state operation to fail.

:class:`StatsdMetrics` does not send a UDP packet per call: counters and
gauges are aggregated in process and timers kept as a bounded uniform sample
(with the StatsD ``|@rate`` that tells the server how many there really were),
and a background thread sends them every ``flush_interval`` seconds packed
into as few datagrams as fit. That is what keeps instrumentation cheap enough
for a memory-tier ``get``.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .codec import ENCODING
from .config import ENV_STATSD, environ, require
from .errors import ConfigurationError
from .record import Entry, Metadata
from .repositories.base import Items, StateRepository

if TYPE_CHECKING:
    from .record import Tier
    from .segments import SegmentStore

__all__ = [
    "Counters",
    "InMemoryMetrics",
    "InstrumentedRepository",
    "MetricsCollector",
    "NullMetrics",
    "StatsdMetrics",
    "Ticker",
    "as_collector",
    "metrics_from_env",
    "parse_address",
]

log = logging.getLogger(__name__)
_random = random.random
_T = TypeVar("_T")


class Ticker:
    """What :meth:`MetricsCollector.ticker` returns: ``tick()`` and ``rate``."""

    __slots__ = ("rate", "tick")

    def __init__(self, tick: Callable[[], object], rate: float = 1.0) -> None:
        self.tick = tick
        self.rate = rate


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

    def ticker(self, stat: str) -> Ticker:
        """A handle on the counter ``stat`` for a hot path (the repository hook).

        ``handle.tick()`` adds one; ``handle.rate`` is the probability with
        which the caller should time the call (1: every call) and pass the
        duration to :meth:`sampled_timing`. The default ticks through
        :meth:`incr` and asks for every call to be timed.
        """
        return Ticker(functools.partial(self.incr, stat))

    def sampled_timing(self, stat: str, delta: float, rate: float) -> None:
        """Record a duration measured for a call picked with probability ``rate``.

        Unlike ``timing(rate=)`` (the ``statsd`` API, which samples again),
        the sampling has already happened.
        """
        self.timing(stat, delta)

    def close(self) -> None:
        """Flush and release resources."""


class NullMetrics(MetricsCollector):
    """Records nothing."""


class InMemoryMetrics(MetricsCollector):
    """Keeps counters, gauges and timer samples in memory (tests, ``stats()``).

    >>> from tiered_state.metrics import InMemoryMetrics
    >>> metrics = InMemoryMetrics()
    >>> bot = tiered_state.open(folder / "bot", metrics=metrics)
    >>> version = bot.set("position:BTC", {"qty": 1.5})
    >>> bot.get("position:BTC")
    {'qty': 1.5}
    >>> metrics.counters["state.manager.hit_hot"]
    1
    >>> sorted(bot.stats()["manager"]["metrics"])  # the snapshot, in stats()
    ['counters', 'gauges', 'timers']
    >>> bot.close()
    """

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


class _Client(Protocol):
    """What ``open(metrics=...)`` accepts besides a collector: a ``statsd.StatsClient``."""

    def incr(self, stat: str, count: int = 1, rate: float = 1) -> None: ...

    def timing(self, stat: str, delta: float, rate: float = 1) -> None: ...

    def gauge(self, stat: str, value: float, rate: float = 1, delta: bool = False) -> None: ...


class _GuardedClient(MetricsCollector):
    """Adapts a foreign client (``statsd.StatsClient``, a Datadog client, ...).

    Adds ``histogram`` (as a timer) where the client has none, and swallows
    whatever the client raises: a metrics call never fails a state operation.
    """

    def __init__(self, client: _Client) -> None:
        self.client = client
        self._warned = False

    def _failed(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            name = type(self.client).__name__
            log.warning("metrics client %s failed; dropping metrics: %r", name, exc)

    def incr(self, stat: str, count: int = 1, rate: float = 1) -> None:
        try:
            self.client.incr(stat, count, rate)
        except Exception as exc:  # noqa: BLE001 metrics never raise into the caller
            self._failed(exc)

    def timing(self, stat: str, delta: float, rate: float = 1) -> None:
        try:
            self.client.timing(stat, delta, rate)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def gauge(self, stat: str, value: float, rate: float = 1, delta: bool = False) -> None:
        try:
            self.client.gauge(stat, value, rate, delta)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)


def as_collector(metrics: MetricsCollector | _Client | None) -> MetricsCollector | None:
    """Normalise what ``open(metrics=...)`` was given.

    A :class:`MetricsCollector` is returned as is; any other object with the
    ``statsd`` client's ``incr``/``timing``/``gauge`` (a ``statsd.StatsClient``)
    is wrapped so it also has ``histogram`` and never raises; ``None`` stays None.

    :raises ConfigurationError: the object lacks those methods.
    """
    if metrics is None or isinstance(metrics, MetricsCollector):
        return metrics
    missing = [m for m in ("incr", "timing", "gauge") if not callable(getattr(metrics, m, None))]
    if missing:
        raise ConfigurationError(
            f"metrics must be a MetricsCollector or a statsd-style client; "
            f"{type(metrics).__name__} has no {', '.join(missing)}"
        )
    return _GuardedClient(metrics)


def parse_address(address: str) -> tuple[str, int]:
    """Parse ``host:port`` (``host`` alone means port 8125; IPv6 as ``[::1]:8125``).

    :raises ConfigurationError: malformed address or port.
    """
    text = address.strip()
    host, port = text, "8125"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"bad StatsD address {address!r}; expected host:port")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise ConfigurationError(f"bad StatsD address {address!r}; expected host:port")
    return host, number


def metrics_from_env() -> MetricsCollector | None:
    """A :class:`StatsdMetrics` for ``TIERED_STATE_STATSD=host:port``, or None if unset.

    ``TIERED_STATE_STATSD_PREFIX`` optionally sets the prefix.

    :raises ConfigurationError: the address is malformed.
    :raises MissingDependencyError: the ``statsd`` package is not installed.
    """
    address = environ(ENV_STATSD)
    if address is None:
        return None
    host, port = parse_address(address)
    return StatsdMetrics(host, port, prefix=environ(ENV_STATSD + "_PREFIX"))


# Live StatsdMetrics, so that buffered metrics are sent at exit and a forked
# child starts with its own buffers and flusher thread.
_LIVE: weakref.WeakSet[StatsdMetrics] = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for collector in list(_LIVE):
        collector.close()


def _after_fork_in_child() -> None:
    for collector in list(_LIVE):
        collector._reset_after_fork()


atexit.register(_flush_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Buffer:
    """One thread's timer reservoirs.

    Only the owning thread writes it, so recording takes no lock (a lock costs
    as much as the rest of a call). The flusher swaps the reservoirs out
    whole; a sample racing the swap may be lost, which a sample can afford.
    """

    __slots__ = ("thread", "timers")

    def __init__(self) -> None:
        # name -> [seen (weighted by 1/rate), kept samples]
        self.timers: dict[str, list[Any]] = {}
        self.thread = threading.current_thread()


class _Tick(Ticker):
    """A lock-free counter: ``itertools.count.__next__`` is one C call, atomic
    under the GIL. The flusher reads it by calling ``next`` too, so it keeps
    track of its own reads to subtract them."""

    __slots__ = ("reads", "sent", "seq")

    def __init__(self) -> None:
        self.seq = itertools.count()
        super().__init__(self.seq.__next__)
        self.reads = 0
        self.sent = 0

    def total(self) -> int:
        """Ticks so far (flusher only)."""
        value = next(self.seq) - self.reads
        self.reads += 1
        return value


class StatsdMetrics(MetricsCollector):
    """Sends metrics to a StatsD server over UDP with the ``statsd`` package.

    Calls only touch in-process state, without a lock on the common paths:
    ``+1`` counts go to an ``itertools.count`` per name (one C call, atomic
    under the GIL), timer samples to per-thread reservoirs. A daemon thread
    sends the aggregate every ``flush_interval`` seconds, packed into as few
    datagrams as fit ``max_packet``:

    - counters as one ``name:N|c`` per name and interval (the server sums
      them anyway);
    - gauges as their last value per interval (``delta`` gauges as the sum of
      the adjustments, ``+N``/``-N``);
    - timers (and histograms) as at most ``max_samples`` samples per name,
      thread and interval, chosen uniformly at random (reservoir sampling),
      each sent with ``|@rate`` = kept/seen so the server's counts stay right
      while the percentiles come from an unbiased sample. Through
      :meth:`ticker` (the repository hook) a busy operation is moreover only
      *measured* at a rate that yields about ``max_samples`` timings per
      interval, so most calls skip the clock reads altogether.

    Nothing here ever raises into the caller: the server address is resolved
    in the flusher thread (a DNS failure is logged once and retried at the
    next flush), and socket errors are swallowed by the ``statsd`` client.
    Buffered metrics are sent by :meth:`close`, :meth:`flush` and at exit.

    :param host: StatsD host.
    :param port: StatsD UDP port.
    :param prefix: prepended to every name with a dot (``app`` -> ``app.state...``).
    :param flush_interval: seconds between sends.
    :param max_samples: timer samples kept per name, thread and interval.
    :param max_packet: largest datagram in bytes (512 is safe across the
        internet; ~1432 fits an Ethernet MTU; 8932 on loopback or jumbo frames).
    :param ipv6: resolve the host as IPv6.
    :raises MissingDependencyError: the ``statsd`` package is not installed.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8125,
        prefix: str | None = None,
        *,
        flush_interval: float = 1.0,
        max_samples: int = 1000,
        max_packet: int = 1432,
        ipv6: bool = False,
    ) -> None:
        self._statsd = require("statsd", extra="statsd")
        if flush_interval <= 0 or max_samples < 1 or max_packet < 64:
            raise ConfigurationError("flush_interval, max_samples and max_packet must be positive")
        self.host = host
        self.port = port
        self.prefix = prefix or None
        self.flush_interval = flush_interval
        self.max_samples = max_samples
        self.max_packet = max_packet
        self.ipv6 = ipv6
        #: Flushes whose metrics were dropped (address unresolvable, send failed).
        self.dropped_flushes = 0
        self._client: Any = None
        self._warned = False
        self._closed = False
        self._reset()
        self._start_thread()
        _LIVE.add(self)

    # ---------------------------------------------------------------- internals
    def _reset(self) -> None:
        self._local = threading.local()
        self._buffers: list[_Buffer] = []
        # Counts other than +1, gauges: rare (batches, sweeps), a lock is fine.
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._gauges: dict[str, float] = {}
        self._deltas: dict[str, float] = {}
        # Kept across a fork (the repository hooks hold them), rebased instead.
        if not hasattr(self, "_tickers"):
            self._tickers: dict[str, _Tick] = {}
        for tick in self._tickers.values():
            tick.sent = tick.total()

    def _buffer(self) -> _Buffer:
        buffer = _Buffer()
        self._local.buffer = buffer
        with self._lock:
            self._buffers.append(buffer)
        return buffer

    def _start_thread(self) -> None:
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiered-state-statsd", daemon=True)
        self._thread.start()

    def _reset_after_fork(self) -> None:
        # The parent's buffered metrics are the parent's to send; the child's
        # copies of the locks may be held by threads that no longer exist.
        self._reset()
        self._client = None
        if not self._closed:
            self._start_thread()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def _connect(self) -> Any:
        try:
            self._client = self._statsd.StatsClient(
                self.host, self.port, prefix=self.prefix, maxudpsize=self.max_packet, ipv6=self.ipv6
            )
        except Exception as exc:  # noqa: BLE001 DNS failure, no network: retry next flush
            self._warn("cannot reach StatsD at %s:%s (%r); dropping metrics until it resolves", exc)
            return None
        self._warned = False
        return self._client

    def _warn(self, message: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message, self.host, self.port, exc)

    # ------------------------------------------------------------------ the API
    def incr(self, stat: str, count: float = 1, rate: float = 1) -> None:
        try:
            if count == 1 and rate == 1:
                tick = self._tickers.get(stat) or self.ticker(stat)
                tick.tick()
                return
            if rate != 1:
                # The caller sampled: count what it stands for, as the server would.
                if rate <= 0:
                    return
                count = count / rate
            with self._lock:
                self._counts[stat] = self._counts.get(stat, 0) + count
        except Exception:  # never raise into the caller
            log.debug("dropped counter %s", stat, exc_info=True)

    def ticker(self, stat: str) -> Ticker:
        # Busy operations are timed at a reduced rate: two clock reads and a
        # reservoir update per call would cost more than a memory-tier read,
        # and the reservoir keeps only max_samples per interval anyway. The
        # flusher sets each rate from the previous interval's count.
        tick = self._tickers.get(stat)
        if tick is None:
            with self._lock:
                tick = self._tickers.setdefault(stat, _Tick())
        return tick

    def decr(self, stat: str, count: float = 1, rate: float = 1) -> None:
        """Subtract ``count`` from the counter ``stat`` (``statsd`` API)."""
        self.incr(stat, -count, rate)

    def timing(self, stat: str, delta: float | timedelta, rate: float = 1) -> None:
        if rate != 1:
            if rate <= 0 or _random() > rate:
                return
            self._sample(stat, delta, 1.0 / rate)
        else:
            self._sample(stat, delta, 1.0)

    def _sample(self, stat: str, delta: float | timedelta, weight: float) -> None:
        """Add a sample standing for ``weight`` calls to this thread's reservoir."""
        try:
            try:
                timers = self._local.buffer.timers
            except AttributeError:
                timers = self._buffer().timers
            reservoir = timers.get(stat)
            if reservoir is None:
                timers[stat] = [weight, [delta]]
                return
            seen = reservoir[0] = reservoir[0] + weight
            samples = reservoir[1]
            if len(samples) < self.max_samples:
                samples.append(delta)
            else:
                # Algorithm R: every sample seen so far is kept with equal probability.
                slot = int(_random() * seen)
                if slot < self.max_samples:
                    samples[slot] = delta
        except Exception:
            log.debug("dropped timer %s", stat, exc_info=True)

    def histogram(self, stat: str, value: float, rate: float = 1) -> None:
        self.timing(stat, value, rate)

    def sampled_timing(self, stat: str, delta: float, rate: float) -> None:
        self._sample(stat, delta, 1.0 / rate if 0 < rate < 1 else 1.0)

    def gauge(self, stat: str, value: float, rate: float = 1, delta: bool = False) -> None:
        try:
            if rate != 1 and _random() > rate:
                return
            with self._lock:
                if not delta:
                    self._gauges[stat] = value
                    self._deltas.pop(stat, None)
                elif stat in self._gauges:
                    self._gauges[stat] += value
                else:
                    self._deltas[stat] = self._deltas.get(stat, 0) + value
        except Exception:
            log.debug("dropped gauge %s", stat, exc_info=True)

    def _collect(
        self,
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, list[Any]]]:
        timers: dict[str, list[Any]] = {}
        with self._lock:
            counters, self._counts = self._counts, {}
            gauges, self._gauges = self._gauges, {}
            deltas, self._deltas = self._deltas, {}
            buffers = list(self._buffers)
            ticks = list(self._tickers.items())
        for stat, tick in ticks:
            total = tick.total()
            if total != tick.sent:
                counters[stat] = counters.get(stat, 0) + total - tick.sent
                tick.sent = total
        for buffer in buffers:
            alive = buffer.thread.is_alive()
            taken, buffer.timers = buffer.timers, {}
            for stat, (seen, samples) in list(taken.items()):
                merged = timers.setdefault(stat, [0.0, []])
                merged[0] += seen
                merged[1].extend(samples)
            if not alive:
                # Its thread is gone and everything it recorded is collected.
                with self._lock:
                    self._buffers.remove(buffer)
        return counters, gauges, deltas, timers

    def _adapt_rates(self, counters: dict[str, float]) -> None:
        """Set each ticker's timing rate for the next interval: about max_samples timed calls.

        An operation idle this interval keeps half its reduction (rate x2)
        rather than jumping back to timing every call: bursty traffic would
        otherwise pay the full timing cost at the start of every burst.
        """
        limit = self.max_samples
        for stat, tick in list(self._tickers.items()):
            count = counters.get(stat, 0)
            if count > limit:
                tick.rate = limit / count
            elif count == 0 and tick.rate < 0.5:
                tick.rate *= 2
            else:
                tick.rate = 1.0

    def flush(self) -> None:
        """Send what is buffered now (the flusher thread does this periodically)."""
        try:
            with self._flush_lock:
                counters, gauges, deltas, timers = self._collect()
                self._adapt_rates(counters)
                if not (counters or gauges or deltas or timers):
                    return
                client = self._client or self._connect()
                if client is None:
                    self.dropped_flushes += 1
                    return
                self._send(client, counters, gauges, deltas, timers)
        except Exception as exc:  # noqa: BLE001 metrics never raise into the caller
            self.dropped_flushes += 1
            self._warn("sending metrics to StatsD at %s:%s failed (%r)", exc)

    @staticmethod
    def _send(
        client: Any,
        counters: dict[str, float],
        gauges: dict[str, float],
        deltas: dict[str, float],
        timers: dict[str, list[Any]],
    ) -> None:
        pipe = client.pipeline()
        for stat, count in counters.items():
            pipe.incr(stat, int(count) if count == int(count) else count)
        for stat, value in gauges.items():
            pipe.gauge(stat, value)
        for stat, value in deltas.items():
            pipe.gauge(stat, value, delta=True)
        for stat, (seen, samples) in timers.items():
            rate = len(samples) / seen
            # The public timing(rate=) would sample a second time; these are
            # already the sample, so only the |@rate annotation is added.
            suffix = "|ms" if rate >= 0.999999 else f"|ms|@{rate:.6g}"
            for value in samples:
                if isinstance(value, timedelta):
                    value = value.total_seconds() * 1000.0
                pipe._send_stat(stat, f"{value:0.6f}{suffix}", 1)
        pipe.send()

    def close(self) -> None:
        """Send what is buffered and stop the flusher thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self.flush()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                log.debug("closing the StatsD client failed", exc_info=True)
        _LIVE.discard(self)

    def __repr__(self) -> str:
        return f"<StatsdMetrics {self.host}:{self.port} prefix={self.prefix!r}>"


# ---------------------------------------------------------------- repositories
# Which counter each method bumps; extras count with the core operation they refine.
_OPERATION = {
    "fetch": "fetch",
    "fetch_record": "fetch",
    "fetch_many": "fetch_many",
    "store": "store",
    "store_if_version": "store",
    "store_if_newer": "store",
    "store_many_if_newer": "store_many",
    "store_many_if_version": "store_many",
    "store_many": "store_many",
    "delete": "delete",
    "delete_if_version": "delete",
    "delete_many": "delete_many",
    "delete_many_if_version": "delete_many",
    "keys": "keys",
    "touch_many": "touch_many",
}


class InstrumentedRepository(StateRepository):
    """Wraps a repository and records metrics for every operation.

    The single hook point for metrics: the manager wraps each repository in
    one of these only when a collector is configured, so ``metrics=None``
    costs nothing. Names:
    ``state.repository.{backend}.operations.{op}_total`` (counter, every
    attempt), ``...{op}_latency_ms`` (timer), ``...errors_total`` (counter,
    every exception an operation raises) and ``...batch_size`` (histogram,
    for the batch operations). ``metrics`` may also be a ``statsd.StatsClient``.
    """

    def __init__(self, inner: StateRepository, metrics: MetricsCollector) -> None:
        collector = as_collector(metrics)
        assert collector is not None
        self.inner = inner
        self.metrics = collector
        prefix = f"state.repository.{inner.backend}.operations."
        self._prefix = prefix
        # Counter handles and names made once: building names per call would
        # cost as much as a memory-tier read.
        self._ops = {
            op: (collector.ticker(prefix + op + "_total"), prefix + op + "_latency_ms")
            for op in set(_OPERATION.values())
        }
        self._fetch_op = self._ops["fetch"]
        read_payload = getattr(inner, "fetch_payload", None)
        if read_payload is not None:
            # The optional fast read, timed like fetch_record (the manager
            # looks for it, so the wrapper must not hide it).
            self.fetch_payload = lambda key, encoding=ENCODING: self._read(
                lambda k: read_payload(k, encoding), key)
        self._errors_name = prefix + "errors_total"
        self._batch_name = prefix + "batch_size"
        self._sampled = collector.sampled_timing
        self._incr = collector.incr

    # Attributes the manager reads from the wrapped repository.
    @property  # type: ignore[override]
    def backend(self) -> str:  # type: ignore[override]
        return self.inner.backend

    @property  # type: ignore[override]
    def volatile(self) -> bool:  # type: ignore[override]
        return self.inner.volatile

    @property  # type: ignore[override]
    def shared(self) -> bool:  # type: ignore[override]
        return self.inner.shared

    @property  # type: ignore[override]
    def tier(self) -> Tier | None:  # type: ignore[override]
        return self.inner.tier

    @tier.setter
    def tier(self, value: Tier | None) -> None:
        self.inner.tier = value

    def _call(self, method: str, size: int | None, *args: Any) -> Any:
        ticker, latency = self._ops[_OPERATION[method]]
        if size is not None:
            self.metrics.histogram(self._batch_name, size)
        ticker.tick()
        rate = ticker.rate
        start = time.perf_counter()
        try:
            return getattr(self.inner, method)(*args)
        except Exception:
            self._incr(self._errors_name)
            raise
        finally:
            if rate >= 1.0 or random.random() < rate:
                self._sampled(latency, (time.perf_counter() - start) * 1000.0, rate)

    # The hot path of every read, spelled out to skip _call's dispatch and,
    # when this call is not picked for timing, the clock reads.
    def _read(self, read: Callable[[str], _T], key: str) -> _T:
        ticker, latency = self._fetch_op
        ticker.tick()
        rate = ticker.rate
        if rate < 1.0 and random.random() >= rate:
            try:
                return read(key)
            except Exception:
                self._incr(self._errors_name)
                raise
        start = time.perf_counter()
        try:
            return read(key)
        except Exception:
            self._incr(self._errors_name)
            raise
        finally:
            self._sampled(latency, (time.perf_counter() - start) * 1000.0, rate)

    def fetch_record(self, key: str) -> Entry | None:
        return self._read(self.inner.fetch_record, key)

    def fetch(self, key: str) -> Any | None:
        return self._call("fetch", None, key)

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        return self._call("store", None, key, value, metadata)  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        return self._call("delete", None, key)  # type: ignore[no-any-return]

    def keys(self, pattern: str = "*") -> list[str]:
        return self._call("keys", None, pattern)  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def store_many(self, items: Items) -> set[str]:
        return self._call("store_many", len(items), items)  # type: ignore[no-any-return]

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        return self._call("delete_many", len(keys), keys)  # type: ignore[no-any-return]

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = list(keys)
        return self._call("fetch_many", len(keys), keys)  # type: ignore[no-any-return]

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        return self._call("store_if_version", None, key, value, metadata, expected)  # type: ignore[no-any-return]

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        return self._call("store_if_newer", None, key, value, metadata)  # type: ignore[no-any-return]

    def store_many_if_newer(self, items: Items) -> set[str]:
        return self._call("store_many_if_newer", len(items), items)  # type: ignore[no-any-return]

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        return self._call("store_many_if_version", len(items), items, expected)  # type: ignore[no-any-return]

    def delete_if_version(self, key: str, version: int) -> bool:
        return self._call("delete_if_version", None, key, version)  # type: ignore[no-any-return]

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        return self._call("delete_many_if_version", len(versions), versions)  # type: ignore[no-any-return]

    def touch_many(self, keys: Iterable[str], at: float) -> None:
        keys = list(keys)
        self._call("touch_many", len(keys), keys, at)

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        return self.inner.iter_keys(pattern)

    def iter_all_keys(self) -> Iterator[str]:
        return self.inner.iter_all_keys()

    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        return self.inner.scan(batch_size, now=now, idle_before=idle_before)

    def clear(self) -> int:
        return self.inner.clear()

    def reclaim_space(self, min_free_fraction: float = 0.25) -> int:
        return self.inner.reclaim_space(min_free_fraction)

    def segments(self) -> SegmentStore | None:
        return self.inner.segments()

    def changed_by_others(self) -> bool:
        return self.inner.changed_by_others()

    def ping(self) -> float:
        return self.inner.ping()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return repr(self.inner)


class Counters:
    """The manager's own counters, each also sent to the collector (if any) as
    ``state.manager.<name>``: one dict increment, plus one C call per count
    through the collector's ticker when metrics are on.

    :param names: the counters.
    :param metrics: the collector, or None (then counting costs a dict increment).
    """

    def __init__(self, names: Iterable[str], metrics: MetricsCollector | None) -> None:
        self.values = dict.fromkeys(names, 0)
        self.metrics = metrics
        self._ticks = ({n: metrics.ticker("state.manager." + n).tick for n in self.values}
                       if metrics is not None else {})

    def tick(self, name: str) -> None:
        """Count one (the read path's form)."""
        self.values[name] += 1
        if self._ticks:
            self._send(name, 1)

    def add(self, name: str, n: int = 1) -> None:
        """Count ``n``."""
        if n:
            self.values[name] += n
            if self._ticks:
                self._send(name, n)

    def _send(self, name: str, n: int) -> None:
        try:
            if n == 1:
                self._ticks[name]()
            else:
                self.metrics.incr("state.manager." + name, n)  # type: ignore[union-attr]
        except Exception:  # metrics never break state operations
            log.debug("metrics collector failed", exc_info=True)
