"""Private servers a test owns: redis-server, PostgreSQL, a Redis Cluster and a
Sentinel-watched primary/replica pair, on free ports.

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
import importlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .support import free_port, require_module, skip

__all__ = ["PrivatePostgres", "PrivateRedis", "PrivateRedisCluster", "PrivateSentinel", "RedisNode"]

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
        redis = require_module("redis")
        binary = shutil.which("redis-server")
        if binary is None:
            skip("redis-server is not installed", "redis")
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
        require_module("psycopg2")
        bindir = _pg_bindir()
        if bindir is None:
            skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed", "postgres")
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
                skip("running as root and there is no postgres user to run initdb as", "postgres")
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


# ---------------------------------------------------------------------------
# Topologies: a Redis Cluster, and a primary/replica pair under Sentinel.
#
# Their ports come from TOPOLOGY_PORTS, not from free_port(): a cluster node
# also listens on port + 10000 (the cluster bus), and both must be free.
# The range keeps both below the kernel's ephemeral range (32768+), so an
# outgoing connection never takes a bus port from under a restarting node.

CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384
TOPOLOGY_PORTS = range(12000, 22000)
_handed_out: set[int] = set()  # ports given to topologies of this process, never twice


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def topology_port(attempts: int = 500) -> int:
    """A free 127.0.0.1 port in :data:`TOPOLOGY_PORTS` whose bus twin (+10000) is free too."""
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randrange(TOPOLOGY_PORTS.start, TOPOLOGY_PORTS.stop)
        if port in _handed_out:
            continue
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port pair in {TOPOLOGY_PORTS} after {attempts} tries")


class _PortTaken(RuntimeError):
    """The port was free when chosen, but someone bound it before redis-server did."""


def _redis_binaries(*tools: str) -> dict[str, str]:
    """``{tool: path}`` for redis-server and friends, or skip the test (CI turns that into a failure)."""
    found: dict[str, str] = {}
    for tool in ("redis-server", *tools):
        path = shutil.which(tool)
        if path is None:
            skip(f"{tool} is not installed", "redis")
        found[tool] = path
    return found


def _pairs(reply: Any) -> dict[str, str]:
    """A ``[k1, v1, k2, v2...]`` (or RESP3 map) reply as a dict of strings."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = [str(x) for x in reply]
    return dict(zip(items[0::2], items[1::2]))


def _info_text(text: str) -> dict[str, str]:
    """``CLUSTER INFO`` (``key:value`` lines) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key] = value
    return out


class RedisNode:
    """One redis-server process of a topology: a cluster node, a monitored server or a sentinel.

    Port, directory and arguments stay the same across :meth:`start` calls,
    so a restarted cluster node finds its ``nodes.conf`` (identity, epoch,
    peers) and a sentinel its own rewritten ``sentinel.conf``. Nothing is
    persisted otherwise (``--save ""``, no AOF): a restarted data node comes
    back empty and, as a replica, gets everything again from its primary.
    """

    def __init__(self, redis: Any, binary: str, name: str, port: int, directory: Path,
                 argv: list[str]) -> None:
        self._redis = redis
        self.binary = binary
        self.name = name
        self.port = port
        self.dir = directory
        self.logfile = directory / "redis.log"
        self.argv = argv  # everything after the binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id: str | None = None  # cluster nodes: CLUSTER MYID, stable across restarts
        self.killed_at: float | None = None  # time.monotonic() of the last kill()
        self.slots_at_kill: tuple[str, ...] = ()  # cluster nodes: the slot ranges it served then

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 2.0) -> Any:
        """A raw ``redis.Redis`` (str replies) on this very process; close it."""
        return self._redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                                 socket_connect_timeout=timeout, decode_responses=True)

    def command(self, *args: Any, timeout: float = 2.0) -> Any:
        """One command on a fresh connection."""
        with self.client(timeout) as c:
            return c.execute_command(*args)

    @property
    def role(self) -> str:
        """``master``, ``slave`` or ``sentinel`` (ROLE, asked now); ``down`` if it does not answer."""
        if not self.alive:
            return "down"
        try:
            return str(self.command("ROLE", timeout=1.0)[0])
        except self._redis.exceptions.RedisError:
            return "down"

    def start(self, timeout: float = 15.0, extra: list[str] | None = None) -> None:
        """Start the process (``extra`` arguments for this start only); wait until it answers PING."""
        if self.alive:
            raise RuntimeError(f"{self} is already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, *self.argv, *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            cwd=self.dir, start_new_session=True,  # a Ctrl-C is for pytest, not for the servers
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        errors = self._redis.exceptions
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.alive:
                code = None if self.proc is None else self.proc.returncode
                self.proc = None
                log = _tail(self.logfile)
                if "Address already in use" in log:
                    raise _PortTaken(f"{self.name}: port {self.port} taken:\n{log}")
                raise RuntimeError(f"{self.name} (port {self.port}) exited ({code}):\n{log}")
            try:
                with self.client(0.5) as c:
                    if c.ping():
                        return
            except (errors.ConnectionError, errors.TimeoutError, errors.ResponseError) as exc:
                last = exc
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} (port {self.port}) not ready in {timeout}s: {last!r}\n"
                           f"{_tail(self.logfile)}")

    def kill(self) -> None:
        """SIGKILL and reap it (bounded). Harmless if it is not running."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        self.killed_at = time.monotonic()
        proc.wait(timeout=10)

    def __repr__(self) -> str:
        return f"<RedisNode {self.name} port={self.port} pid={self.pid}>"


