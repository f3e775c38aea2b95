"""``redis://`` -- Redis as the HOT tier (redis-py, ``pip install 'tiered-state[redis]'``).

URL: redis-py's own forms, plus this backend's query options::

    redis://[[user]:password@]host[:port][/db][?prefix=app:&default_ttl=3600]
    rediss://...                       (TLS; redis-py's ssl_* query options)
    unix:///path/to/redis.sock[?db=0&prefix=app:]

``prefix`` (default ``tiered_state:``) namespaces every key; ``default_ttl``
(seconds, default none) is how long a record *without* its own ``expires_at``
stays in Redis. Every other query option goes to redis-py unchanged
(``socket_timeout``, ``socket_connect_timeout``, ``max_connections``,
``health_check_interval``, ``ssl_cert_reqs``...). Timeouts default short
(0.5 s connect, 1 s socket) so a dead Redis costs a caller about a second,
not minutes; a lost connection (server restart) is retried once at once on a
fresh connection, so the next call after a restart just works.

Storage format (what ``redis-cli`` shows), for a record ``key``:

``<prefix><key>``
    the payload itself: the JSON text of the value, byte for byte, so
    ``redis-cli GET 'tiered_state:position:BTC'`` prints ``{"qty":1.5}`` and
    any other tool can read it. For a stub it is the stub's payload: empty
    for the placeholders the manager leaves while it writes a key (an empty
    string is a present value, never taken for "absent").
``<prefix>\\x1fmeta:<key>``
    the metadata as a JSON object (checksum, size_bytes, version, created_at,
    updated_at, expires_at, encoding, and ``hot_until`` for a HOT copy).
    ``\\x1f`` is a control character, which no valid key contains, so a
    metadata key can never collide with a record key and both stay under one
    prefix (one ACL pattern, one SCAN).

Both keys are written in one atomic command (``MSET``, or a Lua script when
they carry a TTL) with the same ``PX``, read with one ``MGET``, and deleted
together; a record whose two keys are not both there reads as absent.

One more key, ``<prefix>\\x1fepoch``, holds the HOT epoch when the manager
uses this store as a shared HOT (see "the HOT epoch" below).

Volatile: records expire natively at ``min(expires_at, hot_until)`` (``PX``),
and an already expired record is never stored (any older copy is deleted
instead) -- so a tombstone, born expired, leaves nothing here, and the
stored version of a key is also its live version.

Conditional writes and their batch forms are Lua scripts, atomic across all
clients. They compare versions exactly, as decimal digit strings: versions
exceed 2**53, where Lua's numbers would round. A batch is one pipeline round
trip per :data:`PIPELINE_RECORDS` records (one script call per :data:`CHUNK`
records); when part of it fails, the
:class:`~tiered_state.errors.BatchError` names the failed keys (their
outcome is unknown) and, as ``succeeded``, the keys written or deleted.

Redis Cluster is not supported yet: the two keys of a record are not
hash-tagged into one slot.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from ..config import encode_userinfo, parse_number, redact, require
from ..errors import BackendError, BackendUnavailableError, ConfigurationError, InvalidKeyError
from ..keys import (
    compile_pattern,
    is_literal,
    literal_prefix,
    to_redis,
    validate_key,
    validate_pattern,
)
from ..record import Entry, Metadata, live_value
from .base import Items, StateRepository, chunked

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStateRepository"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "tiered_state:"
DEFAULT_SOCKET_TIMEOUT = 1.0
DEFAULT_CONNECT_TIMEOUT = 0.5
#: Marker between the prefix and a key for metadata keys (a control
#: character, so no valid key can start with it).
META_MARK = "\x1fmeta:"
#: The key (after the prefix) of the HOT epoch; a control character again,
#: so it is never a record key.
EPOCH_MARK = "\x1fepoch"
#: Records per MGET / MSET / Lua call, and keys per SCAN batch.
CHUNK = 500
SCAN_COUNT = 1000
#: Records per pipeline round trip in store_many (bounds client memory).
PIPELINE_RECORDS = 10_000

#: One command of a pipeline: (script, keys, args) for an EVALSHA of a
#: registered script, or (None, (), command) for a plain command.
_Call = tuple[Any, Sequence[bytes], Sequence[Any]]

_META_FIELDS = ("checksum", "size_bytes", "version", "created_at", "updated_at",
                "expires_at", "encoding")

_dumps: Callable[[Any], bytes]
_loads: Callable[[bytes | str], Any]
try:  # pragma: no cover - depends on what is installed
    import orjson

    _dumps = orjson.dumps
    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _encoder = json.JSONEncoder(separators=(",", ":"))

    def _dumps(obj: Any) -> bytes:
        return _encoder.encode(obj).encode("utf-8")

    _loads = json.loads

# Lua, so a record's two keys change together and a conditional write is one
# atomic step on the server. Every script works on records given as key pairs
# (KEYS = value key, metadata key, value key, metadata key, ...), so a single
# conditional write is the batch script with one record.
#
# Versions are microseconds << 10 | node, about 1.8e18: far beyond 2**53,
# where Lua's numbers (doubles) stop being exact and two versions 256 apart
# compare equal. So a version never becomes a number here: it stays a string
# of decimal digits without leading zeros -- sent as such in ARGV (redis-py
# writes a Python int exactly), and read from the metadata JSON this module
# wrote ('"version":<digits>') -- and vcmp orders two such strings: the
# longer one is greater; equal lengths compare as text would, 15 digits at a
# time as numbers (exact below 2**53). Not with Lua's '<' on the strings,
# which follows the server's collation locale, nor byte by byte, which costs
# a function call per digit.
_LUA_LIB = """
local function vcmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  for i = 1, #a, 15 do
    local x, y = tonumber(string.sub(a, i, i + 14)), tonumber(string.sub(b, i, i + 14))
    if x ~= y then return x < y and -1 or 1 end
  end
  return 0
