"""What users reach for on top of get/set/delete: the mapping protocol,
``add``, ``get_or_set`` and ``memoize``, atomic counters, ``pop``.

Each is built on the manager's single-key compare-and-set (``set(...,
if_version=...)``) and its conditional delete, so none has a tier rule of its
own: an operation reads the key's version, decides, and writes conditionally
on that version; a lost race reads again. Every one of them is therefore
atomic across threads and processes exactly as a compare-and-set is.

Computing a value once (``get_or_set``, ``memoize``) takes a *lease*: a
catalog record under a reserved name, created only if absent, with a
lifetime. Whoever creates it computes; the others wait for the value to
appear, or for the lease to end without one (the factory raised, or its
process died and the lease ran out), and then try to take it themselves. The
holder renews the lease while its factory runs, so a slow factory is never
computed twice.
"""

from __future__ import annotations

import functools
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from . import codec
from .catalog import RESERVED_PREFIX, user_key
from .errors import BackendError, ClosedError, ConfigurationError, ConflictError, ValueTypeError
from .keys import MAX_KEY_BYTES
from .policy import Seconds, seconds
from .record import Record, Tier

if TYPE_CHECKING:
    from .catalog import Catalog, Resolved

__all__ = ["LEASE_SECONDS", "Memoized", "Operations", "TierLike"]

#: A tier argument: the :class:`~tiered_state.Tier` or its name.
TierLike = Tier | Literal["hot", "warm", "cold"]
#: How long a lease lasts unless renewed: how long others wait for a holder
#: whose process died before they compute the value themselves.
LEASE_SECONDS = 60.0
#: A read-decide-write loop that keeps losing to other writers gives up after this.
_GIVE_UP = 30.0

_MISSING: Any = object()
_RAISE: Any = object()

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


def lease_name(key: str) -> str:
    """The catalog name of the lease that computes ``key`` (fixed length, any key)."""
    return RESERVED_PREFIX + "lease:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _is_number(value: object) -> bool:
    return type(value) is int or type(value) is float


def _contended(attempt: int, give_up: float, what: str, key: str) -> None:
    """Pause before another attempt of a read-decide-write loop (or give up)."""
    if time.monotonic() > give_up:
        raise BackendError(f"gave up {what} {key!r} after {attempt} attempts in "
                           f"{_GIVE_UP:.0f}s: other writers kept changing it")
    if attempt > 2:
        # Random, so that callers racing on one key spread out.
        time.sleep(random.uniform(0.0, min(0.05, 0.0005 * 2 ** attempt)))


def _plain_json(arg: object) -> str | None:
    """The canonical JSON of an int or a plain str, written directly (the
    common memoized argument, on every hit); None for anything else."""
    kind = type(arg)
    if kind is int:
        return str(arg)
    if kind is str:
        text: str = arg  # type: ignore[assignment]
        if text.isprintable() and '"' not in text and "\\" not in text:
            return f'"{text}"'
    return None