class _Topology(_Owned):
    """Shared plumbing: a temp root with one directory per process, all killed by close()."""

    def __init__(self, prefix: str, *tools: str) -> None:
        self._redis = require_module("redis")
        self.binaries = _redis_binaries(*tools)
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self._all: list[RedisNode] = []  # every process ever started, for close()
        super().__init__()

    def _spawn(self, name: str, argv_for: Callable[[int, Path], list[str]],
               timeout: float = 15.0, attempts: int = 5) -> RedisNode:
        """Start a node on a fresh port; another port if one was taken meanwhile (bounded)."""
        for attempt in range(attempts):
            port = topology_port()
            directory = self.root / f"{name}-{port}"
            directory.mkdir()
            node = RedisNode(self._redis, self.binaries["redis-server"], name, port, directory,
                             argv_for(port, directory))
            self._all.append(node)
            try:
                node.start(timeout)
                return node
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _logs(self, nodes: list[RedisNode] | None = None, lines: int = 8) -> str:
        return "\n".join(f"--- {n.name} :{n.port}\n{_tail(n.logfile, lines)}"
                         for n in (nodes if nodes is not None else self._all))

    def close(self) -> None:
        """SIGKILL every process it ever started, remove the files. Idempotent."""
        try:
            for node in self._all:
                with contextlib.suppress(Exception):
                    node.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._closed()

    @property
    def pids(self) -> list[int]:
        """Pids of the processes running now."""
        return [n.proc.pid for n in self._all if n.proc is not None and n.alive]


class _ClusterEntry:
    """One line of CLUSTER NODES."""

    def __init__(self, line: str) -> None:
        parts = line.split()
        self.id = parts[0]
        self.port = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1])
        self.flags = set(parts[2].split(","))
        self.master_id = None if parts[3] == "-" else parts[3]
        self.slots = tuple(s for s in parts[8:] if not s.startswith("["))  # no migrating marks

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags  # agreed failure; "fail?" is one node's suspicion

    def serves(self, slot: int) -> bool:
        for rng in self.slots:
            low, _, high = rng.partition("-")
            if int(low) <= slot <= int(high or low):
                return True
        return False


