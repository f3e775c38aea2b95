"""``postgresql://`` -- PostgreSQL through psycopg2 (the server WARM tier).

URL: any libpq URI, ``postgresql://user:password@host:5432/dbname`` (also
``postgres://`` and ``postgresql+psycopg2://``), plus these query options:

=====================  ===========================================================
``table``              table name, default ``tiered_state``; ``schema.table`` is
                       allowed. Each part must match ``[A-Za-z_][A-Za-z0-9_]*``
                       (table name at most 48 characters, so index names fit);
                       it is quoted, so case is kept.
``statement_timeout``  seconds a statement may run (server side), default 30;
                       ``0`` or ``none``: no limit.
``connect_timeout``    libpq's option, in whole seconds; default 3 (libpq's
                       minimum is 2).
``pool_size``          most connections open at once, default 10.
``pool_timeout``       seconds a call waits for a free connection, default 10.
=====================  ===========================================================

Every other query option (``sslmode``, ``application_name``, ``options``,
``keepalives_idle``...) goes to libpq unchanged, exactly as written (libpq
decodes ``%20``, never ``+``: ``?options=-c%20work_mem%3D64MB``). A
``-c statement_timeout`` in ``options`` wins over ``statement_timeout``.
A password may hold a raw ``/`` or ``@``: the user info runs to the last
``@`` before the query (see :func:`tiered_state.config.encode_userinfo`).

Storage: one table, created on first use (``CREATE TABLE IF NOT EXISTS``
under an advisory lock, so processes starting together do not trip over
each other)::

    key            TEXT COLLATE "C" PRIMARY KEY
    data           JSONB          the value, queryable (NULL when payload is set)
    payload        TEXT           the exact JSON text, only for values JSONB
                                  cannot hold exactly (see below); a stub's
                                  locator or a tombstone's empty text; else NULL
    checksum       TEXT           sha256 hex of the canonical JSON text (of the
                                  value a stub stands for)
    size_bytes     INTEGER
    version        BIGINT
    created_at     TIMESTAMPTZ
    updated_at     TIMESTAMPTZ
    last_accessed  TIMESTAMPTZ    last read reported by touch_many; NULL = never
    expires_at     TIMESTAMPTZ    NULL = never
    encoding       TEXT           the value's codec ("json", "typed-json"...);
                                  "stub" or "tombstone" for those kinds

with indexes on ``(expires_at, key)`` and
``(greatest(updated_at, last_accessed), key)`` for the sweep. ``COLLATE "C"``
makes key order byte order and lets ``LIKE 'prefix%'`` use the primary key.

JSONB normalises JSON text (key order, spaces, number spelling), so the text
read back is not the text stored. On read the value is re-encoded with
:func:`tiered_state.codec.encode` (canonical JSON), which is exactly the text
the manager checksummed, so the checksum still verifies. (Every codec's
payload that is JSON goes this way: ``typed-json`` text is canonical JSON
too, so its tags are queryable in ``data``.) Text that would not
come back byte-identical -- strings holding ``\\u0000`` (JSONB refuses them),
floats spelled with a positive exponent (``1e+300`` reads back as an
integer), ``-0.0``, or any payload that is not canonical JSON -- is kept
verbatim in ``payload`` with ``data`` NULL. Nothing is ever returned altered.

Stubs and tombstones (see :mod:`tiered_state.record`) are stored verbatim
in ``payload`` with ``data`` NULL: a locator is not the value, so it never
shows up in queries of ``data``. :meth:`fetch` returns None for them.

Reads never write. Expired rows and tombstones stay (returned by
:meth:`fetch_record`) until the manager's sweep deletes them.

Batch conditionals (``store_many_if_newer``, ``store_many_if_version``):
below 64 rows one upsert over ``unnest`` of one array parameter per column,
one round trip; from 64 rows a COPY into the session's staging table and one
upsert from it, in one transaction. The statement's ``RETURNING`` list is
exactly the keys written.

Locking: every write of several rows (the batch conditionals, ``store_many``,
``delete_many``, ``delete_many_if_version``, ``touch_many``, ``clear``) takes
its rows' locks in key order, one key at a time -- in the statement's own
row order, or in a ``SELECT ... ORDER BY key FOR UPDATE`` ahead of a
``DELETE`` / ``UPDATE`` (which would lock in scan order) -- so writes cannot
deadlock one another. A write that still loses a deadlock (to another
program's transaction) or a serialization conflict (under ``SERIALIZABLE``
or ``REPEATABLE READ``) was rolled back whole; it runs again, up to five
times in all, after a short jittered pause.

Errors: a wrong role or password (SQLSTATE 28000 / 28P01), a database that
does not exist (3D000), a missing privilege (42501), or a libpq or server
setting refused at connect (``sslmode``, ``options``...) is a
``ConfigurationError`` that says what the server said and what to check,
with the URL redacted. A failed connection carries no SQLSTATE, so there the
server's (English) message decides; a server set to another ``lc_messages``
has these reported as unavailable. A server that is down, refuses the
connection or times out is a ``BackendUnavailableError``; any other failed
statement a ``BackendError``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import re
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import quote, unquote

from .. import codec
from ..config import encode_userinfo, parse_number, redact, require, unknown_options
from ..errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    IntegrityError,
    SerializationError,
)
from ..keys import (
    has_class,
    is_literal,
    literal_prefix,
    matches,
    to_like,
    validate_key,
    validate_pattern,
)
from ..record import STUB, TOMBSTONE, Entry, Metadata, checksum
from .base import Items, StateRepository, chunked

if TYPE_CHECKING:
    from psycopg2.extensions import connection as Connection
    from psycopg2.extensions import cursor as Cursor

__all__ = ["PostgresStateRepository"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_TABLE = 48  # + "_expires_idx" stays within PostgreSQL's 63-byte names
_OPTIONS = {"table", "statement_timeout", "connect_timeout", "pool_size", "pool_timeout"}
#: Runs of a write that lost a deadlock or a serialization conflict, in all.
_ATTEMPTS = 5
#: SQLSTATEs of those: serialization_failure, deadlock_detected.
_RETRIED = frozenset({"40001", "40P01"})
#: Seconds before the second run, doubled each time after (x0.5-1.5 jitter).
_BACKOFF = 0.01
#: Rows per statement for ANY(...) lists and COPY chunks.
_CHUNK = 1000
#: Batches up to this size go as one INSERT ... VALUES; larger ones through
#: COPY into a temporary table and one INSERT ... SELECT (measured ~2.5x faster
#: at 10k rows, but three more round trips, which only pay off past a few rows).
_COPY_MIN = 32
#: The batch conditionals go through unnest below this size, through COPY
#: from it on (measured: unnest ahead up to 32 rows, level at 64, behind from 128).
_UNNEST_MAX = 64
#: A cheap test for text JSONB may not give back byte-identical: a NUL escape,
#: a positive exponent, negative zero. A hit triggers the exact check.
_SUSPECT = re.compile(r"\\u0000|[0-9][eE]\+|-0\.0(?![0-9eE])").search
#: COPY text format escapes; canonical JSON holds no raw tab/newline/CR.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
#: Connections a forked child inherited: never closed there (closing would end
#: the parent's session too), just kept referenced so their finaliser never runs.
_INHERITED: list[Any] = []
#: The encoder :func:`tiered_state.codec.encode` uses (same settings; a test
#: holds them equal). Decoded JSON needs none of encode's input checks.
_canonical = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
).encode

_COLUMNS = (
    "key, data::text, payload, checksum, size_bytes, version, date_part('epoch', created_at), "
    "date_part('epoch', updated_at), date_part('epoch', expires_at), encoding"
)
_LIVE = "(expires_at IS NULL OR expires_at > to_timestamp(%s))"
#: ``encoding`` of the entries that hold no value (see :mod:`tiered_state.record`).
_NOT_VALUE = f"('{STUB}', '{TOMBSTONE}')"
_SET_ALL = (
    "data = excluded.data, payload = excluded.payload, checksum = excluded.checksum, "
    "size_bytes = excluded.size_bytes, version = excluded.version, "
    "created_at = excluded.created_at, updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at, encoding = excluded.encoding"
)
_INSERT = (
    "INSERT INTO {t} AS cur (key, data, payload, checksum, size_bytes, version, "
    "created_at, updated_at, expires_at, encoding) "
)
_ROW = "(%s, %s::jsonb, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s), to_timestamp(%s), %s)"
_UPSERT = _INSERT + "VALUES " + _ROW + " ON CONFLICT (key) DO UPDATE SET " + _SET_ALL

# The batch conditionals read their rows from one of two sources: small
# batches from ``unnest`` of one array parameter per column (one statement,
# one round trip), large ones from the COPY staging table (see _UNNEST_MAX).
_V_COLUMNS = (
    "key, data, payload, checksum, size_bytes, version, created_at, updated_at, expires_at, encoding"
)
_V_ARRAYS = (
    "%s::text[], %s::jsonb[], %s::text[], %s::text[], %s::integer[], %s::bigint[], "
    "%s::float8[], %s::float8[], %s::float8[], %s::text[]"
)
_UNNEST = f"unnest({_V_ARRAYS}) AS u({_V_COLUMNS})"
_UNNEST_EXPECTED = f"unnest({_V_ARRAYS}, %s::bigint[]) AS u({_V_COLUMNS}, expected)"
_STAGED = "tiered_state_load"
_SELECT_V = (
    "SELECT key, data, payload, checksum, size_bytes, version, to_timestamp(created_at), "
    "to_timestamp(updated_at), to_timestamp(expires_at), encoding"
)


def _if_newer_many(source: str) -> str:
    """store_many_if_newer's statement, rows from ``source``.

    Rows are written in key order (the primary key's "C" collation, which is
    also Python's str order), so concurrent batches cannot deadlock.
    """
    return (
        f'{_INSERT}{_SELECT_V} FROM {source} ORDER BY key COLLATE "C" '
        f"ON CONFLICT (key) DO UPDATE SET {_SET_ALL} "
        "WHERE cur.version < excluded.version RETURNING cur.key"
    )


def _if_version_many(source: str) -> str:
    """store_many_if_version's statement, rows and ``expected`` from ``source``.

    One upsert over every row in key order, so it takes each key's lock at
    that key's turn, like every other batch (an UPDATE for expected > 0 and
    an upsert for expected 0 would lock the one group, then the other, and
    deadlocked against a store_many_if_newer in testing). A row with expected
    0 is inserted, or replaces a row that is not live and not newer. A row
    with expected > 0 goes on only if its key has a live row of that version
    and not newer, which the EXISTS locks (at that row's turn: the CTE is
    materialised in key order and the filter runs as each row is inserted);
    its insert then always meets that row, and its ``last_accessed`` (never
    stored: the upsert does not set that column) tells the conflict clause
    that the check was made.
    """
    return (
        f'WITH v AS MATERIALIZED (SELECT * FROM {source} ORDER BY key COLLATE "C") '
        "INSERT INTO {t} AS cur (key, data, payload, checksum, size_bytes, version, created_at, "
        "updated_at, expires_at, encoding, last_accessed) "
        f"{_SELECT_V}, CASE WHEN expected <> 0 THEN '-infinity'::timestamptz END FROM v "
        "WHERE v.expected = 0 OR EXISTS (SELECT 1 FROM {t} AS x WHERE x.key = v.key "
        "AND x.version = v.expected AND x.version <= v.version "
        "AND (x.expires_at IS NULL OR x.expires_at > to_timestamp(%s)) FOR UPDATE) "
        f"ON CONFLICT (key) DO UPDATE SET {_SET_ALL} "
        "WHERE excluded.last_accessed IS NOT NULL OR (cur.expires_at IS NOT NULL "
        "AND cur.expires_at <= to_timestamp(%s) AND cur.version <= excluded.version) "
        "RETURNING cur.key"
    )


_STORE_TYPES = "text, jsonb, text, text, integer, bigint, float8, float8, float8, text"
_STORE_TEXT = (
    _INSERT + "VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7), to_timestamp($8), "
    "to_timestamp($9), $10) ON CONFLICT (key) DO UPDATE SET " + _SET_ALL
)

# Hot single-key statements are PREPAREd once per connection: parse and plan
# dominate a point query's server time.
_PREPARED = {
    # Only a live value: stubs and tombstones hold no value here.
    "fetch": ("text, float8", "SELECT data::text, payload, checksum, encoding FROM {t} WHERE key = $1 "
              "AND (expires_at IS NULL OR expires_at > to_timestamp($2)) "
              f"AND encoding NOT IN {_NOT_VALUE}"),
    "select": ("text", f"SELECT {_COLUMNS} FROM {{t}} WHERE key = $1"),
    "store": (_STORE_TYPES, _STORE_TEXT),
    # The manager's write path: every set is a store_if_newer.
    "store_if_newer": (_STORE_TYPES, _STORE_TEXT + " WHERE cur.version < excluded.version"),
    "delete": ("text", "DELETE FROM {t} WHERE key = $1"),
    "delete_if_version": ("text, bigint", "DELETE FROM {t} WHERE key = $1 AND version = $2"),
}

_SQL = {
    "schema": """
        CREATE TABLE IF NOT EXISTS {t} (
            key TEXT COLLATE "C" PRIMARY KEY,
            data JSONB,
            payload TEXT,
            checksum TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            version BIGINT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            last_accessed TIMESTAMPTZ,
            expires_at TIMESTAMPTZ,
            encoding TEXT NOT NULL DEFAULT 'json',
            CHECK ((data IS NULL) <> (payload IS NULL))
        );
        CREATE INDEX IF NOT EXISTS {expires_idx} ON {t} (expires_at, key)
            WHERE expires_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS {idle_idx} ON {t} ((greatest(updated_at, last_accessed)), key);
    """,
    "select_many": f"SELECT {_COLUMNS} FROM {{t}} WHERE key = ANY(%s)",
    "store_values": _INSERT + "VALUES %s ON CONFLICT (key) DO UPDATE SET " + _SET_ALL,
    "store_copied": _INSERT
    + "SELECT key, data, payload, checksum, size_bytes, version, to_timestamp(created_at), "
    "to_timestamp(updated_at), to_timestamp(expires_at), encoding FROM tiered_state_load "
    # The staging column has the database's collation; the primary key's
    # order is "C", the order every batch locks rows in.
    'ORDER BY key COLLATE "C" ON CONFLICT (key) DO UPDATE SET ' + _SET_ALL,
    # expected 0: absent, or present but not live (a tombstone's expires_at is
    # 0.0) -- and never older than what is stored.
    "store_if_absent": _UPSERT
    + " WHERE cur.expires_at IS NOT NULL AND cur.expires_at <= to_timestamp(%s)"
    " AND cur.version <= excluded.version",
    "store_if_version": "UPDATE {t} SET data = %s::jsonb, payload = %s, checksum = %s, "
    "size_bytes = %s, version = %s, created_at = to_timestamp(%s), "
    "updated_at = to_timestamp(%s), expires_at = to_timestamp(%s), encoding = %s "
    f"WHERE key = %s AND version = %s AND version <= %s AND {_LIVE}",
    "store_many_if_newer": _if_newer_many(_UNNEST),
    "store_many_if_newer_copied": _if_newer_many(_STAGED),
    "store_many_if_version": _if_version_many(_UNNEST_EXPECTED),
    "store_many_if_version_copied": _if_version_many(_STAGED),
    # A DELETE or UPDATE locks rows in plan order (a sequential scan: the
    # physical order). delete_many, delete_many_if_version, touch_many and
    # clear lock theirs in key order first, in a CTE (the lock is taken
    # above the sort), so the statement itself only meets rows it holds.
    "delete_many": "WITH d AS MATERIALIZED (SELECT key FROM {t} WHERE key = ANY(%s) "
    "ORDER BY key FOR UPDATE) DELETE FROM {t} AS cur USING d WHERE cur.key = d.key",
    "delete_many_if_version": "WITH d AS MATERIALIZED (SELECT x.key FROM {t} AS x "
    "JOIN unnest(%s::text[], %s::bigint[]) AS u(key, version) "
    "ON x.key = u.key AND x.version = u.version ORDER BY x.key FOR UPDATE OF x) "
    "DELETE FROM {t} AS cur USING d WHERE cur.key = d.key RETURNING cur.key",
    "keys": f"SELECT key FROM {{t}} WHERE key LIKE %s ESCAPE '\\' AND {_LIVE}",
    "key": f"SELECT key FROM {{t}} WHERE key = %s AND {_LIVE}",
    "keys_page": f"SELECT key FROM {{t}} WHERE key > %s AND key LIKE %s ESCAPE '\\' AND {_LIVE} "
    "ORDER BY key LIMIT %s",
    "all_keys_page": "SELECT key FROM {t} WHERE key > %s ORDER BY key LIMIT %s",
    "scan_expired": f"SELECT {_COLUMNS}, expires_at FROM {{t}} "
    "WHERE expires_at <= to_timestamp(%s) AND (expires_at, key) > (%s, %s) "
    "ORDER BY expires_at, key LIMIT %s",
    # Idle candidates are live values only: a stub's payload already moved.
    "scan_idle": f"SELECT {_COLUMNS}, greatest(updated_at, last_accessed) FROM {{t}} "
    f"WHERE greatest(updated_at, last_accessed) < to_timestamp(%s) AND {_LIVE} "
    f"AND encoding NOT IN {_NOT_VALUE} "
    "AND (greatest(updated_at, last_accessed), key) > (%s, %s) "
    "ORDER BY greatest(updated_at, last_accessed), key LIMIT %s",
    # NO KEY UPDATE: the lock the UPDATE itself takes.
    "touch_many": "WITH l AS MATERIALIZED (SELECT key FROM {t} WHERE key = ANY(%s) "
    "ORDER BY key FOR NO KEY UPDATE) UPDATE {t} AS cur "
    "SET last_accessed = greatest(cur.last_accessed, to_timestamp(%s)) "
    "FROM l WHERE cur.key = l.key",
    "clear": "WITH d AS MATERIALIZED (SELECT key FROM {t} ORDER BY key FOR UPDATE) "
    "DELETE FROM {t} AS cur USING d WHERE cur.key = d.key",
    "stats": f"SELECT count(*) FILTER (WHERE {_LIVE}), count(*), coalesce(sum(size_bytes), 0), "
    "pg_total_relation_size(%s::regclass) FROM {t}",
}
_TEMP_TABLE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS tiered_state_load (key TEXT, data JSONB, "
    "payload TEXT, checksum TEXT, size_bytes INTEGER, version BIGINT, created_at FLOAT8, "
    "updated_at FLOAT8, expires_at FLOAT8, encoding TEXT, expected BIGINT) ON COMMIT DELETE ROWS"
)
_COPY_ROWS = f"COPY tiered_state_load ({_V_COLUMNS}) FROM STDIN"
_COPY_EXPECTED = f"COPY tiered_state_load ({_V_COLUMNS}, expected) FROM STDIN"
# The earliest possible keyset position for scan: before every timestamp and key.
_SCAN_START = ("-infinity", "")

_Row = tuple[Any, ...]


def _jsonb_exact(value: Any) -> bool:
    """True if JSONB gives ``value`` back with the same canonical encoding."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, float):
        # -0.0 becomes 0; a repr with "e+" comes back as a JSONB integer.
        return not (value == 0.0 and math.copysign(1.0, value) < 0) and "e+" not in repr(value)
    if isinstance(value, dict):
        return all(_jsonb_exact(k) and _jsonb_exact(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_jsonb_exact(v) for v in value)
    return True


def _split_payload(payload: str) -> tuple[str | None, str | None]:
    """``(data, payload)`` columns: JSON for JSONB, or the exact text when JSONB
    would not give it back byte for byte."""
    try:
        value = codec.decode(payload)
        canonical = _canonical(value) == payload
    except (SerializationError, ValueError, RecursionError):  # not JSON, NaN, too deep
        return None, payload
    if not canonical:
        return None, payload
    if _SUSPECT(payload):
        try:
            if not _jsonb_exact(value):
                return None, payload
        except RecursionError:
            return None, payload
    return payload, None


def _params(key: str, payload: str, metadata: Metadata) -> tuple[Any, ...]:
    encoding = metadata["encoding"]
    data: str | None
    text: str | None
    if encoding == STUB or encoding == TOMBSTONE:
        # Verbatim in the text column: a locator (or nothing) is not the
        # value, so it must not show up in queries of ``data``.
        data, text = None, payload
    else:
        data, text = _split_payload(payload)
    return (
        key, data, text, metadata["checksum"], metadata["size_bytes"], metadata["version"],
        metadata["created_at"], metadata["updated_at"], metadata["expires_at"], encoding,
    )


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows of :func:`_params` as one list per column (the ``unnest`` arrays)."""
    return [list(column) for column in zip(*rows)]


def _copy(cur: Cursor, statement: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """COPY ``rows`` into the staging table, a few thousand per round trip."""
    for chunk in chunked(rows, 5 * _CHUNK):
        buf = io.StringIO()
        write = buf.write
        for row in chunk:
            write("\t".join(map(_copy_field, row)))
            write("\n")
        buf.seek(0)
        cur.copy_expert(statement, buf)


def _copy_field(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, float):
        return repr(value)
    return str(value).translate(_COPY_ESCAPES) if isinstance(value, str) else str(value)


def _entry(row: _Row) -> Entry:
    key, data, payload, digest, size, version, created, updated, expires, encoding = row[:10]
    if payload is None:
        payload = _canonical(codec.decode(data))
    metadata: Metadata = {
        "checksum": digest,
        "size_bytes": size,
        "version": version,
        "created_at": created,
        "updated_at": updated,
        "expires_at": expires,
        "encoding": encoding,
    }
    return Entry(key, payload, metadata)


#: What each operation is called in an error message (never a method's name).
_ACTIONS = {
    "connect": "connecting", "ping": "a health check", "fetch": "a read", "fetch_many": "a batch read",
    "keys": "a key listing", "scan": "a sweep scan", "stats": "a statistics query",
    "store": "a write", "store_if_newer": "a write", "store_if_version": "a conditional write",
    "store_many": "a batch write", "store_many_if_newer": "a batch write",
    "store_many_if_version": "a conditional batch write", "delete": "a delete",
    "delete_if_version": "a conditional delete", "delete_many": "a batch delete",
    "delete_many_if_version": "a conditional batch delete", "touch_many": "recording reads",
    "clear": "clearing the table",
}
#: SQLSTATEs of a wrong configuration, not of an outage, with the advice to give.
_MISCONFIGURED_CODES = {
    "28000": "check the user name in the URL (and the server's pg_hba.conf)",
    "28P01": "check the user name and password in the URL",
    "3D000": "check the database name in the URL",
    "42501": "the role needs CONNECT on the database, USAGE and CREATE on the schema "
    "(or a table created for it) and SELECT, INSERT, UPDATE and DELETE on the table",
}
#: A failed connection carries no SQLSTATE (psycopg2 has none to give before
#: the session exists): the server's reason is matched in libpq's text, in
#: English (a server with another lc_messages is reported as unavailable).
#: Each pattern comes with the SQLSTATE it stands for, or with advice.
_CONNECT_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"password authentication failed|no password supplied"), "28P01"),
    (re.compile(r"role \".*\" does not exist|no pg_hba\.conf entry|"
                r"(?:Peer|Ident|GSSAPI|SSPI|RADIUS|LDAP|PAM|certificate) authentication failed|"
                r"not permitted to log in"), "28000"),
    (re.compile(r"database \".*\" does not exist"), "3D000"),
    (re.compile(r"permission denied for database"), "42501"),
    (re.compile(r"unrecognized configuration parameter|invalid value for parameter"),
     "check option 'options' (the -c settings sent to the server)"),
    (re.compile(r"invalid \w+ value .* for connection option \"(\w+)\""), "check option '{0}'"),
    (re.compile(r"invalid (\w+) value"), "check option '{0}'"),
    (re.compile(r"does not support SSL|SSL was required|SSL is not enabled|"
                r"certificate|sslmode value"), "check the ssl options (sslmode, sslrootcert...)"),
)
#: What libpq puts before the server's own message.
_PREFIX = re.compile(r"^.*?failed: (?:FATAL|ERROR):\s+|^(?:FATAL|ERROR):\s+")
#: libpq's names of its connection parameters, for "did you mean" (not a list
#: of what is accepted: libpq decides that).
_LIBPQ_OPTIONS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "require_auth",
    "channel_binding", "connect_timeout", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "replication", "gssencmode", "sslmode",
    "sslnegotiation", "sslcompression", "sslcert", "sslkey", "sslpassword", "sslcertmode",
    "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "krbsrvname", "gsslib", "gssdelegation", "service",
    "target_session_attrs", "load_balance_hosts",
})
#: libpq's complaint about a connection parameter it does not know.
_UNKNOWN_PARAMETER = re.compile(r'(?:invalid URI query parameter|invalid connection option):? "([^"]*)"')


def _misconfigured(code: str | None, lines: Sequence[str]) -> tuple[str, str] | None:
    """``(what the server said, advice)`` if an error means a wrong
    configuration, else None; ``code`` is its SQLSTATE (None for a failed
    connection, matched by its text)."""
    if code is not None:
        advice = _MISCONFIGURED_CODES.get(code)
        return None if advice is None else (_PREFIX.sub("", lines[0]).strip(), advice)
    for line in lines:
        for pattern, meaning in _CONNECT_FAILURES:
            match = pattern.search(line)
            if match is not None:
                said = _PREFIX.sub("", line).strip()
                advice = _MISCONFIGURED_CODES.get(meaning) or meaning.format(*match.groups())
                return said, advice
    return None


def _parse_table(table: str) -> tuple[str, ...]:
    """Split and validate ``table`` or ``schema.table``.

    :raises ConfigurationError: a part is not a plain identifier.
    """
    parts = tuple(table.split("."))
    if len(parts) > 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise ConfigurationError(
            f"table must be an identifier or schema.identifier ([A-Za-z_][A-Za-z0-9_]*), "
            f"not {table!r}"
        )
    if len(parts[-1]) > _MAX_TABLE:
        raise ConfigurationError(f"table name is longer than {_MAX_TABLE} characters")
    return parts


class _Link:
    """A pooled connection with its reusable cursor and what this session has set up."""

    __slots__ = ("conn", "cur", "prepared", "staged")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.cur: Cursor = conn.cursor()
        self.prepared = False  # the hot statements are PREPAREd
        self.staged = False  # the COPY staging table exists

    def close(self) -> None:
        self.conn.close()


class _Pool:
    """A thread-safe, bounded LIFO pool of autocommit connections.

    Unlike psycopg2's ``ThreadedConnectionPool`` it waits for a free connection
    instead of failing when every connection is busy, checks an idle
    connection for a dropped socket before handing it out (a connection the
    server ended -- restart, ``pg_terminate_backend`` -- has a readable socket:
    the FATAL message or EOF), and notices a fork.
    """

    def __init__(self, connect: Callable[[], _Link], size: int, timeout: float) -> None:
        self._connect = connect
        self.size = size
        self.timeout = timeout
        self._idle: list[_Link] = []
        self._open = 0
        self._waiters = 0
        self._cond = threading.Condition(threading.Lock())
        self._pid = os.getpid()

    def get(self) -> _Link:
        if self._pid != os.getpid():
            self._after_fork()
        idle = self._idle
        while True:
            try:
                conn = idle.pop()  # atomic under the GIL: no lock on the fast path
            except IndexError:
                opened = self._open_or_wait()
                if opened is not None:
                    return opened
                continue
            if self._usable(conn):
                return conn
            log.info("postgres: dropping a pooled connection the server closed")
            self.discard(conn)

    @staticmethod
    def _usable(link: _Link) -> bool:
        if link.conn.closed:
            return False
        poller = select.poll()
        poller.register(link.conn.fileno(), select.POLLIN)
        # Nothing is due on an idle connection; anything readable means the
        # server said goodbye (or the socket is dead).
        return not poller.poll(0)

    def _open_or_wait(self) -> _Link | None:
        with self._cond:
            if self._open >= self.size:
                self._waiters += 1
                try:
                    if not self._cond.wait_for(
                        lambda: self._idle or self._open < self.size, self.timeout
                    ):
                        raise BackendUnavailableError(
                            f"no free connection within pool_timeout={self.timeout}s "
                            f"(pool_size={self.size})",
                            "postgres",
                        )
                finally:
                    self._waiters -= 1
                return None
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            self._release_slot()
            raise

    def _release_slot(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def put(self, conn: _Link) -> None:
        if self._pid != os.getpid():
            _INHERITED.append(conn)
            return
        self._idle.append(conn)
        if self._waiters:
            with self._cond:
                self._cond.notify()

    def discard(self, conn: _Link) -> None:
        with contextlib.suppress(Exception):
            conn.close()
        self._release_slot()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
        for conn in idle:
            self.discard(conn)

    def _after_fork(self) -> None:
        # Another thread of the parent may have held the lock at fork time:
        # the child starts over with a fresh one.
        self._cond = threading.Condition(threading.Lock())
        _INHERITED.extend(self._idle)
        self._idle = []
        self._open = 0
        self._waiters = 0
        self._pid = os.getpid()


class _Session:
    """What :meth:`PostgresStateRepository._session` returns (a class, not a
    generator: this wraps every call, and a class costs a third as much)."""

    __slots__ = ("link", "operation", "repo", "staging", "transaction")

    def __init__(
        self, repo: PostgresStateRepository, operation: str, transaction: bool, staging: bool
    ) -> None:
        self.repo = repo
        self.operation = operation
        self.transaction = transaction
        self.staging = staging
        self.link: _Link | None = None

    def __enter__(self) -> tuple[Cursor, dict[str, str]]:
        repo = self.repo
        try:
            link = self.link = repo._pool.get()
            sql = repo._sql if repo._sql is not None else repo._prepare(link.conn)
            cur = link.cur
            if not link.prepared:
                cur.execute(sql["prepare"])
                link.prepared = True
            if self.staging and not link.staged:
                cur.execute(_TEMP_TABLE)
                link.staged = True
            if self.transaction:
                cur.execute("BEGIN")
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise
        return cur, sql

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        repo, link = self.repo, self.link
        self.link = None
        if link is None:  # failed to get a connection at all
            if isinstance(exc, repo._pg.Error):
                repo._raise(exc, "connect")
            return
        if exc is None:
            try:
                if self.transaction:
                    link.cur.execute("COMMIT")
            except repo._pg.Error as failure:
                exc = failure
            else:
                repo._pool.put(link)
                return
        repo._release_failed(link)
        if isinstance(exc, repo._pg.Error):
            repo._raise(exc, self.operation)


class PostgresStateRepository(StateRepository):
    """State in one PostgreSQL table (see the module docstring for the schema).

    :param dsn: a libpq URI or ``key=value`` connection string.
    :param table: ``name`` or ``schema.name``.
    :param statement_timeout: seconds per statement, None for no limit.
    :param connect_timeout: seconds to connect (libpq rounds up to 2).
    :param pool_size: most connections open at once.
    :param pool_timeout: seconds to wait for a free connection.
    """

    backend = "postgres"

    def __init__(
        self,
        dsn: str = "postgresql://",
        *,
        table: str = "tiered_state",
        statement_timeout: float | None = 30.0,
        connect_timeout: float = 3.0,
        pool_size: int = 10,
        pool_timeout: float = 10.0,
    ) -> None:
        self._pg = require("psycopg2", extra="postgres")
        require("psycopg2.extras", extra="postgres")
        require("psycopg2.sql", extra="postgres")
        self._table = _parse_table(table)
        self.table = ".".join(self._table)
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigurationError(f"pool_size must be a positive int, not {pool_size!r}")
        if statement_timeout is not None and statement_timeout < 0:
            raise ConfigurationError("statement_timeout must be >= 0")
        self.statement_timeout = statement_timeout or None
        self.connect_timeout = connect_timeout
        try:
            params = self._pg.extensions.parse_dsn(dsn)
        except self._pg.ProgrammingError as exc:
            unknown = _UNKNOWN_PARAMETER.search(str(exc))
            if unknown is not None:
                raise unknown_options(
                    "postgresql", [unknown.group(1)], _OPTIONS | _LIBPQ_OPTIONS,
                    more="(the tiered-state ones: " + ", ".join(sorted(_OPTIONS))
                    + "; the others are libpq's connection parameters)",
                ) from None
            # libpq's reason is not shown: it may quote part of the password.
            raise ConfigurationError(f"not a valid libpq URL/DSN: {redact(dsn)}") from None
        self._url = redact(dsn)
        self._connect_kwargs: dict[str, Any] = {"dsn": dsn}
        if "connect_timeout" not in params:
            # libpq takes whole seconds and treats 1 as 2.
            self._connect_kwargs["connect_timeout"] = max(2, math.ceil(connect_timeout))
        if "application_name" not in params:
            self._connect_kwargs["application_name"] = "tiered-state"
        if self.statement_timeout is not None:
            ms = max(1, round(self.statement_timeout * 1000))
            # Ahead of the DSN's own options: a -c statement_timeout there is
            # the later one, and the server keeps the later one.
            self._connect_kwargs["options"] = (
                f"-c statement_timeout={ms} " + params.get("options", "")
            ).strip()
        self._pool = _Pool(self._connect, pool_size, pool_timeout)
        self._sql: dict[str, str] | None = None
        self._schema_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStateRepository:
        scheme, sep, rest = encode_userinfo(url).partition("://")
        if not sep or scheme.split("+", 1)[0].lower() not in ("postgresql", "postgres"):
            raise ConfigurationError(f"not a postgresql:// URL: {redact(url)}")
        base, _, query = rest.partition("?")
        # libpq's own options go on exactly as written: decoding and encoding
        # them again would change them (a form encoder writes a space as "+",
        # which libpq does not decode: ?options=-c%20x%3D1 must stay %20).
        ours: dict[str, Any] = {}
        theirs: dict[str, str] = {}
        for piece in query.split("&") if query else ():
            name, _, value = piece.partition("=")
            if unquote(name) in _OPTIONS:
                ours[unquote(name)] = unquote(value)
            elif piece:
                theirs[unquote(name)] = piece
        for name, value in options.items():
            if value is None:
                continue
            if name in _OPTIONS:
                ours[name] = value
            else:
                theirs[name] = f"{quote(name, safe='')}={quote(str(value), safe='')}"
        dsn = "postgresql://" + base + ("?" + "&".join(theirs.values()) if theirs else "")
        kwargs: dict[str, Any] = {}
        if "table" in ours:
            kwargs["table"] = str(ours["table"])
        if "statement_timeout" in ours:
            kwargs["statement_timeout"] = parse_number(
                ours["statement_timeout"], "statement_timeout"
            )
        connect_timeout = parse_number(ours.get("connect_timeout"), "connect_timeout")
        if connect_timeout is not None:
            kwargs["connect_timeout"] = connect_timeout
        for name in ("pool_size", "pool_timeout"):
            if name in ours:
                number = parse_number(ours[name], name, minimum=1 if name == "pool_size" else 0)
                if number is not None:
                    kwargs[name] = int(number) if name == "pool_size" else number
        return cls(dsn, **kwargs)

    def __repr__(self) -> str:
        return f"<PostgresStateRepository {self._url} table={self.table} tier={self.tier}>"

    # ------------------------------------------------------------ connections
    def _connect(self) -> _Link:
        conn: Connection = self._pg.connect(**self._connect_kwargs)
        # One statement = one transaction: no BEGIN/COMMIT round trips for the
        # single-statement operations; multi-statement ones BEGIN explicitly.
        conn.autocommit = True
        conn.set_client_encoding("UTF8")
        log.debug("postgres: opened a connection to %s", self._url)
        return _Link(conn)

    def _prepare(self, conn: Connection) -> dict[str, str]:
        """Render the SQL for this table and create the table, once per repository."""
        with self._schema_lock:
            if self._sql is not None:
                return self._sql
            sql = self._pg.sql
            name = self._table[-1]
            ids = {
                "t": sql.Identifier(*self._table),
                "expires_idx": sql.Identifier(name + "_expires_idx"),
                "idle_idx": sql.Identifier(name + "_idle_idx"),
            }
            rendered = {k: sql.SQL(v).format(t=ids["t"]).as_string(conn) for k, v in _SQL.items()
                        if k != "schema"}
            rendered["regclass"] = ids["t"].as_string(conn)
            rendered["prepare"] = ";".join(
                sql.SQL(f"PREPARE ts_{name} ({types}) AS {text}").format(t=ids["t"]).as_string(conn)
                for name, (types, text) in _PREPARED.items()
            )
            for name, (types, _) in _PREPARED.items():
                marks = ", ".join(["%s"] * (types.count(",") + 1))
                rendered[name] = f"EXECUTE ts_{name}({marks})"
            with conn.cursor() as cur:
                cur.execute("BEGIN")
                try:
                    # CREATE TABLE IF NOT EXISTS is not safe against a concurrent
                    # CREATE (duplicate pg_type row); the advisory lock serialises
                    # processes initialising the same table.
                    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                                ("tiered_state:" + self.table,))
                    cur.execute(sql.SQL(_SQL["schema"]).format(**ids))
                    cur.execute("COMMIT")
                except BaseException:
                    if not conn.closed:
                        cur.execute("ROLLBACK")
                    raise
            self._sql = rendered
            return rendered

    def _session(
        self, operation: str, *, transaction: bool = False, staging: bool = False
    ) -> _Session:
        """A pooled connection's cursor and the SQL, as a context manager; the one
        place driver errors are translated. ``transaction``: BEGIN ... COMMIT
        around the block, ROLLBACK on any error so nothing is half-written."""
        return _Session(self, operation, transaction, staging)

    def _run(
        self,
        operation: str,
        work: Callable[[Cursor, dict[str, str]], _T],
        *,
        transaction: bool = False,
        staging: bool = False,
    ) -> _T:
        """``work(cur, sql)`` in a session (see :meth:`_session`): the one place
        writes run.

        A statement or transaction that lost a deadlock (40P01) or a
        serialization conflict (40001) was rolled back whole by the server,
        so it runs again, up to :data:`_ATTEMPTS` times in all, after a short
        jittered pause (the other party finishes meanwhile, and writers that
        collided do not collide again in step). Anything else, or the last
        attempt's failure, is raised as :meth:`_raise` translated it.
        """
        attempt = 1
        while True:
            try:
                with _Session(self, operation, transaction, staging) as (cur, sql):
                    return work(cur, sql)
            except BackendError as exc:
                code = getattr(exc.__cause__, "pgcode", None)
                if code not in _RETRIED or attempt >= _ATTEMPTS:
                    raise
            pause = _BACKOFF * 2 ** (attempt - 1) * (0.5 + random.random())
            log.info("postgres: %s on %s lost a conflict [%s]; attempt %d of %d in %.0f ms",
                     operation, self.table, code, attempt + 1, _ATTEMPTS, pause * 1000)
            time.sleep(pause)
            attempt += 1

    def _release_failed(self, link: _Link | None) -> None:
        """Return a connection after an error: rolled back and pooled if sound, else closed."""
        if link is None:
            return
        conn = link.conn
        pg = self._pg
        idle = pg.extensions.TRANSACTION_STATUS_IDLE
        if not conn.closed and conn.info.transaction_status != idle:
            try:
                link.cur.execute("ROLLBACK")
            except pg.Error:
                pass
        if not conn.closed and conn.info.transaction_status == idle:
            self._pool.put(link)
        else:  # closed, broken, or stuck in a transaction: never reuse it
            self._pool.discard(link)

    def _raise(self, exc: Exception, operation: str) -> NoReturn:
        """Raise ``exc`` translated: the one place psycopg2 errors are mapped.

        A wrong role, password, database, schema or privilege, or a bad libpq
        or server setting, is a :class:`ConfigurationError` (see
        :func:`_misconfigured`); a server that is down, refuses connections or
        times out is a :class:`BackendUnavailableError`; a deadlock, a
        serialization failure or any other failed statement a
        :class:`BackendError`. ``operation`` is one of :data:`_ACTIONS`
        (``"connect"``: no connection was made).
        """
        pg = self._pg
        code = getattr(exc, "pgcode", None)
        if code == "42P01":  # the table was dropped behind our back: recreate next time
            self._sql = None
        # Only the primary line of a statement's error: DETAIL / CONTEXT lines
        # may quote stored values. A failed connection's lines are all libpq's
        # (one per address tried), the server's reason maybe on a later one.
        lines = str(exc).strip().splitlines() or [""]
        first = lines[0]
        detail = f" [{code}]" if code else ""
        log.debug("postgres: %s failed: %s%s", operation, type(exc).__name__, detail)
        if isinstance(exc, pg.OperationalError) or code:
            found = _misconfigured(code, lines if code is None else [first])
            if found is not None:
                said, advice = found
                raise ConfigurationError(
                    f"postgres: cannot use {self._url}: {redact(said)}; {advice}"
                ) from exc
        cls: type[BackendError]
        if isinstance(exc, pg.extensions.TransactionRollbackError):
            cls = BackendError  # deadlock / serialization failure: a conflict, not an outage
        elif isinstance(exc, (pg.OperationalError, pg.InterfaceError)):
            cls = BackendUnavailableError
        else:
            cls = BackendError
        if operation == "connect":
            message = f"cannot connect to {self._url}: {redact(first)}"
        else:
            message = (f"{_ACTIONS.get(operation, 'a statement')} on table {self.table} failed: "
                       f"{type(exc).__name__}{detail}: {redact(first)}")
        raise cls(message, self.backend) from exc

    # ------------------------------------------------------------ reads
    def fetch_record(self, key: str) -> Entry | None:
        validate_key(key)
        with self._session("fetch") as (cur, sql):
            cur.execute(sql["select"], (key,))
            row = cur.fetchone()
        return None if row is None else _entry(row)

    def fetch(self, key: str) -> Any | None:
        validate_key(key)
        with self._session("fetch") as (cur, sql):
            cur.execute(sql["fetch"], (key, time.time()))
            row = cur.fetchone()
        if row is None:
            return None
        data, payload, digest, encoding = row
        if encoding != codec.ENCODING:
            # Another codec's payload (tagged JSON, or not JSON at all): its
            # text, checked, then read by that codec.
            text = _canonical(codec.decode(data)) if payload is None else payload
            if checksum(text) != digest:
                raise IntegrityError(f"postgres: checksum mismatch for {key!r}", key)
            return codec.decode_stored(text, encoding)
        # Decode once: the canonical text for the checksum comes from the value.
        value = codec.decode(data if payload is None else payload)
        text = _canonical(value) if payload is None else payload
        if checksum(text) != digest:
            raise IntegrityError(f"postgres: checksum mismatch for {key!r}", key)
        return value

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = [validate_key(k) for k in keys]
        out: dict[str, Entry] = {}
        if not keys:
            return out
        with self._session("fetch_many") as (cur, sql):
            for chunk in chunked(keys, _CHUNK):
                cur.execute(sql["select_many"], (chunk,))
                for row in cur.fetchall():
                    out[row[0]] = _entry(row)
        return out

    def keys(self, pattern: str = "*") -> list[str]:
        validate_pattern(pattern)
        now = time.time()
        with self._session("keys") as (cur, sql):
            if is_literal(pattern):
                cur.execute(sql["key"], (literal_prefix(pattern), now))
            else:
                cur.execute(sql["keys"], (to_like(pattern), now))
            found = [row[0] for row in cur.fetchall()]
        if has_class(pattern):
            found = [k for k in found if matches(pattern, k)]
        return found

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        validate_pattern(pattern)
        if is_literal(pattern):
            return iter(self.keys(pattern))
        return self._iter_keys(pattern)

    def _iter_keys(self, pattern: str, page: int = _CHUNK) -> Iterator[str]:
        like = to_like(pattern)
        check = has_class(pattern)
        after = ""
        while True:
            # A keyset page per round trip: no connection or cursor is held
            # between pages, so callers may write while iterating.
            with self._session("keys") as (cur, sql):
                cur.execute(sql["keys_page"], (after, like, time.time(), page))
                found = [row[0] for row in cur.fetchall()]
            for key in found:
                if not check or matches(pattern, key):
                    yield key
            if len(found) < page:
                return
            after = found[-1]

    def iter_all_keys(self) -> Iterator[str]:
        after = ""
        while True:
            with self._session("keys") as (cur, sql):
                cur.execute(sql["all_keys_page"], (after, _CHUNK))
                found = [row[0] for row in cur.fetchall()]
            yield from found
            if len(found) < _CHUNK:
                return
            after = found[-1]

    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        now = time.time() if now is None else now
        batch_size = max(1, int(batch_size))
        # Two keyset walks, each along its own index: expired rows, then live
        # idle rows (so no row is reported twice).
        yield from self._scan("scan_expired", (now,), batch_size)
        if idle_before is not None:
            yield from self._scan("scan_idle", (idle_before, now), batch_size)

    def _scan(
        self, query: str, bounds: tuple[float, ...], batch_size: int
    ) -> Iterator[list[Entry]]:
        position: tuple[Any, str] = _SCAN_START
        while True:
            with self._session("scan") as (cur, sql):
                cur.execute(sql[query], (*bounds, *position, batch_size))
                rows = cur.fetchall()
            if rows:
                yield [_entry(row) for row in rows]
            if len(rows) < batch_size:
                return
            position = (rows[-1][10], rows[-1][0])

    def stats(self) -> dict[str, Any]:
        with self._session("stats") as (cur, sql):
            cur.execute(sql["stats"], (time.time(), sql["regclass"]))
            live, total, payload_bytes, table_bytes = cur.fetchone()  # type: ignore[misc]
        return {
            "backend": self.backend,
            "tier": str(self.tier) if self.tier else None,
            "key_count": live,
            "expired_count": total - live,
            "payload_bytes": int(payload_bytes),
            "table_bytes": table_bytes,
            "table": self.table,
            "pool_size": self._pool.size,
        }

    def ping(self) -> float:
        start = time.perf_counter()
        with self._session("ping") as (cur, _):
            cur.execute("SELECT 1")
            cur.fetchone()
        return (time.perf_counter() - start) * 1000.0

    # ------------------------------------------------------------ writes
    # Every write runs through _run, which runs it again when it lost a
    # deadlock or a serialization conflict; so each work function computes
    # its result afresh from the cursor.
    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        params = _params(key, value, metadata)

        def work(cur: Cursor, sql: dict[str, str]) -> bool:
            cur.execute(sql["store"], params)
            return True

        return self._run("store", work)

    def store_many(self, items: Items) -> set[str]:
        keys = [validate_key(k) for k in items]
        if not keys:
            return set()
        keys.sort()  # rows locked in key order: concurrent batches cannot deadlock
        rows = [_params(k, *items[k]) for k in keys]
        if len(rows) < _COPY_MIN:
            self._store_values(rows)
        else:
            self._store_copy(rows)
        log.debug("postgres: stored %d keys in %s", len(rows), self.table)
        return set(keys)

    def _store_values(self, rows: Sequence[tuple[Any, ...]]) -> None:
        extras = self._pg.extras

        def work(cur: Cursor, sql: dict[str, str]) -> None:
            # VALUES rows are inserted (and their keys locked) in list order:
            # the rows come sorted by key.
            extras.execute_values(cur, sql["store_values"], rows, template=_ROW, page_size=_CHUNK)

        self._run("store_many", work, transaction=len(rows) > _CHUNK)

    def _store_copy(self, rows: Sequence[tuple[Any, ...]]) -> None:
        def work(cur: Cursor, sql: dict[str, str]) -> None:
            _copy(cur, _COPY_ROWS, rows)
            # One upsert from the staging table, committed with the COPYs.
            cur.execute(sql["store_copied"])

        self._run("store_many", work, transaction=True, staging=True)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        params = _params(key, value, metadata)

        def work(cur: Cursor, sql: dict[str, str]) -> bool:
            now = time.time()
            if expected == 0:
                # Absent, or only an expired tombstone: insert / replace it.
                cur.execute(sql["store_if_absent"], (*params, now))
            else:
                cur.execute(sql["store_if_version"], (*params[1:], key, expected, params[5], now))
            return bool(cur.rowcount == 1)

        return self._run("store_if_version", work)

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        params = _params(key, value, metadata)

        def work(cur: Cursor, sql: dict[str, str]) -> bool:
            cur.execute(sql["store_if_newer"], params)
            return bool(cur.rowcount == 1)

        return self._run("store_if_newer", work)

    # Small batches: one statement over unnest(array per column), one round
    # trip. Large ones: COPY into the staging table and one statement from
    # it, in one transaction (psycopg2 renders array parameters element by
    # element, and the server parses them as literals: unnest was level with
    # COPY at 64 rows and 1.2-1.6x slower from 128 rows on). Either way the
    # RETURNING list is exactly the keys written.
    def store_many_if_newer(self, items: Items) -> set[str]:
        keys = sorted(validate_key(k) for k in items)
        if not keys:
            return set()
        rows = [_params(k, *items[k]) for k in keys]
        copied = len(rows) >= _UNNEST_MAX

        def work(cur: Cursor, sql: dict[str, str]) -> set[str]:
            if copied:
                _copy(cur, _COPY_ROWS, rows)
                cur.execute(sql["store_many_if_newer_copied"])
            else:
                cur.execute(sql["store_many_if_newer"], _columns(rows))
            return {row[0] for row in cur.fetchall()}

        return self._run("store_many_if_newer", work, transaction=copied, staging=copied)

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        keys = sorted(validate_key(k) for k in items)
        versions = [expected[k] for k in keys]  # every one known before any I/O
        if not keys:
            return set()
        rows = [_params(k, *items[k]) for k in keys]
        copied = len(rows) >= _UNNEST_MAX

        def work(cur: Cursor, sql: dict[str, str]) -> set[str]:
            now = time.time()
            if copied:
                _copy(cur, _COPY_EXPECTED, [(*row, v) for row, v in zip(rows, versions)])
                cur.execute(sql["store_many_if_version_copied"], (now, now))
            else:
                cur.execute(sql["store_many_if_version"], (*_columns(rows), versions, now, now))
            return {row[0] for row in cur.fetchall()}

        return self._run("store_many_if_version", work, transaction=copied, staging=copied)

    def delete(self, key: str) -> bool:
        validate_key(key)

        def work(cur: Cursor, sql: dict[str, str]) -> bool:
            cur.execute(sql["delete"], (key,))
            return bool(cur.rowcount > 0)

        return self._run("delete", work)

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)

        def work(cur: Cursor, sql: dict[str, str]) -> bool:
            cur.execute(sql["delete_if_version"], (key, version))
            return bool(cur.rowcount > 0)

        return self._run("delete_if_version", work)

    # The multi-chunk forms below run in one transaction (chunks in key
    # order, so the whole batch still locks in key order).
    def delete_many(self, keys: Iterable[str]) -> int:
        keys = sorted({validate_key(k) for k in keys})
        if not keys:
            return 0

        def work(cur: Cursor, sql: dict[str, str]) -> int:
            total = 0
            for chunk in chunked(keys, _CHUNK):
                cur.execute(sql["delete_many"], (chunk,))
                total += cur.rowcount
            return total

        return self._run("delete_many", work, transaction=len(keys) > _CHUNK)

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        keys = sorted(validate_key(k) for k in versions)
        if not keys:
            return set()

        def work(cur: Cursor, sql: dict[str, str]) -> set[str]:
            deleted: set[str] = set()
            for chunk in chunked(keys, _CHUNK):
                cur.execute(sql["delete_many_if_version"], (chunk, [versions[k] for k in chunk]))
                deleted.update(row[0] for row in cur.fetchall())
            return deleted

        return self._run("delete_many_if_version", work, transaction=len(keys) > _CHUNK)

    def touch_many(self, keys: Iterable[str], at: float) -> None:
        keys = sorted({validate_key(k) for k in keys})
        if not keys:
            return

        def work(cur: Cursor, sql: dict[str, str]) -> None:
            for chunk in chunked(keys, _CHUNK):
                cur.execute(sql["touch_many"], (chunk, at))

        self._run("touch_many", work, transaction=len(keys) > _CHUNK)

    def clear(self) -> int:
        def work(cur: Cursor, sql: dict[str, str]) -> int:
            cur.execute(sql["clear"])
            return int(cur.rowcount)

        return self._run("clear", work)

    def close(self) -> None:
        self._pool.close()