end
-- The stored version of the record at KEYS[k], KEYS[k + 1]; '0' if there is
-- none (or only half of one, which reads as absent too).
-- Metadata that is not a string (another tool wrote the key) or not ours
-- reads as absent too, so the next write replaces it instead of failing.
local function stored(k)
  local m = redis.pcall('GET', KEYS[k + 1])
  if type(m) ~= 'string' or redis.call('EXISTS', KEYS[k]) == 0 then return '0' end
  return string.match(m, '"version":(%d+)') or '0'
end
-- px: "0" no expiry, "-1" already expired (the write leaves nothing), else ms.
local function put(k, v, m, px)
  px = tonumber(px)
  if px > 0 then
    redis.call('SET', KEYS[k], v, 'PX', px)
    redis.call('SET', KEYS[k + 1], m, 'PX', px)
  elseif px == 0 then
    redis.call('MSET', KEYS[k], v, KEYS[k + 1], m)
  else
    redis.call('UNLINK', KEYS[k], KEYS[k + 1])
  end
end
-- The first n records of KEYS / ARGV (payload, metadata, px, version), each
-- stored if its version is above the stored one; their 1-based indexes.
local function store_if_newer(n)
  local done = {}
  for i = 1, n do
    local k, a = 2 * i - 1, 4 * i - 4
    if vcmp(stored(k), ARGV[a + 4]) < 0 then
      put(k, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
      done[#done + 1] = i
    end
  end
  return done
end
"""
# ARGV = payload, metadata, px per record; returns how many were written.
_LUA_STORE = _LUA_LIB + """
for i = 1, #KEYS / 2 do
  put(2 * i - 1, ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i])
end
return #KEYS / 2
"""
# ARGV = payload, metadata, px, version per record; each script returns the
# 1-based indexes of the records it wrote or deleted.
_LUA_STORE_IF_NEWER = _LUA_LIB + """
return store_if_newer(#KEYS / 2)
"""
# The same, fenced by the HOT epoch: KEYS end with the epoch key and ARGV
# with the epoch the caller read under; a different epoch (HOT was flushed
# since, or this server is not the one the caller checked) writes nothing
# and returns -1.
_LUA_STORE_IF_NEWER_IN_EPOCH = _LUA_LIB + """
if redis.call('GET', KEYS[#KEYS]) ~= ARGV[#ARGV] then return -1 end
return store_if_newer((#KEYS - 1) / 2)
"""
# ARGV = payload, metadata, px, version, expected per record. Redis drops an
# expired record itself and a tombstone is never kept (it is born expired),
# so the stored version is also the live one.
_LUA_STORE_IF_VERSION = _LUA_LIB + """
local done = {}
for i = 1, #KEYS / 2 do
  local k, a = 2 * i - 1, 5 * i - 5
  local current = stored(k)
  if current == ARGV[a + 5] and vcmp(current, ARGV[a + 4]) <= 0 then
    put(k, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
    done[#done + 1] = i
  end
end
return done
"""
# ARGV = the version per record.
_LUA_DELETE_IF_VERSION = _LUA_LIB + """
local done = {}
for i = 1, #KEYS / 2 do
  local k = 2 * i - 1
  local current = stored(k)
  if current ~= '0' and current == ARGV[i] then
    redis.call('UNLINK', KEYS[k], KEYS[k + 1])
    done[#done + 1] = i
  end
end
return done
"""
# KEYS = the value keys, then the metadata keys; returns how many values existed.
_LUA_DELETE = """
local half = #KEYS / 2
local n = redis.call('UNLINK', unpack(KEYS, 1, half))
redis.call('UNLINK', unpack(KEYS, half + 1, #KEYS))
return n
"""

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_ESCAPED = re.compile(r"\\.", re.DOTALL)


def _escape_glob(text: str) -> str:
    """``text`` as a Redis MATCH glob that matches exactly itself."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class _EpochChanged(Exception):
    """A fenced script found another HOT epoch than its caller's."""


_RUN_ID = re.compile(rb"run_id:([0-9a-fA-F]+)")


def _run_id(info: bytes | str) -> str:
    """The ``run_id`` in the text of ``INFO server``."""
    found = _RUN_ID.search(info if isinstance(info, bytes) else info.encode("utf-8"))
    return found.group(1).decode("ascii") if found else ""


_META_NAMES = frozenset(_META_FIELDS)


def _is_metadata(value: Any) -> bool:
    """Metadata this module wrote: every field there, version an int, checksum a str."""
    return (type(value) is dict and _META_NAMES <= value.keys()
            and type(value["version"]) is int and type(value["checksum"]) is str)


def _corrupt_metadata() -> Metadata:
    """Metadata for a copy whose own metadata cannot be read: no payload matches
    its checksum, and its version is below every real one."""
    return {"checksum": "", "size_bytes": 0, "version": 0, "created_at": 0.0,
            "updated_at": 0.0, "expires_at": None, "encoding": "json"}


def _same_epoch(stored: bytes | str | None, epoch: str) -> bool:
    if stored is None:
        return False
    return (stored.decode("utf-8", "replace") if isinstance(stored, bytes) else stored) == epoch


def _valid(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


class _Translate:
    """The one place redis-py errors become tiered-state errors (a context manager).

    Connection loss and timeouts mean "cannot reach the server" (the manager
    may skip the tier); anything else -- a refused password, a read-only
    replica, a script error -- is a :class:`BackendError`. Messages carry the
    driver's error class and a redacted text, never a value or a password.
    """

    __slots__ = ("action", "repo")

    def __init__(self, repo: RedisStateRepository, action: str) -> None:
        self.repo = repo
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        errors = self.repo._redis.exceptions
        if not isinstance(exc, errors.RedisError):
            return
        where = self.repo._location
        if isinstance(exc, (errors.AuthenticationError, errors.AuthorizationError)):
            raise BackendError(
                f"{self.action}: Redis at {where} refused the credentials "
                f"({type(exc).__name__})", "redis"
            ) from exc
        if isinstance(exc, (errors.ConnectionError, errors.TimeoutError)):
            log.debug("redis %s: cannot reach %s: %s", self.action, where, type(exc).__name__)
            raise BackendUnavailableError(
                f"{self.action}: cannot reach Redis at {where} "
                f"({type(exc).__name__}: {redact(str(exc))[:200]})", "redis"
            ) from exc
        raise BackendError(
            f"{self.action} failed on Redis at {where} "
            f"({type(exc).__name__}: {redact(str(exc))[:200]})", "redis"
        ) from exc


class RedisStateRepository(StateRepository):
    """Records in Redis under a key prefix; see the module docstring for the format.

    :param client: a URL (``redis://``, ``rediss://``, ``unix://``) or a ready
        ``redis.Redis`` client (used as is; this repository will not close it).
    :param prefix: namespace for every key (``tiered_state:`` by default).
    :param default_ttl: seconds a record without ``expires_at`` stays in Redis
        (None: until deleted).
    :param socket_timeout: seconds to wait for a reply (URL clients only).
    :param socket_connect_timeout: seconds to wait for a connection (URL clients only).
    :param redis_options: further ``redis.Redis.from_url`` keyword arguments.
    """

    backend = "redis"
    volatile = True
    shared = True

    def __init__(
        self,
        client: str | redis.Redis = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        default_ttl: float | None = None,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **redis_options: Any,
    ) -> None:
        self._redis = require("redis", extra="redis")
        if not isinstance(prefix, str) or (prefix and not _valid(prefix)):
            raise ConfigurationError("prefix must be a str of valid key characters")
        if default_ttl is not None and (
            isinstance(default_ttl, bool) or not isinstance(default_ttl, (int, float))
            or not default_ttl > 0
        ):
            raise ConfigurationError(
                f"default_ttl must be a positive number or None, not {default_ttl!r}"
            )
        self.prefix = prefix
        self.default_ttl = default_ttl
        self._value_prefix = prefix.encode("utf-8")
        self._meta_prefix = (prefix + META_MARK).encode("utf-8")
        self._epoch_key = (prefix + EPOCH_MARK).encode("utf-8")
        #: The run id of the server the HOT guard checked its epoch on
        #: (None: no guard uses this repository as a shared HOT).
        self._server: str | None = None
        self._glob_prefix = _escape_glob(prefix)
        self._owns_client = isinstance(client, str)
        # Any: redis-py's command methods are untyped.
        self._client: Any
        if isinstance(client, str):
            redis_options.setdefault("redis_connect_func", self._on_connect)
            self._client = self._connect(
                client, socket_timeout, socket_connect_timeout, redis_options
            )
        else:
            if redis_options:
                raise ConfigurationError("redis options only apply when opening from a URL")
            self._client = client
            client.connection_pool.connection_kwargs.setdefault("redis_connect_func",
                                                                self._on_connect)
        self._location = self._describe(self._client)
        self._guards: dict[str, _Translate] = {}
        register = self._client.register_script
        self._store_script = register(_LUA_STORE)
        self._store_if_newer_script = register(_LUA_STORE_IF_NEWER)
        self._store_if_newer_in_epoch_script = register(_LUA_STORE_IF_NEWER_IN_EPOCH)
        self._store_if_version_script = register(_LUA_STORE_IF_VERSION)
        self._delete_if_version_script = register(_LUA_DELETE_IF_VERSION)
        self._delete_script = register(_LUA_DELETE)
        self._closed = False

    # ------------------------------------------------------------ opening
    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStateRepository:
        # Not config.query_options: urlunsplit turns unix:///path into unix:/path.
        base, _, qs = encode_userinfo(url).partition("?")
        query: dict[str, Any] = dict(parse_qsl(qs, keep_blank_values=True))
        query.update(options)
        prefix = query.pop("prefix", DEFAULT_PREFIX)
        ttl = parse_number(query.pop("default_ttl", None), "default_ttl", minimum=0.001)
        timeouts = {}
        for name, default in (("socket_timeout", DEFAULT_SOCKET_TIMEOUT),
                              ("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT)):
            value = parse_number(query.pop(name, default), name, minimum=0.001)
            timeouts[name] = default if value is None else value
        # Everything else is redis-py's own query option; hand it back in the URL.
        rest = urlencode({k: v for k, v in query.items() if isinstance(v, str)})
        extra = {k: v for k, v in query.items() if not isinstance(v, str)}
        return cls(base + ("?" + rest if rest else ""), prefix=str(prefix), default_ttl=ttl,
                   **timeouts, **extra)

    def _connect(
        self, url: str, socket_timeout: float, connect_timeout: float, options: dict[str, Any]
    ) -> redis.Redis:
        redis = self._redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One immediate retry on a *connection* error only: after a server
        # restart the pooled socket is dead and the retry reconnects, so the
        # caller's next call works. A timeout is not retried (redis-py's
        # default backoff would stall a caller for seconds on a dead server).
        options.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(
            redis.exceptions.ConnectionError,)))
        try:
            return redis.Redis.from_url(  # type: ignore[no-any-return]
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                **options,
            )
        except (ValueError, TypeError) as exc:
            # Not the driver's message: it may quote pieces of the URL.
            raise ConfigurationError(
                f"bad Redis URL {redact(url)!r} ({type(exc).__name__})") from None

    @staticmethod
    def _describe(client: redis.Redis) -> str:
        """Where the client points, for messages: never a password."""
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
        scheme = "rediss" if "ssl_cert_reqs" in kwargs else "redis"
        host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
        return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"

    def _run(self, script: Any, keys: Sequence[bytes], args: Sequence[Any] = ()) -> Any:
        """EVALSHA a registered script; load it if the server lost it (a restart).

        Called directly rather than through ``Script.__call__``, which costs a
        noticeable share of a single store's time.
        """
        try:
            return self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._redis.exceptions.NoScriptError:
            script.sha = self._client.script_load(script.script)
            return self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def _send(self, action: str, calls: Sequence[_Call]) -> list[Any]:
        """Send ``calls`` in one pipeline round trip; return the replies in order,
        a failed command's exception in its place.

        A call is ``(script, keys, args)`` for an EVALSHA, or ``(None, (), command)``.
        EVALSHA rather than redis-py's pipeline scripts, which first ask
        ``SCRIPT EXISTS`` (a second round trip on every batch). A call the server
        answered NOSCRIPT (it restarted) did nothing, so it is sent once more
        after its script is loaded.

        :raises BackendError: the round trip itself failed (nothing is known).
        """
        def pipeline(indexes: Iterable[int]) -> Any:
            pipe = self._client.pipeline(transaction=False)
            for i in indexes:
                script, keys, args = calls[i]
                if script is None:
                    pipe.execute_command(*args)
                else:
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return pipe

        with self._errors(action):
            replies: list[Any] = pipeline(range(len(calls))).execute(raise_on_error=False)
        lost = [i for i, reply in enumerate(replies)
                if isinstance(reply, self._redis.exceptions.NoScriptError)]
        if lost:
            try:
                with self._errors(action):
                    for script in {id(calls[i][0]): calls[i][0] for i in lost}.values():
                        script.sha = self._client.script_load(script.script)
                    again = pipeline(lost).execute(raise_on_error=False)
            except BackendError as exc:
                again = [exc] * len(lost)
            for i, reply in zip(lost, again):
                replies[i] = reply
        return replies

    def _errors(self, action: str) -> _Translate:
        guard = self._guards.get(action)
        if guard is None:
            guard = self._guards[action] = _Translate(self, action)
        return guard

    # ------------------------------------------------------------ encoding
    def _px(self, metadata: Metadata, now: float) -> int:
        """PX for a record: 0 none, -1 already expired, else milliseconds left.

        The copy goes at ``min(expires_at, hot_until)`` (``hot_until``: the
        manager's hot_ttl for a HOT copy), else after ``default_ttl``.
        """
        deadline = metadata["expires_at"]
        hot_until: float | None = metadata.get("hot_until")  # type: ignore[assignment]
        if hot_until is not None and (deadline is None or hot_until < deadline):
            deadline = hot_until
        if deadline is None:
            return 0 if self.default_ttl is None else max(1, math.ceil(self.default_ttl * 1000))
        left = deadline - now
        # Round up: Redis must not drop a record before its expires_at.
        return -1 if left <= 0 else max(1, math.ceil(left * 1000))

    @staticmethod
    def _meta_bytes(metadata: Metadata) -> bytes:
        meta = {name: metadata[name] for name in _META_FIELDS}  # type: ignore[literal-required]
        if "hot_until" in metadata:
            meta["hot_until"] = metadata["hot_until"]  # type: ignore[typeddict-item]
        return _dumps(meta)

    def _entry(
        self, key: str, payload: bytes | str | None, meta: bytes | str | None
    ) -> Entry | None:
        if payload is None or meta is None:
            return None  # half a record: expiring right now, or written by hand
        if isinstance(payload, bytes):
            # "replace" keeps a corrupted payload readable as text; its
            # checksum then fails and the manager uses another copy.
            payload = payload.decode("utf-8", "replace")
        try:
            metadata = _loads(meta)
            if not _is_metadata(metadata):
                raise ValueError("not metadata this library wrote")
        except (ValueError, TypeError):
            # A corrupt record, not an absent one: it fails its checksum, so
            # the manager counts it, uses the catalog and replaces this copy
            # (version 0 yields to any write).
            log.warning("redis: unreadable metadata for a key under prefix %r", self.prefix)
            return Entry(key, payload, _corrupt_metadata())
        return Entry(key, payload, metadata)

    # ------------------------------------------------------------ the seven
    def fetch_record(self, key: str) -> Entry | None:
        raw = validate_key(key).encode("utf-8")
        with self._errors("fetch"):
            payload, meta = self._client.execute_command(
                "MGET", self._value_prefix + raw, self._meta_prefix + raw
            )
        return self._entry(key, payload, meta)

    def fetch(self, key: str) -> Any | None:
        return live_value(self.fetch_record(key))

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        raw = validate_key(key).encode("utf-8")
        keys = (self._value_prefix + raw, self._meta_prefix + raw)
        meta = self._meta_bytes(metadata)
        px = self._px(metadata, time.time())
        with self._errors("store"):
            if px == 0:
                # MSET is atomic and clears any TTL an older copy had.
                self._client.execute_command("MSET", keys[0], value, keys[1], meta)
            elif px < 0:
                self._client.execute_command("UNLINK", *keys)
            else:
                self._run(self._store_script, keys, (value, meta, px))
        return True

    def delete(self, key: str) -> bool:
        raw = validate_key(key).encode("utf-8")
        with self._errors("delete"):
            count = self._client.execute_command(
                "UNLINK", self._value_prefix + raw, self._meta_prefix + raw
            )
        return bool(count)

    def keys(self, pattern: str = "*") -> list[str]:
        # SCAN may return a key twice while Redis rehashes; the set drops that.
        return list(dict.fromkeys(self.iter_keys(pattern)))

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        validate_pattern(pattern)
        if is_literal(pattern):
            return self._literal_key(literal_prefix(pattern))
        return self._scan_keys(pattern)

    def _literal_key(self, key: str) -> Iterator[str]:
        try:
            raw = validate_key(key).encode("utf-8")
        except ValueError:
            return
        with self._errors("keys"):
            both = self._client.execute_command(
                "EXISTS", self._value_prefix + raw, self._meta_prefix + raw
            )
        if both == 2:
            yield key

    def _match_glob(self, pattern: str) -> str:
        """The SCAN MATCH glob: never narrower than ``pattern``, usually exact.

        Redis globs match bytes, so ``?`` and ``[...]`` would miss a multi-byte
        UTF-8 character; such patterns scan the literal prefix and the
        reference matcher filters.
        """
        body = to_redis(pattern)
        bare = _ESCAPED.sub("", body)
        if "?" in bare or "[" in bare:
            body = _escape_glob(literal_prefix(pattern)) + "*"
        if body == "*":
            # Keys are never empty and never start with a control character,
            # so this skips the metadata keys on the server side.
            body = "[^\x1f]*"
        return self._glob_prefix + body

    def _scan_keys(self, pattern: str) -> Iterator[str]:
        match = compile_pattern(pattern).match
        start = len(self._value_prefix)
        mark = META_MARK.encode("utf-8")
        scan = self._client.scan
        cursor = 0
        glob = self._match_glob(pattern)
        while True:
            with self._errors("keys"):
                cursor, batch = scan(cursor, match=glob, count=SCAN_COUNT)
            for raw in batch:
                rest = raw[start:] if isinstance(raw, bytes) else raw.encode("utf-8")[start:]
                if rest.startswith(mark):
                    continue
                try:
                    key = validate_key(rest.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    continue  # not a key this library could have written
                if match(key):
                    yield key
            if not cursor:
                return

    def stats(self) -> dict[str, Any]:
        count = 0
        glob = self._glob_prefix + "[^\x1f]*"
        with self._errors("stats"):
            for _ in self._client.scan_iter(match=glob, count=SCAN_COUNT):
                count += 1
            memory = self._client.info("memory")
            server = self._client.info("server")
            dbsize = self._client.dbsize()
        return {
            "backend": self.backend,
            "tier": str(self.tier) if self.tier else None,
            "key_count": count,
            "prefix": self.prefix,
            "default_ttl": self.default_ttl,
            "server": self._location,
            "redis_version": server.get("redis_version"),
            "used_memory": memory.get("used_memory"),
            "used_memory_human": memory.get("used_memory_human"),
            "maxmemory": memory.get("maxmemory"),
            "maxmemory_policy": memory.get("maxmemory_policy"),
            "db_keys": dbsize,
        }

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        succeeded: list[str] = []
        failed: dict[str, BaseException] = {}
        parts = list(chunked(items.items(), PIPELINE_RECORDS))
        for n, part in enumerate(parts):
            try:
                failed.update(self._store_pipeline(part, succeeded))
            except BackendError as exc:
                if not n:
                    raise  # nothing happened: Redis is down, say so plainly
                for later in parts[n:]:
                    failed.update((k, exc) for k, _ in later)
                break
        if failed:
            raise self._batch_failed("store_many", failed, succeeded)
        return set(items)

    def _store_pipeline(
        self, part: list[tuple[str, tuple[str, Metadata]]], succeeded: list[str]
    ) -> dict[str, BaseException]:
        """Store up to PIPELINE_RECORDS records in one round trip, grouped by TTL.

        MSET for records without expiry, one Lua call per chunk of records
        with a PX, UNLINK for records already expired: each record's two keys
        change in one atomic command. Appends the stored keys to
        ``succeeded`` and returns the failed ones.
        """
        now = time.time()
        vp, mp = self._value_prefix, self._meta_prefix
        plain: list[tuple[str, bytes, str, bytes]] = []
        timed: list[tuple[str, bytes, str, bytes, int]] = []
        expired: list[tuple[str, bytes]] = []
        for key, (payload, metadata) in part:
            raw = key.encode("utf-8")
            px = self._px(metadata, now)
            if px == 0:
                plain.append((key, raw, payload, self._meta_bytes(metadata)))
            elif px > 0:
                timed.append((key, raw, payload, self._meta_bytes(metadata), px))
            else:
                expired.append((key, raw))
        calls: list[_Call] = []
        groups: list[list[str]] = []
        for chunk in chunked(plain, CHUNK):
            args: list[bytes | str] = ["MSET"]
            for _, raw, payload, meta in chunk:
                args += (vp + raw, payload, mp + raw, meta)
            calls.append((None, (), args))
            groups.append([c[0] for c in chunk])
        for tchunk in chunked(timed, CHUNK):
            keys: list[bytes] = []
            targs: list[bytes | str | int] = []
            for _, raw, payload, meta, px in tchunk:
                keys += (vp + raw, mp + raw)
                targs += (payload, meta, px)
            calls.append((self._store_script, keys, targs))
            groups.append([c[0] for c in tchunk])
        for echunk in chunked(expired, CHUNK):
            calls.append((None, (), ["UNLINK", *(p + raw for _, raw in echunk for p in (vp, mp))]))
            groups.append([c[0] for c in echunk])
        failed: dict[str, BaseException] = {}
        for keys_of, result in zip(groups, self._send("store_many", calls)):
            if isinstance(result, Exception):
                failed.update((k, result) for k in keys_of)
            else:
                succeeded.extend(keys_of)
        return failed

    def delete_many(self, keys: Iterable[str]) -> int:
        unique = list(dict.fromkeys(validate_key(k) for k in keys))
        vp, mp = self._value_prefix, self._meta_prefix
        chunks = list(chunked(unique, CHUNK))
        calls: list[_Call] = []
        for chunk in chunks:
            raws = [k.encode("utf-8") for k in chunk]
            calls.append((self._delete_script, [vp + r for r in raws] + [mp + r for r in raws], ()))
        total = 0
        done: list[str] = []
        failed: dict[str, BaseException] = {}
        for chunk, reply in zip(chunks, self._send("delete_many", calls) if calls else ()):
            if isinstance(reply, Exception):
                failed.update((k, reply) for k in chunk)
            else:
                total += reply
                done.extend(chunk)
        if failed:
            raise self._batch_failed("delete_many", failed, done)
        return total

    # ------------------------------------------------------------ native extras
    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        found = self._fetch_many(keys, None)
        assert found is not None  # unfenced reads always answer
        return found

    def _fetch_many(self, keys: Iterable[str], epoch: str | None) -> dict[str, Entry] | None:
        """MGET the records; with ``epoch``, each MGET also reads the epoch key,
        and the answer is None if any of them found another epoch."""
        unique = list(dict.fromkeys(validate_key(k) for k in keys))
        if not unique:
            return {}
        vp, mp = self._value_prefix, self._meta_prefix
        fence = () if epoch is None else (self._epoch_key,)
        chunks = list(chunked(unique, CHUNK))
        with self._errors("fetch_many"):
            pipe = self._client.pipeline(transaction=False) if len(chunks) > 1 else None
            replies = []
            for chunk in chunks:
                args: list[bytes] = [*fence]
                for k in chunk:
                    raw = k.encode("utf-8")
                    args += (vp + raw, mp + raw)
                if pipe is None:
                    replies.append(self._client.execute_command("MGET", *args))
                else:
                    pipe.execute_command("MGET", *args)
            if pipe is not None:
                replies = pipe.execute()
        if epoch is not None:
            if any(not _same_epoch(values[0], epoch) for values in replies):
                return None
            replies = [values[1:] for values in replies]
        out: dict[str, Entry] = {}
        loads = _loads
        for chunk, values in zip(chunks, replies):
            pairs = iter(values)
            for key, payload, meta in zip(chunk, pairs, pairs):
                if payload is None or meta is None:
                    continue
                # The common case inline (this loop is the cost of a batch
                # read); anything unusual goes through _entry's checks.
                if type(payload) is bytes:
                    try:
                        metadata = loads(meta)
                    except ValueError:
                        metadata = None
                    if _is_metadata(metadata):
                        out[key] = Entry(key, payload.decode("utf-8", "replace"), metadata)  # type: ignore[arg-type]
                        continue
                found = self._entry(key, payload, meta)
                if found is not None:
                    out[key] = found
        return out

    # A single conditional write runs its batch form's script on one record,
    # sent as a plain EVALSHA: a pipeline would cost it more than the script.
    def _conditional(self, action: str, script: Any, key: str, args: tuple[Any, ...]) -> bool:
        raw = validate_key(key).encode("utf-8")
        with self._errors(action):
            done = self._run(script, (self._value_prefix + raw, self._meta_prefix + raw), args)
        return bool(done)

    def _store_args(self, value: str, metadata: Metadata, now: float) -> tuple[Any, ...]:
        """The ARGV of one record for the conditional store scripts."""
        return value, self._meta_bytes(metadata), self._px(metadata, now), int(metadata["version"])

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        args = self._store_args(value, metadata, time.time())
        return self._conditional("store_if_newer", self._store_if_newer_script, key, args)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        args = (*self._store_args(value, metadata, time.time()), int(expected))
        return self._conditional("store_if_version", self._store_if_version_script, key, args)

    def delete_if_version(self, key: str, version: int) -> bool:
        return self._conditional("delete_if_version", self._delete_if_version_script, key,
                                 (int(version),))

    def store_many_if_newer(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        now = time.time()
        rows = [(key, self._store_args(payload, md, now)) for key, (payload, md) in items.items()]
        return self._conditional_many("store_many_if_newer", self._store_if_newer_script, rows)

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        for key in items:
            validate_key(key)
        now = time.time()
        rows = [(key, (*self._store_args(payload, md, now), int(expected[key])))
                for key, (payload, md) in items.items()]
        return self._conditional_many("store_many_if_version", self._store_if_version_script, rows)

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        rows = [(validate_key(k), (int(v),)) for k, v in versions.items()]
        return self._conditional_many("delete_many_if_version", self._delete_if_version_script,
                                      rows)

    def _conditional_many(
        self, action: str, script: Any, rows: list[tuple[str, tuple[Any, ...]]],
        epoch: str | None = None,
    ) -> set[str]:
        """Run a conditional script over ``(key, its ARGV)`` rows: CHUNK records
        per call, PIPELINE_RECORDS records per round trip (one, for any batch the
        manager sends). Returns the keys the script wrote or deleted.

        With ``epoch`` (a fenced script), a call that found another epoch
        answers -1 and its records are refused (:class:`_EpochChanged`).

        :raises BatchError: some calls failed; ``.failed`` names their keys,
            ``.succeeded`` the keys written or deleted (a refused key is in neither).
        """
        vp, mp = self._value_prefix, self._meta_prefix
        fence: tuple[tuple[bytes, ...], tuple[str, ...]] = ((), ()) if epoch is None else (
            (self._epoch_key,), (epoch,))
        moved_on = False
        done: set[str] = set()
        failed: dict[str, BaseException] = {}
        parts = list(chunked(rows, PIPELINE_RECORDS))
        for n, part in enumerate(parts):
            chunks = list(chunked(part, CHUNK))
            calls: list[_Call] = []
            for chunk in chunks:
                keys: list[bytes] = []
                args: list[Any] = []
                for key, argv in chunk:
                    raw = key.encode("utf-8")
                    keys += (vp + raw, mp + raw)
                    args += argv
                calls.append((script, keys + list(fence[0]), args + list(fence[1])))
            try:
                replies = self._send(action, calls)
            except BackendError as exc:
                if not n:
                    raise  # the first round trip failed: say so as a single call would
                for later in parts[n:]:
                    failed.update((k, exc) for k, _ in later)
                break
            for chunk, reply in zip(chunks, replies):
                if isinstance(reply, Exception):
                    failed.update((k, reply) for k, _ in chunk)
                elif reply == -1:
                    moved_on = True
                else:
                    done.update(chunk[i - 1][0] for i in reply)
        if failed:
            raise self._batch_failed(action, failed, done)
        if moved_on:
            raise _EpochChanged
        return done

    # ------------------------------------------------------------ the HOT epoch
    # A shared HOT must never serve or take in a copy that may have missed an
    # invalidation: after a flush (FLUSHALL, or the guard's own after an
    # outage), a server restarted from an old snapshot, a failover to a
    # replica. The guard keeps an *epoch*: a random token stored under the
    # prefix and recorded, with the server's run id, in the catalog. Reads
    # fetch the epoch key with the records, copies go in only under the epoch
    # their reader checked, and a flush deletes the epoch key first. A new
    # connection to a server other than the one the guard checked deletes
    # the epoch key before it carries any command (:meth:`_on_connect`), so a
    # restored snapshot's epoch key -- the right token, on the wrong data --
    # is never believed.
    def _on_connect(self, connection: Any) -> None:
        connection.on_connect()
        trusted = self._server
        if trusted is None:
            return
        connection.send_command("INFO", "server")
        server = _run_id(connection.read_response())
        if server == trusted:
            return
        log.warning("redis at %s is another server than before (a restart or a failover): "
                    "its copies are not trusted until the next check", self._location)
        connection.send_command("DEL", self._epoch_key)
        try:
            connection.read_response()
        except self._redis.exceptions.ResponseError as exc:  # a replica: READONLY
            raise self._redis.exceptions.ConnectionError(
                f"cannot reset the HOT epoch on a changed server ({type(exc).__name__})") from None

    def epoch_state(self) -> tuple[str, str | None]:
        """The server's run id and the epoch stored under the prefix (None: none)."""
        with self._errors("epoch"):
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command("INFO", "server")
            pipe.execute_command("GET", self._epoch_key)
            info, epoch = pipe.execute()
        if isinstance(epoch, bytes):
            epoch = epoch.decode("utf-8", "replace")
        return str(info.get("run_id", "")), epoch

    def trust_server(self, server: str) -> None:
        """From now on, a new connection to any server but ``server`` resets the epoch."""
        self._server = server

    def reset_epoch(self, epoch: str) -> int:
        """Flush the prefix and start ``epoch``; returns how many records went.

        The old epoch key goes first, so every fenced write still under way
        is refused from that moment, before any record is deleted.
        """
        with self._errors("reset_epoch"):
            self._client.execute_command("DEL", self._epoch_key)
        flushed = self.clear()
        with self._errors("reset_epoch"):
            self._client.execute_command("SET", self._epoch_key, epoch)
        return flushed

    def fetch_record_in_epoch(self, key: str, epoch: str) -> tuple[bool, Entry | None]:
        """``(True, fetch_record(key))`` if the stored epoch is ``epoch``, else ``(False, None)``."""
        raw = validate_key(key).encode("utf-8")
        with self._errors("fetch"):
            stored, payload, meta = self._client.execute_command(
                "MGET", self._epoch_key, self._value_prefix + raw, self._meta_prefix + raw
            )
        if not _same_epoch(stored, epoch):
            return False, None
        return True, self._entry(key, payload, meta)

    def fetch_many_in_epoch(self, keys: Iterable[str], epoch: str) -> dict[str, Entry] | None:
        """``fetch_many(keys)`` if the stored epoch is ``epoch``, else None."""
        return self._fetch_many(keys, epoch)

    def store_if_newer_in_epoch(self, key: str, value: str, metadata: Metadata,
                                epoch: str) -> bool | None:
        """``store_if_newer`` if the stored epoch is ``epoch``, else None (one EVALSHA)."""
        raw = validate_key(key).encode("utf-8")
        args = (*self._store_args(value, metadata, time.time()), epoch)
        with self._errors("store_if_newer"):
            done = self._run(self._store_if_newer_in_epoch_script,
                             (self._value_prefix + raw, self._meta_prefix + raw, self._epoch_key),
                             args)
        return None if done == -1 else bool(done)

    def store_many_if_newer_in_epoch(self, items: Items, epoch: str) -> set[str] | None:
        """``store_many_if_newer(items)`` if the stored epoch is ``epoch``, else None
        (records of an earlier chunk may have gone in before the epoch moved on:
        whatever moved it flushed them, or will)."""
        for key in items:
            validate_key(key)
        now = time.time()
        rows = [(key, self._store_args(payload, md, now)) for key, (payload, md) in items.items()]
        try:
            return self._conditional_many("store_many_if_newer", self._store_if_newer_in_epoch_script,
                                          rows, epoch)
        except _EpochChanged:
            return None

    def clear(self) -> int:
        """Delete every record under this prefix (other prefixes are untouched)."""
        glob = self._glob_prefix + "*"
        start = len(self._value_prefix)
        total = 0
        with self._errors("clear"):
            for chunk in chunked(self._client.scan_iter(match=glob, count=SCAN_COUNT), SCAN_COUNT):
                raws = [r if isinstance(r, bytes) else r.encode("utf-8") for r in chunk]
                # Metadata keys and the epoch key start with a control character.
                values = [r for r in raws if r[start:start + 1] != b"\x1f"]
                metas = [r for r in raws if r[start:start + 1] == b"\x1f"]
                pipe = self._client.pipeline(transaction=False)
                if values:
                    pipe.execute_command("UNLINK", *values)
                if metas:
                    pipe.execute_command("UNLINK", *metas)
                results = pipe.execute()
                total += int(results[0]) if values else 0
        return total

    def ping(self) -> float:
        start = time.perf_counter()
        with self._errors("ping"):
            self._client.ping()
        return (time.perf_counter() - start) * 1000.0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()

    @property
    def client(self) -> redis.Redis:
        """The underlying ``redis.Redis`` client (for direct access)."""
        client: redis.Redis = self._client
        return client

    def __repr__(self) -> str:
        return f"<RedisStateRepository {self._location} prefix={self.prefix!r} tier={self.tier}>"