def memo_key(base: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``base`` and a stable encoding of the call's arguments.

    A call reads as it was written, arguments as canonical JSON:
    ``f(3,"BTC",days=7)`` (keyword arguments sorted), so equal arguments
    give the same key in every process. A key that would be too long, or
    not printable, has the SHA-256 of that text in place of the arguments.

    :raises SerializationError: an argument JSON cannot encode.
    """
    if not kwargs:
        plain = _plain_json(args[0]) if len(args) == 1 else None
        if plain is not None and len(plain) + len(base) < MAX_KEY_BYTES // 4 - 2 \
                and base.isprintable():
            return f"{base}({plain})"  # the common hit: one short int or plain str
        text = codec.encode(list(args))[1:-1] if args else ""
    else:
        named = ",".join(f"{name}={codec.encode(kwargs[name])}" for name in sorted(kwargs))
        text = codec.encode(list(args))[1:-1] + "," + named if args else named
    key = f"{base}({text})"
    if (len(key) * 4 <= MAX_KEY_BYTES or len(key.encode("utf-8")) <= MAX_KEY_BYTES) \
            and key.isprintable():
        return key
    return f"{base}(#{hashlib.sha256(text.encode('utf-8')).hexdigest()})"


class Memoized(Protocol[R_co]):
    """A function whose results are kept in a store (see
    :meth:`StateManager.memoize <tiered_state.StateManager.memoize>`).

    Calling it returns the stored result of the same arguments, or computes,
    stores and returns it -- once, whatever the number of concurrent callers.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> R_co: ...

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        """The key a call with these arguments is stored under."""

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the stored result of these arguments; True if there was one."""


def _memoized(state: Operations, func: Callable[..., R], ttl: float | None, tier: TierLike,
              key: Callable[..., str] | None, name: str | None) -> Memoized[R]:
    """The :class:`Memoized` form of ``func``: a plain function (a hit costs
    one key and one ``get``), with ``cache_key`` and ``forget`` attached."""
    base = name or f"{func.__module__}.{func.__qualname__}"

    def cache_key(*args: Any, **kwargs: Any) -> str:
        return memo_key(base, args, kwargs) if key is None else key(*args, **kwargs)

    def forget(*args: Any, **kwargs: Any) -> bool:
        return state.delete(cache_key(*args, **kwargs))

    # memo_key's answer for one int argument, inline: the commonest hit.
    opening = base + "(" if key is None and base.isprintable() and len(base) < 200 else ""

    @functools.wraps(func)
    def memoized(*args: Any, **kwargs: Any) -> R:
        if opening and not kwargs and len(args) == 1 and type(args[0]) is int:
            stored = f"{opening}{args[0]})"
            if len(stored) > 250:
                stored = memo_key(base, args, kwargs)
        else:
            stored = memo_key(base, args, kwargs) if key is None else key(*args, **kwargs)
        value = state.get(stored, _MISSING)
        if value is not _MISSING:
            return value  # type: ignore[no-any-return]
        return state._compute(  # type: ignore[no-any-return]
            user_key(stored), lambda: func(*args, **kwargs), ttl, tier)

    memoized.cache_key = cache_key  # type: ignore[attr-defined]
    memoized.forget = forget  # type: ignore[attr-defined]
    return memoized  # type: ignore[return-value]


class Operations:
    """The operations of this module, mixed into :class:`~tiered_state.StateManager`."""

    if TYPE_CHECKING:
        _catalog: Catalog
        _closed: bool

        def get(self, key: str, default: Any = None, *, promote: bool | None = None) -> Any: ...
        def get_record(self, key: str, *, promote: bool | None = None) -> Record | None: ...
        def set(self, key: str, value: Any, tier: TierLike = Tier.HOT,
                ttl: Seconds | None = None, *, if_version: int | None = None) -> int: ...
        def delete(self, key: str) -> bool: ...
        def iter_keys(self, pattern: str = "*") -> Iterator[str]: ...
        def _resolve_one(self, key: str, promote: Tier | None, hot_missed: bool = False
                         ) -> Resolved | None: ...
        def _delete(self, keys: list[str], versions: Mapping[str, int] | None = None
                    ) -> AbstractSet[str]: ...
        def _claim(self, name: str, seconds: float, held: int = 0) -> int: ...
        def _target(self, tier: TierLike) -> Tier: ...
        def _release(self, name: str, version: int) -> None: ...

    # ------------------------------------------------------------ mapping
    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        # A read that copies nothing up and is not noted as an access.
        if self._closed:
            raise ClosedError("'in' on a closed StateManager")
        return self._resolve_one(user_key(key), None) is not None

    def __iter__(self) -> Iterator[str]:
        return self.iter_keys()

    # ------------------------------------------------------------ conditional writes
    def add(self, key: str, value: Any, ttl: Seconds | None = None,
            tier: TierLike = Tier.HOT) -> bool:
        """Store ``value`` only if ``key`` is absent.

        >>> state.add("lock:nightly", {"by": "host-1"}), state.add("lock:nightly", {"by": "host-2"})
        (True, False)
        >>> state.get("lock:nightly")
        {'by': 'host-1'}

        :returns: True if stored, False if the key exists (nothing written).
        """
        try:
            self.set(key, value, tier, ttl, if_version=0)
        except ConflictError:
            return False
        return True

    def get_or_set(self, key: str, factory: Callable[[], Any], ttl: Seconds | None = None,
                   tier: TierLike = Tier.HOT) -> Any:
        """The value of ``key``; if absent, ``factory()`` stored and returned.

        ``factory`` runs at most once per absence of the key, across threads
        and processes: concurrent callers wait for its value and return it.
        If it raises, nothing is stored and the exception propagates (a
        waiting caller then tries in turn).

        >>> state.get_or_set("report:2024-05", lambda: {"pnl": 12.5}, ttl=86400)
        {'pnl': 12.5}
        >>> state.get_or_set("report:2024-05", lambda: {"pnl": 0.0})  # stored: not called
        {'pnl': 12.5}

        :raises ConfigurationError: a bad ``ttl`` or ``tier``, or a
            ``factory`` that is not callable -- before any read or write.
        """
        expires_in = seconds("ttl", ttl)
        self._target(tier)
        if not callable(factory):
            raise ConfigurationError(f"get_or_set needs a callable factory, not {factory!r}")
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        return self._compute(user_key(key), factory, expires_in, tier)

    def memoize(self, ttl: Seconds | None = None, tier: TierLike = Tier.HOT,
                key: Callable[..., str] | None = None, name: str | None = None
                ) -> Callable[[Callable[..., R]], Memoized[R]]:
        """Decorate a function so that its results are stored, per arguments.

        The key is ``name`` (default ``module.qualname`` of the function)
        followed by the call, its arguments as canonical JSON, e.g.
        ``prices.fetch("BTC",days=7)``; ``key`` -- a function
        of the call's arguments returning the key -- replaces that. Concurrent
        callers compute once, as with :meth:`get_or_set`. The decorated
        function has ``.cache_key(*args, **kwargs)`` and
        ``.forget(*args, **kwargs)``.

        >>> calls = []
        >>> @state.memoize(ttl=60, name="quote")
        ... def quote(symbol, venue="X"):
        ...     calls.append(symbol)
        ...     return {"symbol": symbol, "px": 100.0}
        >>> quote("BTC")["px"], quote("BTC")["px"], calls  # computed once, then read
        (100.0, 100.0, ['BTC'])
        >>> quote.cache_key("BTC", venue="Y")
        'quote("BTC",venue="Y")'
        >>> quote.forget("BTC")
        True

        :raises ConfigurationError: a bad ``ttl`` or ``tier`` (at decoration).
        """
        expires_in = seconds("ttl", ttl)
        self._target(tier)

        def decorate(func: Callable[..., R]) -> Memoized[R]:
            return _memoized(self, func, expires_in, tier, key, name)
        return decorate

    def _compute(self, key: str, factory: Callable[[], Any], ttl: float | None,
                 tier: TierLike) -> Any:
        """``factory()`` under ``key``'s lease, or the value another holder stored."""
        name = lease_name(key)
        while True:
            held = self._claim(name, LEASE_SECONDS)
            if held:
                return self._as_holder(key, name, held, factory, ttl, tier)
            # Someone else computes: wait for its value, or for its lease to
            # end without one -- then try to take the lease.
            pause = 0.001
            while True:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                value = self.get(key, _MISSING)
                if value is not _MISSING:
                    return value
                lease = self._catalog.repo.fetch_record(name)
                if lease is None or not lease.live():
                    break

    def _as_holder(self, key: str, name: str, held: int, factory: Callable[[], Any],
                   ttl: float | None, tier: TierLike) -> Any:
        version = [held]
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_SECONDS / 3):
                try:
                    version[0] = self._claim(name, LEASE_SECONDS, version[0]) or version[0]
                except BackendError:
                    continue  # the next renewal tries again; the lease is long

        renewer = threading.Thread(target=renew, name="tiered-state-lease", daemon=True)
        renewer.start()
        try:
            # A value stored between this caller's miss and its lease counts.
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                return value
            value = factory()
            try:
                self.set(key, value, tier, ttl, if_version=0)
            except ConflictError:
                # A plain write came in meanwhile: its value is the key's now.
                current = self.get(key, _MISSING)
                return value if current is _MISSING else current
            return value
        finally:
            stop.set()
            renewer.join()
            self._release(name, version[0])

    # ------------------------------------------------------------ read-and-write
    def incr(self, key: str, delta: int | float = 1, default: int | float = 0,
             ttl: Seconds | None = None) -> int | float:
        """Add ``delta`` to the number under ``key`` (``default`` if absent); atomic.

        >>> state.incr("fills:BTC"), state.incr("fills:BTC", 10), state.incr("fills:BTC", 0.5)
        (1, 11, 11.5)
        >>> version = state.set("bot:name", "alpha")
        >>> state.incr("bot:name")
        Traceback (most recent call last):
          ...
        tiered_state.errors.ValueTypeError: cannot incr 'bot:name': its value is str, not a number

        :param ttl: the record's new lifetime; None keeps the expiry it has
            (none for a record this call creates).
        :returns: the new value.
        :raises ValueTypeError: the stored value (or ``delta``, ``default``)
            is not a number; nothing is changed.
        """
        key = user_key(key)
        for name, given in (("delta", delta), ("default", default)):
            if not _is_number(given):
                raise ValueTypeError(f"incr {name} must be an int or float, not {type(given).__name__}")
        expires_in = seconds("ttl", ttl)
        give_up = time.monotonic() + _GIVE_UP
        attempt = 0
        while True:
            attempt += 1
            record = self.get_record(key, promote=False)
            keep: float | None = expires_in
            if record is None:
                value, expected = default, 0
            else:
                value, expected = record.value, record.version
                if not _is_number(value):
                    raise ValueTypeError(
                        f"cannot incr {key!r}: its value is {type(value).__name__}, not a number")
                if ttl is None and record.expires_at is not None:
                    keep = record.expires_at - time.time()
            if keep is None or keep > 0:
                new = value + delta
                try:
                    self.set(key, new, ttl=keep, if_version=expected)
                    return new
                except ConflictError:
                    pass
            _contended(attempt, give_up, "incrementing", key)

    def decr(self, key: str, delta: int | float = 1, default: int | float = 0,
             ttl: Seconds | None = None) -> int | float:
        """:meth:`incr` by ``-delta``.

        >>> state.decr("orders:open", default=5), state.decr("orders:open", 2)
        (4, 2)
        """
        if not _is_number(delta):
            raise ValueTypeError(f"decr delta must be an int or float, not {type(delta).__name__}")
        return self.incr(key, -delta, default, ttl)

    def pop(self, key: str, default: Any = _RAISE) -> Any:
        """Delete ``key`` and return the value it had, atomically: the value
        returned is the one deleted.

        >>> version = state.set("order:1", {"px": 100})
        >>> state.pop("order:1"), state.pop("order:1", None)
        ({'px': 100}, None)
        >>> state.pop("order:1")
        Traceback (most recent call last):
          ...
        KeyError: 'order:1'

        :raises KeyError: the key is absent and no ``default`` is given.
        """
        key = user_key(key)
        give_up = time.monotonic() + _GIVE_UP
        attempt = 0
        while True:
            attempt += 1
            record = self.get_record(key, promote=False)
            if record is None:
                if default is _RAISE:
                    raise KeyError(key)
                return default
            if self._delete([key], {key: record.version}):
                return record.value
            _contended(attempt, give_up, "popping", key)
