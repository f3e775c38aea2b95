"""Test helpers: free ports, server URLs from the environment, TCP proxies to cut.

Server URLs come from ``TIERED_STATE_TEST_{REDIS,POSTGRES,S3}_URL``. Unset:
the test is skipped with the reason. Set but unreachable: the test fails --
``.ci/run`` sets them all, so CI never skips a backend.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import uuid

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


def server_url(kind: str) -> str:
    """The URL in ``TIERED_STATE_TEST_{KIND}_URL``, or skip the test with the reason."""
    name = f"TIERED_STATE_TEST_{kind.upper()}_URL"
    url = os.environ.get(name, "").strip()
    if not url:
        pytest.skip(f"{name} is not set (.ci/run sets it; see README 'Running the tests')")
    return url


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
