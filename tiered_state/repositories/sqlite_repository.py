"""``sqlite:///path`` -- one SQLite file in WAL mode (the embedded WARM tier).

URL (SQLAlchemy's form): ``sqlite:///relative/warm.db`` (relative to the
working directory) or ``sqlite:////abs/path/warm.db``. Query options:

``busy_timeout``  seconds a writer waits for another writer's lock (default 5)
``synchronous``   ``NORMAL`` (default), ``FULL``, ``EXTRA`` or ``OFF``
``table``         table name (default ``tiered_state``), a plain identifier

Durability: in WAL mode ``synchronous=NORMAL`` never corrupts the database,
but a power loss (not a process crash) may roll back the last transactions
committed before it. ``FULL`` fsyncs the WAL on every commit, so a write that
returned survives a power loss too, at the price of one fsync per write.

Storage: one table (schema created on first use, see :data:`_SCHEMA`) with a
row per key; the payload is stored as given, whatever the entry's kind (a
value's text as its codec wrote it, a stub's locator, a tombstone's empty
text) and ``encoding`` tells the kinds apart (a value's is its codec's
name). Expired rows and tombstones stay until deleted (see :mod:`.base`).
``last_accessed`` is the later of the write time and the last
:meth:`touch_many`, so the sweep's idle test is one pass.

Concurrency: one connection per thread (reopened after ``fork`` and after
:meth:`close`), several processes may share the file. Every write takes the
write lock when it starts, never part-way through: multi-statement writes run
in ``BEGIN IMMEDIATE`` transactions, and the single-key writes are single
statements in autocommit mode, which take the lock at their first step. No
write runs on a connection with a read still open (every read is stepped to
its end, or its statement dropped when it fails), so none is a read
transaction upgraded to a write -- the case where SQLite answers SQLITE_BUSY
at once instead of waiting. Every write waits for the lock up to
``busy_timeout`` in all; a SQLITE_BUSY that comes back sooner (the WAL
switch, which never calls the busy handler, or any other early refusal) is
retried until then (see :meth:`SQLiteStateRepository._write`). The batch
conditional writes run the single-key statement once per key inside one
transaction, which holds the write lock, so every key is decided atomically
and the rowcount of each statement says exactly which keys were written.

Hostile bytes: a TEXT column holding bytes that are not UTF-8 (or a BLOB),
which only a writer going behind the library's back can store, is read with
the bad bytes kept as lone surrogates (see
:meth:`SQLiteStateRepository._rows`): the row then fails its checksum like
any corrupt one -- an ``IntegrityError`` that shows none of the stored text,
or a copy below the catalog served instead -- and batch reads, listings and
the sweep go on past it. A row whose *key* is not UTF-8 is no key the library
wrote: listings and the sweep skip it, with a warning.

Change signal: :meth:`changed_by_others` compares the WAL-index header (the
first bytes of ``<db>-shm``, rewritten by every commit) with the header this
thread last saw, and runs ``PRAGMA data_version`` only when it moved. A thread
whose connection is new answers True on its first call unless the header still
equals the one observed when some thread of this repository last answered
False (so nothing was committed in between and the new connection's baseline
can be trusted).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .. import codec
from ..config import parse_number, query_options, unknown_options
from ..errors import BackendError, BackendUnavailableError, ConfigurationError, IntegrityError
from ..keys import has_class, is_literal, literal_prefix, matches, to_like, validate_key, validate_pattern
from ..record import STUB, TOMBSTONE, Entry, Metadata, checksum, live_value
from .base import Items, StateRepository, chunked

__all__ = ["SQLiteStateRepository"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: The URL's query options (see the module docstring).
_OPTIONS = frozenset({"busy_timeout", "synchronous", "table"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
#: Keys per statement in ``IN (...)`` lists; SQLite before 3.32 allowed 999 parameters.
_CHUNK = 500
#: Rows per keyset page in iter_keys / scan: bounded memory however big the table.
_PAGE = 1000

#: ``PRAGMA auto_vacuum`` of a file that can give pages back in steps.
_INCREMENTAL = 2
#: reclaim_space() leaves files with less unused space alone.
_RECLAIM_MIN_BYTES = 4 << 20
#: The largest file reclaim_space() rewrites while others may be waiting to write.
_VACUUM_MAX_BYTES = 128 << 20
#: Pages given back per write by reclaim_space() (16 MiB of 4 KiB pages).
_RECLAIM_STEP_PAGES = 4096

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {t} (
    key           TEXT PRIMARY KEY NOT NULL,
    payload       TEXT NOT NULL,
    checksum      TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    last_accessed REAL NOT NULL,
    expires_at    REAL,
    encoding      TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS {i}_expires ON {t} (expires_at, key) WHERE expires_at IS NOT NULL",
)
# No index on last_accessed: every write moves it, which made a single store
# 1.7x as expensive (40 us vs 23 us); the sweep's idle walk reads the table in
# key order instead -- one pass per sweep, a batch job.

_COLUMNS = "payload, checksum, size_bytes, version, created_at, updated_at, expires_at, encoding"
_INSERT_COLUMNS = (
    "(key, payload, checksum, size_bytes, version, created_at, updated_at,"
    " last_accessed, expires_at, encoding)"
)
# Parameters are plain positional ``?`` in _INSERT_COLUMNS order (see
# _params): binding a tuple is measurably cheaper than a dict on the store
# path, and numbered ones (?1) bound from a tuple are refused from Python 3.14.
# So an upsert takes the new row's values from ``excluded`` rather than
# naming a parameter twice.
_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SET_ALL = (
    "payload = excluded.payload, checksum = excluded.checksum, size_bytes = excluded.size_bytes,"
    " version = excluded.version, created_at = excluded.created_at,"
    " updated_at = excluded.updated_at, last_accessed = excluded.last_accessed,"
    " expires_at = excluded.expires_at, encoding = excluded.encoding"
)
# The same columns set from parameters (an UPDATE has no ``excluded``).
_SET_PARAMS = (
    "payload = ?, checksum = ?, size_bytes = ?, version = ?, created_at = ?, updated_at = ?,"
    " last_accessed = ?, expires_at = ?, encoding = ?"
)

#: ``encoding`` of the entries that hold no value (see :mod:`tiered_state.record`).
_NOT_VALUE = f"('{STUB}', '{TOMBSTONE}')"

#: How sqlite3 starts the message of a TEXT value that is not UTF-8 (the
#: message goes on to quote the value, so it is never shown).
_UNDECODABLE = "Could not decode to UTF-8"
_SQLITE_BUSY = 5
#: SQLite's message for SQLITE_BUSY and each of its extended codes.
_BUSY_TEXT = "database is locked"


def _busy(exc: BaseException) -> bool:
    """True for SQLITE_BUSY (any extended code): nothing was written, and
    the same work may succeed when tried again. By the error code where
    sqlite3 gives one (Python 3.11 on), else by SQLite's own message for it:
    on 3.10 every busy error would otherwise fail at once, unretried."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_BUSY
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(_BUSY_TEXT)