class PrivateRedisCluster(_Topology):
    """A throw-away Redis Cluster: ``primaries`` x (1 + ``replicas``) redis-server processes.

    Every node has its own directory and ``nodes.conf`` and a short
    ``cluster-node-timeout`` (failover in a couple of seconds); the cluster
    is formed with ``redis-cli --cluster create`` and the constructor returns
    once every node reports ``cluster_state:ok`` with all 16384 slots served,
    all views agree on who serves what and every replica's link is up.
    ``cluster-replica-validity-factor 0``: a replica always may take over.

    :meth:`kill` is SIGKILL; :meth:`wait_failover` waits for a replica of a
    killed primary to take its slots; :meth:`restart` brings a node back on
    the same port with the same identity -- a failed-over primary rejoins as
    a replica of its successor (empty first, then a full sync).
    """

    def __init__(self, primaries: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000,
                 timeout: float = 60.0) -> None:
        super().__init__("ts-cluster-", "redis-cli")
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisNode] = []
        self.startup_nodes: list[RedisNode] = []
        started = time.monotonic()
        try:
            self._form(primaries, replicas, timeout)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - started

    def _argv(self, port: int, directory: Path) -> list[str]:
        return ["--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no",
                "--save", "", "--appendonly", "no", "--dir", str(directory),
                "--logfile", str(directory / "redis.log"), "--daemonize", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync-delay", "0"]

    def _form(self, primaries: int, replicas: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for i in range(primaries * (1 + replicas)):
            self.nodes.append(self._spawn(f"node{i}", self._argv))
        for node in self.nodes:
            node.node_id = str(node.command("CLUSTER", "MYID"))
        out = subprocess.run(
            [self.binaries["redis-cli"], "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=max(5.0, deadline - time.monotonic()),
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create exited {out.returncode}:\n"
                               f"{out.stdout[-3000:]}{out.stderr[-2000:]}")
        self.wait_healthy(max(5.0, deadline - time.monotonic()))
        self.startup_nodes = self.primaries()

    # -- addresses and clients
    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/0`` (the initial primaries)."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.startup_nodes)
        return f"redis+cluster://{hosts}/0"

    def client(self, timeout: float = 2.0, **kwargs: Any) -> Any:
        """A raw ``redis.cluster.RedisCluster`` knowing every node as a startup node; close it."""
        cluster = importlib.import_module("redis.cluster")
        return cluster.RedisCluster(startup_nodes=[cluster.ClusterNode("127.0.0.1", n.port)
                                                   for n in self.nodes],
                            socket_timeout=timeout, socket_connect_timeout=timeout, **kwargs)

    def node(self, port: int) -> RedisNode:
        for n in self.nodes:
            if n.port == port:
                return n
        raise LookupError(f"no node on port {port}")

    # -- the cluster's own view
    def view(self, node: RedisNode | None = None) -> dict[str, _ClusterEntry]:
        """CLUSTER NODES as seen by ``node`` (default: the first live node that answers)."""
        errors = self._redis.exceptions
        candidates = [node] if node is not None else [n for n in self.nodes if n.alive]
        last: BaseException | None = None
        for n in candidates:
            try:
                text = str(n.command("CLUSTER", "NODES", timeout=1.0))
            except errors.RedisError as exc:
                last = exc
                continue
            entries = [_ClusterEntry(line) for line in text.splitlines() if line.strip()]
            return {e.id: e for e in entries}
        raise RuntimeError(f"no node answers CLUSTER NODES: {last!r}")

    def _by_id(self, node_id: str) -> RedisNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise LookupError(f"unknown node id {node_id}")

    def primaries(self) -> list[RedisNode]:
        """The primaries serving slots now (not failed), in slot order."""
        entries = sorted((e for e in self.view().values()
                          if e.is_master and not e.failed and e.slots),
                         key=lambda e: int(e.slots[0].split("-")[0]))
        return [self._by_id(e.id) for e in entries]

    def replicas(self) -> list[RedisNode]:
        """The replicas now (not failed)."""
        return [self._by_id(e.id) for e in self.view().values()
                if "slave" in e.flags and not e.failed]

    def primary_for(self, key: str) -> RedisNode:
        """The node serving ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for e in self.view().values():
            if e.is_master and not e.failed and e.serves(slot):
                return self._by_id(e.id)
        raise LookupError(f"slot {slot} ({key!r}) is not served by anyone now")

    # -- health
    def _problem(self) -> str | None:
        """Why the cluster is not (yet) healthy among its live nodes, or None."""
        errors = self._redis.exceptions
        alive = [n for n in self.nodes if n.alive]
        alive_ids = {n.node_id for n in alive}
        agreed: frozenset[tuple[str, bool, str | None, tuple[str, ...]]] | None = None
        for n in alive:
            try:
                info = _info_text(str(n.command("CLUSTER", "INFO", timeout=1.0)))
                if info.get("cluster_state") != "ok":
                    return f"{n.name}: cluster_state {info.get('cluster_state')}"
                if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                    return f"{n.name}: cluster_slots_ok {info.get('cluster_slots_ok')}"
                view = self.view(n)
                for node_id in alive_ids:
                    entry = view.get(str(node_id))
                    if entry is None or entry.failed or "fail?" in entry.flags:
                        return f"{n.name} does not see {node_id} as healthy"
                # Who serves which slots, and which live node follows which primary.
                layout = frozenset((e.id, e.is_master, e.master_id, e.slots) for e in view.values()
                                   if e.slots or e.id in alive_ids)
                if agreed is None:
                    agreed = layout
                elif layout != agreed:
                    return f"{n.name} disagrees about the layout (slots, replicas)"
                mine = view[str(n.node_id)]
                if mine.is_master and not mine.slots:
                    return f"{n.name} is a primary without slots (not a replica yet)"
                if "slave" in mine.flags:
                    link = n.client(1.0)
                    try:
                        status = link.info("replication").get("master_link_status")
                    finally:
                        link.close()
                    if status != "up":
                        return f"{n.name}: master_link_status {status}"
            except errors.RedisError as exc:
                return f"{n.name}: {exc!r}"
        return None

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Until every live node says cluster_state:ok with 16384 slots served, all agree on who
        serves which slots and who replicates whom, every live node sees every other live node
        healthy, and every live node is a primary with slots or a replica with its link up.
        Returns seconds.

        A node killed less than a node-timeout ago is not yet noticed: use
        :meth:`wait_failover` after a kill.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            problem = self._problem()
            if problem is None:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not healthy after {timeout}s: {problem}\n{self._logs()}")
            time.sleep(0.05)

    # -- faults
    def kill(self, node: RedisNode) -> None:
        """SIGKILL one node (its slots, if a primary, are remembered for :meth:`wait_failover`)."""
        node.slots_at_kill = ()
        with contextlib.suppress(Exception):
            mine = self.view().get(str(node.node_id))
            node.slots_at_kill = mine.slots if mine is not None and mine.is_master else ()
        node.kill()

    def wait_failover(self, old_primary: RedisNode, timeout: float = 30.0) -> float:
        """Until a replica of the killed ``old_primary`` serves its slots and every surviving
        node says cluster_state:ok. Returns the seconds since the kill."""
        if old_primary.alive:
            raise RuntimeError(f"{old_primary} is still running: kill() it first")
        if not old_primary.slots_at_kill:
            raise ValueError(f"{old_primary} served no slots when it was killed")
        errors = self._redis.exceptions
        first_slot = int(old_primary.slots_at_kill[0].split("-")[0])
        killed_at = old_primary.killed_at or time.monotonic()
        deadline = time.monotonic() + timeout
        problem: str | None = "not checked"
        while time.monotonic() <= deadline:
            problem = self._failover_problem(old_primary, first_slot, errors)
            if problem is None:
                return time.monotonic() - killed_at
            time.sleep(0.05)
        raise TimeoutError(f"no failover of {old_primary.name} within {timeout}s: {problem}\n"
                           f"{self._logs()}")

    def _failover_problem(self, old: RedisNode, slot: int, errors: Any) -> str | None:
        successor: str | None = None
        for n in (n for n in self.nodes if n.alive):
            try:
                info = _info_text(str(n.command("CLUSTER", "INFO", timeout=1.0)))
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(
                        CLUSTER_SLOTS):
                    return f"{n.name}: cluster_state {info.get('cluster_state')}"
                view = self.view(n)
            except errors.RedisError as exc:
                return f"{n.name}: {exc!r}"
            entry = view.get(str(old.node_id))
            if entry is not None and (entry.slots or not entry.failed):
                return f"{n.name} still sees {old.name} as {sorted(entry.flags)} {entry.slots}"
            owners = [e.id for e in view.values() if e.is_master and not e.failed and e.serves(slot)]
            if len(owners) != 1 or (successor is not None and owners[0] != successor):
                return f"{n.name} sees slot {slot} served by {owners}"
            successor = owners[0]
        if successor is None:
            return "no live node"
        new = self._by_id(successor)
        if new.role != "master":
            return f"{new.name} does not answer ROLE as master yet"
        return None

    def restart(self, node: RedisNode, timeout: float = 30.0) -> float:
        """kill -9 if running, start again on the same port with the same nodes.conf, and wait
        until the cluster is healthy with it (a failed-over primary is then a synced replica).
        Returns seconds."""
        started = time.monotonic()
        node.kill()
        node.start(timeout)
        self.wait_healthy(max(1.0, timeout - (time.monotonic() - started)))
        return time.monotonic() - started

    def __repr__(self) -> str:
        return f"<PrivateRedisCluster ports={[n.port for n in self.nodes]}>"


class PrivateSentinel(_Topology):
    """A primary, a replica (``--replicaof``) and three sentinels watching them as ``service``.

    Each sentinel has its own generated ``sentinel.conf`` (``down-after``
    ~1 s, ``failover-timeout`` ~3 s, quorum 2, no hostname resolution). The
    constructor returns once every sentinel knows the primary, the healthy
    replica and the other sentinels, and all agree on the primary.
    """

    def __init__(self, service: str = "tsmaster", *, sentinels: int = 3, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                 timeout: float = 60.0) -> None:
        super().__init__("ts-sentinel-")
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []
        started = time.monotonic()
        try:
            deadline = started + timeout
            primary = self._spawn("server0", self._server_argv)
            self.servers.append(primary)
            self.servers.append(self._spawn(
                "server1", lambda port, d: [*self._server_argv(port, d),
                                            "--replicaof", "127.0.0.1", str(primary.port)]))
            self._wait_link(self.servers[1], deadline - time.monotonic())
            for i in range(sentinels):
                self.sentinels.append(self._spawn(f"sentinel{i}", self._sentinel_argv))
            self.wait_known(max(5.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - started

    def _server_argv(self, port: int, directory: Path) -> list[str]:
        return ["--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no",
                "--save", "", "--appendonly", "no", "--dir", str(directory),
                "--logfile", str(directory / "redis.log"), "--daemonize", "no",
                "--repl-diskless-sync-delay", "0"]

    def _sentinel_argv(self, port: int, directory: Path) -> list[str]:
        primary = self.servers[0]
        conf = directory / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", "protected-mode no", "daemonize no",
            f"dir {directory}", f"logfile {directory / 'redis.log'}",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {self.service} 127.0.0.1 {primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
            "",
        ]))
        return [str(conf), "--sentinel"]

    @property
    def nodes(self) -> list[RedisNode]:
        """The data servers, then the sentinels."""
        return self.servers + self.sentinels

    # -- addresses and clients
    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/SERVICE/0``."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def sentinel_client(self, timeout: float = 2.0, **kwargs: Any) -> Any:
        """A raw ``redis.sentinel.Sentinel`` on the three sentinels (``.master_for(service)``)."""
        sentinel = importlib.import_module("redis.sentinel")
        return sentinel.Sentinel([s.address for s in self.sentinels], socket_timeout=timeout,
                        socket_connect_timeout=timeout,
                        sentinel_kwargs={"socket_timeout": timeout,
                                         "socket_connect_timeout": timeout}, **kwargs)

    def node(self, address: tuple[str, int]) -> RedisNode:
        for n in self.nodes:
            if n.port == address[1]:
                return n
        raise LookupError(f"no process on {address}")

    # -- what the sentinels say
    def _ask(self, sentinel: RedisNode, *args: Any) -> Any:
        return sentinel.command("SENTINEL", *args, timeout=1.0)

    def primaries_reported(self) -> list[tuple[str, int] | None]:
        """Each live sentinel's GET-MASTER-ADDR-BY-NAME (None if it does not answer)."""
        errors = self._redis.exceptions
        out: list[tuple[str, int] | None] = []
        for s in self.sentinels:
            if not s.alive:
                continue
            try:
                host, port = self._ask(s, "GET-MASTER-ADDR-BY-NAME", self.service)
                out.append((str(host), int(port)))
            except (errors.RedisError, TypeError, ValueError):
                out.append(None)
        return out

    def primary(self) -> tuple[str, int]:
        """The primary as most live sentinels report it now: ``(host, port)``."""
        answers = [a for a in self.primaries_reported() if a is not None]
        if not answers:
            raise RuntimeError(f"no sentinel reports a primary for {self.service}")
        return max(answers, key=answers.count)

    def _sentinel_problem(self, s: RedisNode, primary: tuple[str, int]) -> str | None:
        master = _pairs(self._ask(s, "MASTER", self.service))
        flags = set(master.get("flags", "").split(","))
        if flags != {"master"}:
            return f"{s.name}: primary flags {sorted(flags)}"
        if (master.get("ip"), int(master.get("port", 0))) != primary:
            return f"{s.name}: primary {master.get('ip')}:{master.get('port')}, not {primary}"
        if master.get("last-ping-sent") != "0":
            # After a switch the sentinel's link to the new primary starts afresh, with a PING
            # counted as sent: until a reply comes, it may call the primary down again once
            # down-after has passed (a second, spurious failover). Settled means answered.
            return f"{s.name}: no PING reply from the primary since {master.get('last-ping-sent')}ms"
        if int(master.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
            return f"{s.name} knows {master.get('num-other-sentinels')} other sentinels"
        replicas = {int(r["port"]): r for r in map(_pairs, self._ask(s, "REPLICAS", self.service))}
        for n in self.servers:
            if n.port == primary[1] or not n.alive:
                continue
            r = replicas.get(n.port)
            if r is None:
                return f"{s.name} does not know replica {n.name}"
            if set(r.get("flags", "").split(",")) != {"slave"} or r.get("master-link-status") != "ok":
                return f"{s.name}: replica {n.name} {r.get('flags')} link {r.get('master-link-status')}"
            if int(r.get("master-port", 0)) != primary[1]:
                return f"{s.name}: replica {n.name} follows :{r.get('master-port')}"
        return None

    def _problem(self) -> str | None:
        errors = self._redis.exceptions
        try:
            reported = self.primaries_reported()
            if not reported or None in reported or len(set(reported)) != 1:
                return f"sentinels report primaries {reported}"
            primary = reported[0]
            assert primary is not None
            if self.node(primary).role != "master":
                return f"{primary} does not answer ROLE as master"
            for s in self.sentinels:
                if s.alive:
                    problem = self._sentinel_problem(s, primary)
                    if problem is not None:
                        return problem
        except (errors.RedisError, LookupError, KeyError, ValueError) as exc:
            return repr(exc)
        return None

    def wait_known(self, timeout: float = 30.0) -> float:
        """Until every live sentinel agrees on the primary (which answers ROLE master), has had a
        PING reply from it, knows every live replica following it with its link up, and knows
        the other sentinels. Returns seconds."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            problem = self._problem()
            if problem is None:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TimeoutError(f"sentinels not settled after {timeout}s: {problem}\n"
                                   f"{self._logs()}")
            time.sleep(0.05)

    def _wait_link(self, replica: RedisNode, timeout: float) -> None:
        deadline = time.monotonic() + max(1.0, timeout)
        status: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(self._redis.exceptions.RedisError):
                link = replica.client(1.0)
                try:
                    status = link.info("replication").get("master_link_status")
                finally:
                    link.close()
                if status == "up":
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{replica.name}: master_link_status {status}\n{self._logs()}")

    # -- faults
    def kill_primary(self) -> tuple[str, int]:
        """SIGKILL the process of the current primary; returns its address (for wait_failover)."""
        address = self.primary()
        self.node(address).kill()
        return address

    def wait_failover(self, old: tuple[str, int], timeout: float = 30.0) -> float:
        """Until every live sentinel reports another server than ``old`` as primary, that one
        answers ROLE as master, and the sentinels have settled on it (:meth:`wait_known`: each
        has had a PING reply from it, knows the live replicas following it). Returns the
        seconds since ``old`` was killed."""
        killed_at = self.node(old).killed_at or time.monotonic()
        deadline = time.monotonic() + timeout
        reported: list[tuple[str, int] | None] = []
        problem: str | None = "not checked"
        while time.monotonic() <= deadline:
            reported = self.primaries_reported()
            if reported and None not in reported and len(set(reported)) == 1 and reported[0] != old:
                problem = self._problem()
                if problem is None:
                    return time.monotonic() - killed_at
            else:
                problem = f"sentinels report {reported}"
            time.sleep(0.05)
        raise TimeoutError(f"no failover away from {old} within {timeout}s: {problem}\n"
                           f"{self._logs()}")

    def restart(self, node: RedisNode | tuple[str, int], timeout: float = 30.0, *,
                as_replica: bool = True) -> float:
        """kill -9 if running, start again on the same port, wait until the sentinels agree again.

        A data server that is not the reported primary starts with
        ``--replicaof <current primary>`` (``as_replica=False``: as a
        primary, as a crashed host restarted with its old config would be,
        and the sentinels must demote it). Returns seconds.
        """
        started = time.monotonic()
        target = node if isinstance(node, RedisNode) else self.node(node)
        target.kill()
        extra: list[str] = []
        if target in self.servers:
            target.argv = self._server_argv(target.port, target.dir)  # no stale --replicaof
            primary = self.primary()
            if as_replica and primary[1] != target.port:
                extra = ["--replicaof", primary[0], str(primary[1])]
        target.start(timeout, extra)
        if extra:
            self._wait_link(target, timeout - (time.monotonic() - started))
        self.wait_known(max(1.0, timeout - (time.monotonic() - started)))
        return time.monotonic() - started

    def __repr__(self) -> str:
        return (f"<PrivateSentinel {self.service} servers={[n.port for n in self.servers]} "
                f"sentinels={[s.port for s in self.sentinels]}>")
