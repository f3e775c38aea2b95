"""Private servers a test owns: redis-server and PostgreSQL on free ports.

The shared servers of the test environment (``TIERED_STATE_TEST_*_URL``) are
never stopped, paused or reconfigured; a test that needs to do that to a
server starts its own here. Each server lives in a fresh temporary directory
(removed by :meth:`close`), listens on 127.0.0.1 only, and every wait --
start, readiness, stop -- is bounded. :meth:`close` is idempotent and is also
run at interpreter exit, so a test that dies without its fixture's
``finally`` still leaves no server behind.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

from .support import free_port

__all__ = ["PrivatePostgres", "PrivateRedis"]

_S = TypeVar("_S", bound="_Owned")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return "(no log)"


class _Owned:
    """Close at interpreter exit what a test forgot (or could not) close."""

    def __init__(self) -> None:
        atexit.register(self.close)

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _closed(self) -> None:
        atexit.unregister(self.close)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PrivateRedis(_Owned):
    """A throw-away redis-server on a free port.

    ``persistence=False``: every start is empty (the dump file is removed
    first). ``persistence=True``: nothing is saved on its own (``--save ""``,
    no AOF) -- the test takes snapshots with :meth:`save` / :meth:`bgsave`,
    and a :meth:`restart` after :meth:`kill` comes back with the last one,
    i.e. without every write made after it, as a crashed Redis restarted
    from its RDB file does.
    """

    DBFILENAME = "dump.rdb"

    def __init__(self, *, persistence: bool = False, port: int | None = None,
                 start: bool = True) -> None:
        redis = pytest.importorskip("redis")
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self._redis = redis
        self.binary = binary
        self.persistence = persistence
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ts-redis-"))
        self.logfile = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        super().__init__()
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- addresses
    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, straight to the server (no proxy)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def dump(self) -> Path:
        return self.dir / self.DBFILENAME

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def client(self, timeout: float = 2.0) -> Any:
        """A raw ``redis.Redis`` on the server itself, around any proxy (close it)."""
        return self._redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                                 socket_connect_timeout=timeout)

    def command(self, *args: Any, timeout: float = 5.0) -> Any:
        """One raw command on a fresh connection (``CONFIG SET``, ``FLUSHALL``...)."""
        with self.client(timeout) as c:
            return c.execute_command(*args)

    def raw_get(self, name: str | bytes) -> bytes | None:
        """GET straight from the server, around the proxy."""
        with self.client() as c:
            value: bytes | None = c.get(name)
            return value

    # -- lifecycle
    def start(self, timeout: float = 10.0) -> None:
        """Start the server (from the last snapshot if persistent); wait until it answers PING."""
        if self.proc is not None:
            raise RuntimeError("redis-server is already running")
        if not self.persistence:
            self.dump.unlink(missing_ok=True)
        self.dir.mkdir(exist_ok=True)  # a test may have removed it (a failing BGSAVE)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--dbfilename", self.DBFILENAME,
             "--logfile", str(self.logfile), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal is for pytest, which
            # then stops this server through the fixture.
            start_new_session=True,
        )
        self.paused = False
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING (not LOADING), or raise (bounded)."""
        errors = self._redis.exceptions
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.proc = None
                raise RuntimeError(f"redis-server exited ({code}):\n{_tail(self.logfile)}")
            try:
                with self.client(0.5) as c:
                    if c.ping():
                        return
            except (errors.ConnectionError, errors.TimeoutError, errors.ResponseError) as exc:
                last = exc  # not listening yet, or still loading the dump
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on {self.port} not ready in {timeout}s: {last!r}\n"
                           f"{_tail(self.logfile)}")

    def kill(self) -> None:
        """SIGKILL (kill -9): no shutdown, no save; whatever was not snapshotted is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)  # a stopped process dies of SIGKILL as well
        proc.wait(timeout=10)
        self.paused = False

    stop = kill

    def restart(self, timeout: float = 10.0) -> None:
        """kill -9, then start again on the same port (from the last snapshot if persistent)."""
        self.kill()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a frozen host)."""
        if self.proc is not None and not self.paused:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`: buffered commands run now, late."""
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def save(self) -> None:
        """A snapshot now (SAVE, blocking the server while it writes)."""
        self.command("SAVE", timeout=30)

    def bgsave(self, timeout: float = 30.0) -> bool:
        """A snapshot in a forked child (BGSAVE); waits for it; True if it succeeded."""
        with self.client(5) as c:
            before = int(c.info("persistence")["rdb_last_save_time"])
            c.execute_command("BGSAVE")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = c.info("persistence")
                if not int(info["rdb_bgsave_in_progress"]):
                    if info["rdb_last_bgsave_status"] != "ok":
                        return False
                    if int(info["rdb_last_save_time"]) >= before:
                        return True
                time.sleep(0.01)
        raise TimeoutError(f"BGSAVE did not finish in {timeout}s")

    def close(self) -> None:
        """Kill the server and remove its directory. Idempotent."""
        try:
            if self.proc is not None:
                self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._closed()

    def __repr__(self) -> str:
        return f"<PrivateRedis port={self.port} pid={self.pid} persistence={self.persistence}>"


def _pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (Debian layout, then PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name
                   .isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres(_Owned):
    """A throw-away PostgreSQL cluster: initdb into a temp dir, pg_ctl on a free port.

    Trust authentication for ``postgres`` on 127.0.0.1 and a socket directory
    of its own. ``fsync`` stays on (only initdb skips its syncs), so an
    immediate-mode stop is an honest crash followed by WAL recovery. As root,
    the server binaries run as the ``postgres`` user (``runuser``), which
    owns the directory.

    :attr:`startup_seconds` is how long initdb + start + CREATE DATABASE took.
    """

    def __init__(self, dbname: str = "test", *, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        pytest.importorskip("psycopg2")
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bindir = bindir
        self.dbname = dbname
        self.port = port or free_port()
        self.settings = {"listen_addresses": "127.0.0.1", "max_connections": "200",
                         "shared_buffers": "32MB", **(settings or {})}
        # Not pytest's tmp_path: its parents are 0700 root, which the
        # postgres user cannot traverse.
        self.root = Path(tempfile.mkdtemp(prefix="ts-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.running = False
        self._as_postgres: list[str] = []
        super().__init__()
        started = time.monotonic()
        try:
            self._prepare()
            self.start()
            self._create_database()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - started

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def _prepare(self) -> None:
        self.sockets.mkdir()
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run initdb as")
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--locale=C", "--no-sync", timeout=120)

    def _pg(self, tool: str, *args: str, timeout: float = 60.0, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as_postgres, str(self.bindir / tool), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=self.root, stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} exited {out.returncode}:\n"
                               f"{out.stdout[-2000:]}{out.stderr[-2000:]}\n{_tail(self.logfile)}")
        return out

    def _options(self) -> str:
        opts = [f"-p {self.port}", f"-k {self.sockets}"]
        opts += [f"-c {name}={value}" for name, value in self.settings.items()]
        return " ".join(opts)

    def start(self, timeout: float = 30.0) -> None:
        """pg_ctl start and wait until it accepts connections (bounded)."""
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", self._options(),
                 "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        self.running = True

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """pg_ctl stop: ``fast`` (clean shutdown, clients disconnected) or
        ``immediate`` (a crash: no checkpoint, recovery at the next start)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)),
                 "stop", timeout=timeout + 10)
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop in ``mode`` and start again on the same port."""
        if mode == "fast":
            self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o",
                     self._options(), "-m", "fast", "-w", "-t", "30", "restart", timeout=70)
            self.running = True
            return
        self.crash()

    def crash(self) -> None:
        """Immediate-mode stop (no shutdown checkpoint) and a start that recovers from WAL."""
        self.stop("immediate")
        self.start()

    def connect(self, dbname: str | None = None) -> Any:
        """A psycopg2 connection (autocommit) straight to the server (close it)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname=dbname or self.dbname, connect_timeout=5)
        conn.autocommit = True
        return conn

    def _create_database(self) -> None:
        conn = self.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.dbname}"')
        finally:
            conn.close()

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Stop the server (immediate: nothing is kept) and remove its files. Idempotent."""
        try:
            if self.data.exists():
                with contextlib.suppress(Exception):
                    self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "20",
                             "stop", timeout=30, check=False)
                pid = self._postmaster_pid()
                if pid is not None:  # pg_ctl could not stop it: it must not outlive the test
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            self.running = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._closed()

    def __repr__(self) -> str:
        return f"<PrivatePostgres port={self.port} data={self.data}>"