def _undecodable(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(_UNDECODABLE)


def _lenient_text(data: bytes) -> str:
    # The bad bytes become lone surrogates: such a payload matches no
    # checksum (record.checksum) and such a key is no valid key.
    return data.decode("utf-8", "surrogateescape")


def _is_text(value: Any) -> bool:
    """True for a str that is valid UTF-8 (no lone surrogate)."""
    try:
        value.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        return False
    return True


# SQLite's primary result codes that mean "the file cannot be used at all".
_UNAVAILABLE_CODES = {10, 13, 14, 26}  # IOERR, FULL, CANTOPEN, NOTADB
_UNAVAILABLE_TEXT = ("disk i/o error", "unable to open", "database or disk is full", "not a database")

# ---------------------------------------------------------------- fork safety
# A connection must never be used (or closed) in a child process: closing it
# there could checkpoint and delete the parent's WAL. A child bumps this
# generation; threads compare it with the one their connection was opened in.
_fork_generation = 0
# Connections inherited across fork are kept referenced so that garbage
# collection never closes them in the child.
_orphans: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    # A thread that did not survive the fork may have held it.
    _ShmHeader._registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ShmHeader:
    """Reads the WAL-index header (first 96 bytes of ``<db>-shm``) cheaply.

    Every commit rewrites it (``iChange``, ``mxFrame``, salts -- see
    https://www.sqlite.org/walformat.html), so unchanged bytes prove nobody
    committed and ``PRAGMA data_version`` (several µs) can be skipped. The 96
    bytes are two copies of one 48-byte header: a writer fills the second,
    then (after a memory barrier) the first, so copies that differ mean a
    commit was being published while we read (see :func:`_settled`).

    Only one file descriptor per process and file is opened, and it is closed
    only when the last repository of this process using it has closed its
    connections: closing any descriptor of a file drops *every* POSIX lock
    the process holds on it, including SQLite's own locks on the ``-shm``
    file, which would let another process re-initialise the WAL index under
    our readers. (Without the count, a process opening many stores -- a test
    suite -- would run out of descriptors.) The header is read through an ``mmap`` (0.1 µs) in the
    process that opened it; a forked child reads it with ``pread`` instead,
    because there SQLite's inherited shm state holds no lock on the file and
    another process may truncate it (an mmap read past the end is SIGBUS).
    """

    _registry: dict[str, _ShmHeader] = {}
    _registry_lock = threading.Lock()

    def __init__(self, fd: int, ino: int, path: str) -> None:
        self.fd = fd
        self.ino = ino
        self.path = path
        #: Repositories of this process that hold it (see release()).
        self.users = 0
        # The fork generation, not os.getpid(): a syscall on every read.
        self.generation = _fork_generation
        self.map: mmap.mmap | None = mmap.mmap(fd, 96, access=mmap.ACCESS_READ)

    @classmethod
    def open(cls, db_path: str, held: set[_ShmHeader]) -> _ShmHeader | None:
        """The reader of ``db_path``'s WAL-index header, counted as used by the
        repository whose set of headers ``held`` is (once per repository).

        Found (or made) and counted under one lock: a header found and
        counted in two steps could be released by another repository of this
        process in between, and closing its descriptor would drop the locks
        SQLite holds on ``-shm`` for this process's live connections -- other
        processes would then take the WAL index as abandoned and rebuild it
        under them (I/O errors, SIGBUS).
        """
        path = db_path + "-shm"
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size < 96:
            return None
        with cls._registry_lock:
            header = cls._registry.get(path)
            if header is None or header.ino != st.st_ino:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None
                try:
                    header = cls(fd, os.fstat(fd).st_ino, path)
                except (OSError, ValueError):
                    return None  # fd deliberately left open (see the class docstring)
                cls._registry[path] = header
            if header not in held:
                held.add(header)
                header.users += 1
            return header

    def release(self) -> None:
        """One repository is done with it; the last one closes the descriptor.

        Called after that repository closed its connections, so the locks a
        close would drop are held by no connection of a repository using it.
        """
        with _ShmHeader._registry_lock:
            self.users -= 1
            if self.users > 0:
                return
            if _ShmHeader._registry.get(self.path) is self:
                del _ShmHeader._registry[self.path]
            mapped, self.map = self.map, None
            fd, self.fd = self.fd, -1
        if mapped is not None and self.generation == _fork_generation:
            with contextlib.suppress(ValueError, OSError):
                mapped.close()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def read(self) -> bytes | None:
        mapped = self.map
        if mapped is not None and self.generation == _fork_generation:
            try:
                return mapped[:96]
            except ValueError:  # closed by another thread's release
                return None
        try:
            data = os.pread(self.fd, 96, 0)
        except OSError:
            return None
        return data if len(data) == 96 else None


_NO_SALT = bytes(8)


def _settled(header: bytes) -> bool:
    """True if both copies of the WAL-index header agree: no writer was half-way
    through publishing a commit while ``header`` was read."""
    return header[:48] == header[48:]


def _unique(header: bytes) -> bool:
    """True if ``header`` can only describe one state of the database.

    A header rebuilt from an empty WAL (the first connection after every
    connection closed) has zero salts (bytes 32-39) and is the same byte for
    byte each time, whatever was committed while nobody had the file open;
    after any commit the salts are random, so equal headers mean equal states.
    """
    return header[32:40] != _NO_SALT


class _ThreadState(threading.local):
    conn: sqlite3.Connection | None = None
    #: A cursor of ``conn`` kept for the single-row reads (a new one per
    #: call is 4% of a fetch_record).
    cursor: sqlite3.Cursor | None = None
    generation: tuple[int, int] = (-1, -1)
    #: ``PRAGMA data_version`` at the last changed_by_others call (or when the
    #: connection opened); -1: the next call answers True.
    data_version: int = 0
    #: The WAL-index header seen at this thread's last False answer; None: the
    #: next call runs the pragma.
    header: bytes | None = None
    shm: _ShmHeader | None = None
    #: What the fast path of changed_by_others needs, in one lookup: (the
    #: mapped header, ``header``, fork generation, epoch) while ``header`` is
    #: set and the header is mapped in this process; else None.
    fast: tuple[mmap.mmap, bytes, int, int] | None = None


class SQLiteStateRepository(StateRepository):
    """Records in one table of a SQLite database file.

    :param path: the database file; its folder is created (0700) if missing
        and the file is created 0600 (SQLite gives ``-wal``/``-shm`` the same).
    :param busy_timeout: seconds to wait for another writer before failing.
    :param synchronous: ``NORMAL`` (default), ``FULL``, ``EXTRA`` or ``OFF``.
    :param table: table name (an identifier), for several stores in one file.
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        table: str = "tiered_state",
    ) -> None:
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ConfigurationError(
                "sqlite needs a database file path (use memory:// for an in-process store)"
            )
        sync = str(synchronous).upper()
        if sync not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        if not _IDENTIFIER.match(table):
            raise ConfigurationError(f"table must be an identifier ([A-Za-z_][A-Za-z0-9_]*), not {table!r}")
        if not isinstance(busy_timeout, (int, float)) or busy_timeout < 0:
            raise ConfigurationError("busy_timeout must be a number of seconds >= 0")
        self.path = os.path.abspath(path)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = sync
        self.table = table
        self._t = f'"{table}"'
        self._local = _ThreadState()
        self._epoch = 0  # bumped by close(): every thread reopens
        # (fork generation, thread, connection) of every thread's connection,
        # for close() and to close the connections of threads that ended.
        self._conns: list[tuple[int, threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._schema_ready = False
        # (header reader, WAL-index header) seen by the last changed_by_others
        # call of any thread that answered False: a connection opened while
        # the header still equals it missed no commit (see _open). Inherited
        # by a forked child, which needs the parent's answer.
        self._clean: tuple[_ShmHeader, bytes] | None = None
        #: The WAL-index headers this repository's connections use (released at close).
        self._shm_held: set[_ShmHeader] = set()
        t = self._t
        self._sql_fetch = f"SELECT {_COLUMNS} FROM {t} WHERE key = ?"
        self._sql_fetch_payload = f"SELECT payload, checksum, expires_at, encoding FROM {t} WHERE key = ?"
        self._sql_fetch_live = (
            f"SELECT payload, checksum, expires_at FROM {t} WHERE key = ? AND encoding NOT IN {_NOT_VALUE}"
        )
        # An upsert updates the row in place; INSERT OR REPLACE would delete
        # and re-insert it, rewriting the primary key index on every store.
        upsert = (
            f"INSERT INTO {t} {_INSERT_COLUMNS} VALUES {_VALUES} ON CONFLICT(key) DO UPDATE SET {_SET_ALL}"
        )
        self._sql_store = upsert
        # The conditional writes (parameters: see _if_version). Each is one
        # statement, so it is atomic against every other connection; the
        # batch forms run the same statements. The "stored version" is that
        # of the row whatever its kind or expiry; the "live version" that of
        # a row not expired (a tombstone's expires_at is 0.0).
        self._sql_store_if_newer = f"{upsert} WHERE {t}.version < excluded.version"
        # expected 0: absent, or present but not live -- and never older.
        self._sql_store_if_absent = (
            f"{upsert} WHERE {t}.expires_at IS NOT NULL AND {t}.expires_at <= ?"
            f" AND {t}.version <= excluded.version"
        )
        self._sql_store_if_version = (
            f"UPDATE {t} SET {_SET_PARAMS} WHERE key = ? AND version = ? AND version <= ?"
            " AND (expires_at IS NULL OR expires_at > ?)"
        )
        self._sql_delete = f"DELETE FROM {t} WHERE key = ?"
        self._sql_delete_if_version = f"DELETE FROM {t} WHERE key = ? AND version = ?"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStateRepository:
        _, query = query_options(url)
        query.update(options)
        # Not urlsplit's path: it would fold sqlite:////abs into //abs.
        base = url.split("?", 1)[0]
        unknown = set(query) - _OPTIONS
        if unknown:
            raise unknown_options("sqlite", unknown, _OPTIONS)
        rest = base.partition("://")[2]
        # SQLAlchemy: sqlite:///relative.db and sqlite:////abs/path.db; the
        # part between // and the next / is an (empty) host.
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigurationError(
                "sqlite URL must be sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        from urllib.parse import unquote

        path = unquote(rest[1:])
        kwargs: dict[str, Any] = {}
        timeout = parse_number(query.get("busy_timeout"), "busy_timeout")
        if timeout is not None:
            kwargs["busy_timeout"] = timeout
        if "synchronous" in query:
            kwargs["synchronous"] = query["synchronous"]
        if "table" in query:
            kwargs["table"] = query["table"]
        return cls(path, **kwargs)

    # ------------------------------------------------------------ connections
    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn = local.conn
        if conn is None or local.generation != (_fork_generation, self._epoch):
            conn = self._open(local)
        return conn

    def _open(self, local: _ThreadState) -> sqlite3.Connection:
        self._drop_inherited()
        with self._errors():
            self._create_file()
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # close() may run on another thread
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                mode = self._wal(conn)
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                # LIKE must be case sensitive: keys are. (It also lets a
                # prefix pattern use the primary key index.)
                conn.execute("PRAGMA case_sensitive_like = ON")
                if not self._schema_ready:
                    schema = [sql.format(t=self._t, i=self.table) for sql in _SCHEMA]
                    self._write(lambda c: [c.execute(sql) for sql in schema],
                                transaction=True, conn=conn)
                    self._schema_ready = True
                # The baseline for changed_by_others, taken BEFORE the header
                # is read below (see there).
                local.data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            except BaseException:
                conn.close()
                raise
        local.conn = conn
        local.cursor = conn.cursor()
        local.generation = (_fork_generation, self._epoch)
        local.fast = None
        # The shm fast path is only sound in WAL mode (rollback mode has no
        # -shm file, so its bytes would never change).
        shm = None
        if str(mode).lower() == "wal":
            with self._conns_lock:  # close() swaps _shm_held under it
                shm = _ShmHeader.open(self.path, self._shm_held)
        local.shm = shm
        # A new connection's data_version baseline is "now", so on its own it
        # would hide every commit made between the last time this process's
        # HOT copies were validated and this moment (a new thread, a forked
        # child). It can be trusted only if the header, read after the
        # baseline, still equals the one seen at the last False answer of any
        # thread: then nothing was committed in between. Otherwise the first
        # call answers True.
        header = None if shm is None else shm.read()
        clean = self._clean
        if header is not None and clean is not None and clean[0] is shm and clean[1] == header:
            local.header = header
        else:
            local.header = None
            local.data_version = -1
        with self._conns_lock:
            ended = [c for g, th, c in self._conns if g == _fork_generation and not th.is_alive()]
            self._conns = [e for e in self._conns if e[2] not in ended]
            self._conns.append((_fork_generation, threading.current_thread(), conn))
        for stale in ended:
            with contextlib.suppress(sqlite3.Error):
                stale.close()
        log.debug("sqlite: opened connection to %s", self.path)
        return conn

    def _wal(self, conn: sqlite3.Connection) -> str:
        """Put the file in WAL mode (once per file; later connections find it
        so), a new file with incremental auto-vacuum first.

        Switching needs an exclusive lock and SQLite answers SQLITE_BUSY at
        once, without its busy handler, when another process is opening the
        new file at the same moment: :meth:`_write` retries it for up to
        ``busy_timeout``. A file that stays in another mode (read-only) is
        used in that mode.
        """

        def switch(c: sqlite3.Connection) -> str:
            mode = str(c.execute("PRAGMA journal_mode").fetchone()[0])
            if mode.lower() == "wal":
                return mode
            if c.execute("PRAGMA page_count").fetchone()[0] == 0:
                # Still empty: the setting costs nothing now and is written
                # with the header, so the pages deletes free can later be
                # given back by reclaim_space() without rewriting the file.
                # On a file another process has just begun, it would be a
                # write of its own -- one more thing the retry covers.
                c.execute("PRAGMA auto_vacuum = INCREMENTAL")
            return str(c.execute("PRAGMA journal_mode = WAL").fetchone()[0])

        return self._write(switch, conn=conn)

    def _create_file(self) -> None:
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            return
        # Create it 0600 ourselves: SQLite would use 0644 minus umask, and
        # gives the -wal and -shm files the main file's permissions. Never by
        # opening the file itself, though: closing *any* descriptor of a file
        # drops every POSIX lock this process holds on it, so a close racing
        # another thread's (or repository's) new connection to the file
        # would silently unlock that connection -- other processes then
        # write under it (I/O errors, a rebuilt WAL index, SIGBUS). The empty
        # file is made under a temporary name, closed, and only then linked
        # into place (never over an existing file).
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass  # another opener was first
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A file system without hard links: create it in place, where
            # only an opener in the microseconds before the close is exposed.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: BaseException) -> BackendError:
        """The one place sqlite3 and OS errors become tiered-state errors."""
        code = getattr(exc, "sqlite_errorcode", None)
        text = str(exc).lower()
        unavailable = isinstance(exc, OSError) or (
            (code & 0xFF) in _UNAVAILABLE_CODES
            if isinstance(code, int)
            else any(t in text for t in _UNAVAILABLE_TEXT)
        )
        kind = BackendUnavailableError if unavailable else BackendError
        name = getattr(exc, "sqlite_errorname", type(exc).__name__)
        # sqlite3's own message would quote the stored text.
        detail = "stored text is not valid UTF-8" if _undecodable(exc) else str(exc)
        return kind(f"{name}: {detail} ({self.path})", self.backend)

    def _write(self, work: Callable[[sqlite3.Connection], _T], *,
               transaction: bool = False, conn: sqlite3.Connection | None = None) -> _T:
        """Run the write ``work(connection)``, waiting for the write lock up to
        ``busy_timeout`` in all: the one place a writer waits.

        :param transaction: run ``work`` in one ``BEGIN IMMEDIATE``
            transaction (several statements); otherwise ``work`` is one
            statement in autocommit mode. Either way the write lock is taken
            at the start, where SQLite's busy handler waits for it.
        :param conn: the connection (default: this thread's).

        SQLite returns SQLITE_BUSY before the timeout where waiting could not
        help the statement as it stands (switching to WAL mode, a snapshot
        gone stale); nothing was written then, so ``work`` is run again, after
        a short pause, until ``busy_timeout`` has passed since the first try.
        ``work`` must build its result afresh on each run.
        """
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.001
        shortened: sqlite3.Connection | None = None  # its busy handler waits less now
        try:
            while True:
                c = self._conn() if conn is None else conn
                try:
                    if not transaction:
                        return work(c)
                    c.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(c)
                        c.execute("COMMIT")
                    except BaseException:
                        # Some errors (a full disk, an I/O error) end the
                        # transaction already; a ROLLBACK then would raise and
                        # hide the cause.
                        if c.in_transaction:
                            c.execute("ROLLBACK")
                        raise
                    return result
                except (sqlite3.Error, OSError) as exc:
                    left = deadline - time.monotonic() - pause
                    if not _busy(exc) or left <= 0:
                        raise self._translate(exc) from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                # The next try's busy handler waits only for what is left.
                with self._errors():
                    c.execute(f"PRAGMA busy_timeout = {max(int(left * 1000), 1)}")
                shortened = c
        finally:
            if shortened is not None:
                with contextlib.suppress(sqlite3.Error):
                    shortened.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    def _rows(self, conn: sqlite3.Connection, sql: str, params: Any, *, keyed: bool = True
              ) -> list[Any]:
        """Every row of a query, read to its end, so no statement (and no
        snapshot) stays open on the connection -- not even when it fails.

        Text that is not valid UTF-8 makes sqlite3 fail the whole read (with
        the text in its message); such a read is run again with the bad bytes
        kept as lone surrogates, so the row fails its checksum like any
        corrupt row and the other rows are read. With ``keyed`` (the first
        column is the key), rows whose key is not valid UTF-8 are left out.

        :raises sqlite3.Error: for the caller to translate.
        """
        cursor = conn.cursor()
        try:
            try:
                return cursor.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if not _undecodable(exc):
                    raise
            conn.text_factory = _lenient_text
            try:
                rows = cursor.execute(sql, params).fetchall()
            finally:
                conn.text_factory = str
        finally:
            cursor.close()
        if not keyed:
            return rows
        kept = [row for row in rows if _is_text(row[0])]
        if len(kept) < len(rows):
            log.warning("sqlite: skipping %d row(s) whose key is not valid UTF-8 in %s",
                        len(rows) - len(kept), self.path)
        return kept

    def _row_again(self, local: _ThreadState, exc: sqlite3.Error, sql: str, params: Any) -> Any:
        """After the thread's single-row read failed: the row, if the failure
        was text that is not UTF-8 (see :meth:`_rows`); else the error, translated.

        The failed statement is dropped with its cursor either way, so it
        holds no snapshot open.
        """
        conn = local.conn
        failed, local.cursor = local.cursor, None
        with contextlib.suppress(sqlite3.Error):
            if failed is not None:
                failed.close()
            if conn is not None:
                local.cursor = conn.cursor()
        # (Left None, the cursor makes the next read reopen the connection.)
        if conn is None or not _undecodable(exc):
            raise self._translate(exc) from exc
        with self._errors():
            rows = self._rows(conn, sql, params, keyed=False)
        return rows[0] if rows else None

    # ------------------------------------------------------------ the contract
    @staticmethod
    def _entry(key: str, row: tuple[Any, ...]) -> Entry:
        metadata: Metadata = {
            "checksum": row[1],
            "size_bytes": row[2],
            "version": row[3],
            "created_at": row[4],
            "updated_at": row[5],
            "expires_at": row[6],
            "encoding": row[7],
        }
        return Entry(key, row[0], metadata)

    def fetch_record(self, key: str) -> Entry | None:
        # The manager's read path: _conn and _entry inlined.
        validate_key(key)
        local = self._local
        cursor = local.cursor
        generation = local.generation
        if cursor is None or generation[0] != _fork_generation or generation[1] != self._epoch:
            self._open(local)
            cursor = local.cursor
            assert cursor is not None
        try:
            row = cursor.execute(self._sql_fetch, (key,)).fetchone()
        except sqlite3.Error as exc:
            row = self._row_again(local, exc, self._sql_fetch, (key,))
        if row is None:
            return None
        payload, digest, size, version, created, updated, expires, encoding = row
        return Entry(key, payload, {
            "checksum": digest,
            "size_bytes": size,
            "version": version,
            "created_at": created,
            "updated_at": updated,
            "expires_at": expires,
            "encoding": encoding,
        })

    def fetch_payload(self, key: str, encoding: str = codec.ENCODING) -> str | None:
        # The catalog's read for a plain get (see "Optional: fetch_payload"):
        # four columns, no Entry, no metadata dict.
        validate_key(key)
        local = self._local
        cursor = local.cursor
        generation = local.generation
        if cursor is None or generation[0] != _fork_generation or generation[1] != self._epoch:
            self._open(local)
            cursor = local.cursor
            assert cursor is not None
        try:
            row = cursor.execute(self._sql_fetch_payload, (key,)).fetchone()
        except sqlite3.Error as exc:
            row = self._row_again(local, exc, self._sql_fetch_payload, (key,))
        if row is None:
            return None
        payload, digest, expires_at, stored = row
        # A stub, a tombstone, or a value of a codec the caller did not name
        # (which only a caller that sees its encoding may decode): the
        # caller's slow path.
        if stored != encoding or (expires_at is not None and expires_at <= time.time()):
            return ""
        if checksum(payload) != digest:
            raise IntegrityError(f"sqlite: checksum mismatch for {key!r}", key)
        return payload  # type: ignore[no-any-return]

    def fetch(self, key: str) -> Any | None:
        payload = self.fetch_payload(key)
        if payload == "":  # not a live json value: maybe another codec's
            return live_value(self.fetch_record(key))
        return codec.decode(payload) if payload else None

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = list(dict.fromkeys(validate_key(k) for k in keys))
        out: dict[str, Entry] = {}
        conn = self._conn()
        with self._errors():
            for chunk in chunked(keys, _CHUNK):
                sql = f"SELECT key, {_COLUMNS} FROM {self._t} WHERE key IN ({','.join('?' * len(chunk))})"
                for row in self._rows(conn, sql, chunk):
                    out[row[0]] = self._entry(row[0], row[1:])
        return out

    @staticmethod
    def _params(key: str, value: str, metadata: Metadata) -> tuple[Any, ...]:
        updated_at = metadata["updated_at"]
        return (
            key,
            value,
            metadata["checksum"],
            metadata["size_bytes"],
            metadata["version"],
            metadata["created_at"],
            updated_at,
            updated_at,  # last_accessed: a write is an access
            metadata["expires_at"],
            metadata["encoding"],
        )

    def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        """The rowcount of one write statement (autocommit: it is its own
        transaction, and takes the write lock at its first step)."""
        return self._write(lambda conn: conn.execute(sql, params).rowcount)

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        self._execute(self._sql_store, self._params(key, value, metadata))
        return True

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        if not items:
            return set()
        params = self._params
        # One transaction: all rows or none. A failure raises the translated
        # error itself (not BatchError) because nothing was stored.
        rows = [params(k, v, md) for k, (v, md) in items.items()]
        self._write(lambda conn: conn.executemany(self._sql_store, rows), transaction=True)
        return set(items)

    def _if_version(
        self, key: str, value: str, metadata: Metadata, expected: int, now: float
    ) -> tuple[str, tuple[Any, ...]]:
        """The statement and parameters of one store_if_version (single or batch)."""
        params = self._params(key, value, metadata)
        if expected == 0:
            return self._sql_store_if_absent, (*params, now)
        return self._sql_store_if_version, (*params[1:], key, expected, metadata["version"], now)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        sql, params = self._if_version(key, value, metadata, expected, time.time())
        return self._execute(sql, params) > 0

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        return self._execute(self._sql_store_if_newer, self._params(key, value, metadata)) > 0

    # The batch conditionals run the single-key statement once per key in one
    # BEGIN IMMEDIATE transaction: the write lock is held throughout, so each
    # key's condition and write are atomic against other processes, and each
    # statement's rowcount says exactly whether that key was written. (A
    # multi-row upsert with RETURNING was 5-15% faster on 100-5000 keys but
    # needs SQLite 3.35 and a statement per batch size; a SELECT before an
    # executemany was 20% slower.)
    def _each(self, statements: list[tuple[str, str, tuple[Any, ...]]]) -> set[str]:
        """Run ``(key, sql, params)`` in one transaction; the keys whose
        statement changed a row."""
        if not statements:
            return set()

        def work(conn: sqlite3.Connection) -> set[str]:
            cursor = conn.cursor()
            return {key for key, sql, params in statements if cursor.execute(sql, params).rowcount > 0}

        return self._write(work, transaction=True)

    def store_many_if_newer(self, items: Items) -> set[str]:
        params = self._params
        sql = self._sql_store_if_newer
        return self._each([(k, sql, params(validate_key(k), v, md)) for k, (v, md) in items.items()])

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        now = time.time()
        statement = self._if_version
        # Every key and its expected version are checked before any I/O.
        return self._each(
            [(k, *statement(validate_key(k), v, md, expected[k], now)) for k, (v, md) in items.items()]
        )

    def delete(self, key: str) -> bool:
        validate_key(key)
        return self._execute(self._sql_delete, (key,)) > 0

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)
        return self._execute(self._sql_delete_if_version, (key, version)) > 0

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        for key in versions:
            validate_key(key)
        sql = self._sql_delete_if_version
        return self._each([(key, sql, (key, version)) for key, version in versions.items()])

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(dict.fromkeys(validate_key(k) for k in keys))
        if not keys:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            total = 0
            for chunk in chunked(keys, _CHUNK):
                sql = f"DELETE FROM {self._t} WHERE key IN ({','.join('?' * len(chunk))})"
                total += conn.execute(sql, chunk).rowcount
            return total

        return self._write(work, transaction=True)

    def touch_many(self, keys: Iterable[str], at: float) -> None:
        keys = list(dict.fromkeys(validate_key(k) for k in keys))
        if not keys:
            return

        def work(conn: sqlite3.Connection) -> None:
            for chunk in chunked(keys, _CHUNK):
                sql = (
                    f"UPDATE {self._t} SET last_accessed = ? WHERE last_accessed < ?"
                    f" AND key IN ({','.join('?' * len(chunk))})"
                )
                conn.execute(sql, [at, at, *chunk])

        self._write(work, transaction=True)

    # ------------------------------------------------------------ listing
    def _key_pages(self, pattern: str, live: bool) -> Iterator[list[str]]:
        """Keyset pages of matching keys in key order: bounded memory."""
        validate_pattern(pattern)
        conn = self._conn()
        t = self._t
        if is_literal(pattern):
            key = literal_prefix(pattern)
            sql = f"SELECT key FROM {t} WHERE key = ?"
            params: list[Any] = [key]
            if live:
                sql += " AND (expires_at IS NULL OR expires_at > ?)"
                params.append(time.time())
            with self._errors():
                rows = self._rows(conn, sql, params)
            if rows:
                yield [rows[0][0]]
            return
        like = to_like(pattern)
        post_filter = has_class(pattern)  # LIKE cannot express [...]: it over-matches
        where = "key > ? AND key LIKE ? ESCAPE '\\'"
        if live:
            where += " AND (expires_at IS NULL OR expires_at > ?)"
        sql = f"SELECT key FROM {t} WHERE {where} ORDER BY key LIMIT {_PAGE}"
        after = ""
        now = time.time()
        while True:
            params = [after, like, now] if live else [after, like]
            with self._errors():
                rows = self._rows(conn, sql, params)
            if not rows:
                return
            page = [r[0] for r in rows]
            after = page[-1]
            if post_filter:
                page = [k for k in page if matches(pattern, k)]
            if page:
                yield page
            if len(rows) < _PAGE:
                return

    def keys(self, pattern: str = "*") -> list[str]:
        return [k for page in self._key_pages(pattern, live=True) for k in page]

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        for page in self._key_pages(pattern, live=True):
            yield from page

    def iter_all_keys(self) -> Iterator[str]:
        for page in self._key_pages("*", live=False):
            yield from page

    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        now = time.time() if now is None else now
        t = self._t
        cols = f"key, {_COLUMNS}, "
        # Expired rows (tombstones among them: their expires_at is 0.0) in
        # (expires_at, key) order over the expiry index, then idle live
        # values -- never stubs, whose payload already moved -- in key order
        # over the primary key; both keyset walks, so the caller may delete a
        # batch before asking for the next.
        expired = (
            f"SELECT {cols}expires_at FROM {t} WHERE expires_at IS NOT NULL AND expires_at <= ?"
            " AND (expires_at, key) > (?, ?) ORDER BY expires_at, key LIMIT ?"
        )
        cursor: tuple[float, str] = (float("-inf"), "")
        while True:
            with self._errors():
                rows = self._rows(self._conn(), expired, (now, *cursor, batch_size))
            if not rows:
                break
            cursor = (rows[-1][-1], rows[-1][0])
            yield [self._entry(r[0], r[1:9]) for r in rows]
            if len(rows) < batch_size:
                break
        if idle_before is None:
            return
        idle = (
            f"SELECT {cols}last_accessed FROM {t} WHERE key > ? AND last_accessed < ?"
            f" AND (expires_at IS NULL OR expires_at > ?) AND encoding NOT IN {_NOT_VALUE}"
            " ORDER BY key LIMIT ?"
        )
        after = ""
        while True:
            with self._errors():
                rows = self._rows(self._conn(), idle, (after, idle_before, now, batch_size))
            if not rows:
                break
            after = rows[-1][0]
            yield [self._entry(r[0], r[1:9]) for r in rows]
            if len(rows) < batch_size:
                break

    def clear(self) -> int:
        sql = f"DELETE FROM {self._t}"
        return self._write(lambda conn: conn.execute(sql).rowcount, transaction=True)

    def reclaim_space(self, min_free_fraction: float = 0.25) -> int:
        """Shrink the file when at least ``min_free_fraction`` of it is unused
        (and at least :data:`_RECLAIM_MIN_BYTES`).

        Moving records to COLD shrinks rows to stubs in place, which leaves
        their pages part empty rather than free, so the file keeps the size it
        had before the sweep. Unused space is measured over every page
        (``dbstat``: one read of the file, like the sweep's own idle walk).
        When it is mostly whole free pages, a file made with incremental
        auto-vacuum (every file this version creates) gives them back in steps
        of :data:`_RECLAIM_STEP_PAGES`, each its own short write. Otherwise
        the file is rewritten by ``VACUUM``, which also turns an older file
        incremental; that holds the write lock for the whole rewrite, so it is
        done only for files up to :data:`_VACUUM_MAX_BYTES` (about a second)
        and a larger file is logged instead (``VACUUM`` it while the
        application is stopped). A checkpoint then truncates the file and the WAL.
        """
        conn = self._conn()
        with self._errors():
            page_size, pages, free, mode = (
                int(conn.execute(f"PRAGMA {name}").fetchone()[0])
                for name in ("page_size", "page_count", "freelist_count", "auto_vacuum"))
            total = page_size * pages
            unused = free * page_size + self._unused_in_pages(conn)
        if unused < _RECLAIM_MIN_BYTES or unused < min_free_fraction * total:
            return 0
        if mode == _INCREMENTAL and free * page_size >= unused / 2:
            step = f"PRAGMA incremental_vacuum({_RECLAIM_STEP_PAGES});"
            for _ in range(free // _RECLAIM_STEP_PAGES + 1):
                # executescript runs the pragma to completion; execute() would
                # stop after its first step and free a single page.
                self._write(lambda c: c.executescript(step))
        elif total <= _VACUUM_MAX_BYTES:
            log.info("sqlite: rewriting %s (%d of %d bytes unused)", self.path, unused, total)
            self._write(lambda c: c.executescript("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;"))
        else:
            log.warning("sqlite: %s has %d of %d bytes unused; it is too large to rewrite "
                        "while in use: run VACUUM on it while the application is stopped",
                        self.path, unused, total)
            return 0
        with self._errors():
            after = int(conn.execute("PRAGMA page_count").fetchone()[0])
            # Moves the rewritten pages from the WAL into the file, truncating
            # both; a reader on an old snapshot makes it stop early (the next
            # sweep tries again), which is harmless.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return max(pages - after, 0) * page_size

    @staticmethod
    def _unused_in_pages(conn: sqlite3.Connection) -> int:
        """Bytes unused inside the file's b-tree pages (0 where SQLite is built without ``dbstat``)."""
        try:
            return int(conn.execute(
                "SELECT COALESCE(SUM(unused), 0) FROM dbstat WHERE aggregate = 1").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def stats(self) -> dict[str, Any]:
        conn = self._conn()
        with self._errors():
            live, total, size = conn.execute(
                f"SELECT COUNT(*) FILTER (WHERE expires_at IS NULL OR expires_at > ?),"
                f" COUNT(*), COALESCE(SUM(size_bytes), 0) FROM {self._t}",
                (time.time(),),
            ).fetchone()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            page_count = conn.execute("PRAGMA page_count").fetchone()[0]
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return {
            "backend": self.backend,
            "tier": str(self.tier) if self.tier else None,
            "key_count": live,
            "expired_count": total - live,
            "payload_bytes": size,
            "file_bytes": page_size * page_count,
            "free_bytes": page_size * free_pages,
            "path": self.path,
            "table": self.table,
            "synchronous": self.synchronous,
        }

    # ------------------------------------------------------------ change signal
    def changed_by_others(self) -> bool:
        # Called before every read a private HOT tier serves: the common
        # answer -- nothing committed since this thread last looked -- costs
        # one thread-local lookup and a 96-byte compare.
        local = self._local
        fast = local.fast
        if fast is not None:
            mapped, seen, generation, epoch = fast
            if generation == _fork_generation and epoch == self._epoch:
                try:
                    if mapped[:96] == seen:
                        return False
                except ValueError:  # unmapped by release()
                    pass
        return self._changed_slow(local)

    def _changed_slow(self, local: _ThreadState) -> bool:
        local.fast = None
        conn = local.conn
        generation = local.generation
        if conn is None or generation[0] != _fork_generation or generation[1] != self._epoch:
            conn = self._open(local)
        shm = local.shm
        if shm is not None:
            # Read the header BEFORE the pragma: a commit landing between the
            # two then shows up as a changed header on the next call.
            header = shm.read()
            if header is not None and header == local.header:
                self._remember(local, shm, header)
                return False
        else:
            header = None
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if version != local.data_version:
            local.data_version = version
            # Not remembered: the next call runs the pragma once more and
            # records the header with its False answer, for _open's test.
            local.header = None
            return True
        if shm is not None and header is not None and _settled(header):
            self._remember(local, shm, header)
            if _unique(header):
                self._clean = (shm, header)
        else:
            local.header = None  # read mid-commit: prove nothing with it
        return False

    @staticmethod
    def _remember(local: _ThreadState, shm: _ShmHeader, header: bytes) -> None:
        local.header = header
        mapped = shm.map
        if mapped is not None and shm.generation == _fork_generation:
            local.fast = (mapped, header, _fork_generation, local.generation[1])

    def ping(self) -> float:
        start = time.perf_counter()
        with self._errors():
            self._conn().execute("SELECT 1").fetchone()
        return (time.perf_counter() - start) * 1000.0

    def _drop_inherited(self) -> None:
        """Forget connections opened before a fork, keeping them from the GC."""
        with self._conns_lock:
            inherited = [c for g, _, c in self._conns if g != _fork_generation]
            if inherited:
                _orphans.extend(inherited)
                self._conns = [e for e in self._conns if e[0] == _fork_generation]

    def close(self) -> None:
        self._drop_inherited()
        with self._conns_lock:
            conns, self._conns = self._conns, []
            held, self._shm_held = self._shm_held, set()
            self._clean = None
            self._epoch += 1
        for _, _, conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        for header in held:
            header.release()

    def __repr__(self) -> str:
        return f"<SQLiteStateRepository {str(Path(self.path))!r} table={self.table} tier={self.tier}>"
