"""Test helpers: free ports, server URLs and drivers, TCP proxies to cut.

Server URLs come from ``TIERED_STATE_TEST_{REDIS,POSTGRES,S3}_URL``; drivers
and test tools (redis, psycopg2, boto3, moto, statsd, pydantic...) come from
the extras. A test that lacks one is skipped with the reason, so the no-extras
tox envs run the zero-dependency core. Whether that skip is allowed is decided
in one place, :func:`skip_forbidden`: not when TIERED_STATE_TEST_REQUIRE_ALL=1
(``.ci/run`` sets it, so CI never skips a backend), and not when the test's
backend has its URL set -- whoever set it means that backend's tests to run,
so a missing driver there fails instead of hiding them. A URL that is set but
unreachable fails the test too.
"""

from __future__ import annotations

import importlib
import os
import select
import socket
import threading
import time
import uuid
from types import ModuleType
from typing import NoReturn

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def _url_variable(backend: str) -> str:
    return f"TIERED_STATE_TEST_{backend.upper()}_URL"


def skip_forbidden(backend: str | None = None) -> str | None:
    """Why a skip must be a failure here, or None if skipping is fine.

    The one rule for every skip in the suite (``skip`` below and the
    ``conftest`` hook that turns any other skip into a failure use it):
    TIERED_STATE_TEST_REQUIRE_ALL=1 forbids every skip; a set
    ``TIERED_STATE_TEST_{BACKEND}_URL`` forbids skipping that backend's tests.
    """
    if os.environ.get("TIERED_STATE_TEST_REQUIRE_ALL") == "1":
        return "TIERED_STATE_TEST_REQUIRE_ALL=1 requires every test to run"
    if backend is not None and os.environ.get(_url_variable(backend), "").strip():
        return f"{_url_variable(backend)} is set, so the {backend} tests must run"
    return None


def skip(reason: str, backend: str | None = None) -> NoReturn:
    """Skip the test (or module) with ``reason``, or fail it if :func:`skip_forbidden` says so."""
    forbidden = skip_forbidden(backend)
    if forbidden:
        pytest.fail(f"{reason}; but {forbidden}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def server_url(kind: str) -> str:
    """The URL in ``TIERED_STATE_TEST_{KIND}_URL``, or skip the test with the reason."""
    name = _url_variable(kind)
    url = os.environ.get(name, "").strip()
    if not url:
        skip(f"{name} is not set (.ci/run sets it; see README 'Running the tests')", kind)
    return url


# Top-level module -> (the extra that installs it, the backend whose tests need it).
# The backend ties the driver to its TIERED_STATE_TEST_*_URL: with the URL set,
# a missing driver is a failure, not a skip.
_MODULES: dict[str, tuple[str, str | None]] = {
    "redis": ("redis", "redis"),
    "psycopg2": ("postgres", "postgres"),
    "boto3": ("s3", "s3"),
    "botocore": ("s3", "s3"),
    "statsd": ("statsd", None),
    "orjson": ("fast", None),
    "moto": ("test", None),  # the S3 server the tests start when no S3 URL is set
    "diskcache": ("test", None),
    "pydantic": ("test", None),
    "yaml": ("test", None),  # PyYAML, which moto[server] brings
}


def require_module(name: str, minversion: str | None = None) -> ModuleType:
    """Import ``name`` (a driver or test tool from an extra), or :func:`skip` with the install hint.

    Used in place of ``pytest.importorskip``, at module level or in a test or
    fixture, so that a missing redis, psycopg2 or boto3 follows the same rule
    as a missing server.
    """
    extra, backend = _MODULES.get(name.split(".", 1)[0], ("test", None))
    hint = f"pip install 'tiered-state[{extra}]'"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        missing = f"{name} is not installed ({hint}): {exc}"
    else:
        missing = ""
    if missing:  # outside the except: the report is the reason, not a chained traceback
        skip(missing, backend)
    if minversion is not None:
        # packaging comes with pytest (pytest.importorskip compares versions with it too).
        from packaging.version import Version

        version = str(getattr(module, "__version__", "0"))
        if Version(version) < Version(minversion):
            skip(f"{name} {version} is older than {minversion} ({hint})", backend)
    return module


def unique_name(prefix: str = "ts") -> str:
    """A short unique identifier for a test namespace (table, prefix, bucket)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class TCPProxy:
    """A loopback TCP proxy in front of a server, which a test can cut and restore.

    ``cut()`` closes every open connection and refuses new ones (connections
    are accepted and dropped at once, like a dead peer); ``blackhole()``
    accepts and then never answers, like a network partition, so clients hit
    their timeouts; ``restore()`` forwards again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._mode = "forward"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            mode = self._mode
            if mode == "cut":
                client.close()
                continue
            if mode == "blackhole":
                with self._lock:
                    self._conns.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        # poll, not select: select fails on descriptors above 1024, which a
        # long test run reaches.
        poller = select.poll()
        by_fd = {sock.fileno(): sock for sock in socks}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        try:
            while not self._stop.is_set() and self._mode == "forward":
                for fd, _ in poller.poll(100):
                    sock = by_fd[fd]
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            pass
        finally:
            for sock in socks:
                try:
                    sock.close()
                except OSError:
                    pass

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._mode = "cut"
        self._drop_all()

    def blackhole(self) -> None:
        """Drop every connection; accept new ones but never answer."""
        self._mode = "blackhole"
        self._drop_all()

    def restore(self) -> None:
        """Forward traffic again (existing dead connections stay dead)."""
        self._drop_all()
        self._mode = "forward"

    @property
    def mode(self) -> str:
        """``forward``, ``cut`` or ``blackhole``."""
        return self._mode

    def close(self) -> None:
        """Stop forwarding and listening. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._drop_all()
        self._listener.close()
        self._thread.join(timeout=2)

    def __enter__(self) -> TCPProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProxyGroup:
    """One :class:`TCPProxy` per client in front of one server, by name.

    Each client (a worker process, a manager) is given its own proxy's
    address, so a test can cut every path to the server (a full partition)
    or only one client's (a partial partition: that client cannot reach the
    server while the others still can).
    """

    def __init__(self, target_host: str, target_port: int, names: list[str]) -> None:
        self.proxies: dict[str, TCPProxy] = {}
        try:
            for name in names:
                self.proxies[name] = TCPProxy(target_host, target_port)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> TCPProxy:
        return self.proxies[name]

    @property
    def names(self) -> list[str]:
        return list(self.proxies)

    def address(self, name: str) -> str:
        return self.proxies[name].address

    def cut(self, *names: str) -> None:
        """Cut the named proxies (every one if none is named)."""
        for name in names or tuple(self.proxies):
            self.proxies[name].cut()

    def blackhole(self, *names: str) -> None:
        for name in names or tuple(self.proxies):
            self.proxies[name].blackhole()

    def restore(self, *names: str) -> None:
        """Forward again through the named proxies (every one if none is named)."""
        for name in names or tuple(self.proxies):
            self.proxies[name].restore()

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()

    def __enter__(self) -> ProxyGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
