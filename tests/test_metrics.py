"""Metrics: the StatsD packets a run sends, collectors, and the contrib files.

A real UDP socket on 127.0.0.1 plays the StatsD server; every backend is
driven through :class:`InstrumentedRepository` (and the embedded store
through the manager) and the exact names and types on the wire are asserted.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state.config import ENV_STATSD, open_repository
from tiered_state.errors import BackendError, BackendUnavailableError, ConfigurationError
from tiered_state.metrics import (
    InMemoryMetrics,
    InstrumentedRepository,
    MetricsCollector,
    NullMetrics,
    StatsdMetrics,
    as_collector,
    metrics_from_env,
    parse_address,
)
from tiered_state.repositories.base import StateRepository
from tiered_state.repositories.memory_repository import MemoryStateRepository
from tiered_state.testing import make

from .support import free_port, require_module, unique_name

statsd = require_module("statsd")

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
SEED_COUNTERS = ("fetch", "store", "delete", "store_many", "delete_many")


class StatsdServer:
    """A UDP socket on loopback standing in for a StatsD server.

    A thread reads it all the time, as a real server does: read only at the
    end, a burst larger than the kernel's socket buffer would be dropped by
    the kernel and look like datagrams the library lost.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        # And a large buffer for the moments the reader waits for the GIL
        # (beyond the system's cap only as root: SO_RCVBUFFORCE).
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            try:
                if option is not None:
                    self.sock.setsockopt(socket.SOL_SOCKET, option, 8 * 1024 * 1024)
                    break
            except OSError:
                continue
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self._taken = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            self.datagrams.append(data)
            self._last = time.monotonic()

    def receive(self, quiet: float = 0.3) -> list[tuple[str, str, str, float]]:
        """Lines received since the last call, once the socket stayed quiet for
        ``quiet`` seconds (at most 10 s): (name, value, type, rate)."""
        deadline = time.monotonic() + 10.0
        started = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() - max(self._last, started) >= quiet:
                break
            time.sleep(0.02)
        end = len(self.datagrams)  # the reader may append meanwhile: take a fixed slice
        taken, self._taken = self.datagrams[self._taken:end], end
        lines: list[tuple[str, str, str, float]] = []
        for data in taken:
            for line in data.decode("ascii").split("\n"):
                name, _, rest = line.partition(":")
                fields = rest.split("|")
                rate = float(fields[2][1:]) if len(fields) > 2 else 1.0
                lines.append((name, fields[0], fields[1], rate))
        return lines

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=2.0)
        self.sock.close()


def totals(lines: list[tuple[str, str, str, float]], kind: str = "c") -> dict[str, float]:
    """Sum of the values per name for lines of one type (as the server would)."""
    out: dict[str, float] = {}
    for name, value, typ, rate in lines:
        if typ == kind:
            out[name] = out.get(name, 0) + float(value.lstrip("+")) / rate
    return out


def names(lines: list[tuple[str, str, str, float]], kind: str) -> set[str]:
    return {name for name, _, typ, _ in lines if typ == kind}


@pytest.fixture
def server() -> Iterator[StatsdServer]:
    srv = StatsdServer()
    yield srv
    srv.close()


@pytest.fixture
def collector(server: StatsdServer) -> Iterator[StatsdMetrics]:
    # A long interval: the test decides when packets go out (flush()).
    metrics = StatsdMetrics("127.0.0.1", server.port, flush_interval=3600)
    yield metrics
    metrics.close()


# ------------------------------------------------------------------ backends
def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    yield MemoryStateRepository()


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    with open_repository(f"sqlite:///{tmp_path}/warm.db") as repo:
        yield repo


def _filesystem(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    with open_repository(f"file://{tmp_path}/cold") as repo:
        yield repo


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    url = request.getfixturevalue("redis_url")
    with open_repository(url, prefix=unique_name("metrics") + ":") as repo:
        yield repo
        repo.clear()


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    url = request.getfixturevalue("postgres_url")
    table = unique_name("ts_metrics")
    with open_repository(url, table=table) as repo:
        yield repo
    psycopg2 = require_module("psycopg2")
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    url = request.getfixturevalue("s3_url")
    with open_repository(url) as repo:
        yield repo


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Iterator[StateRepository]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "filesystem": _filesystem,
    "redis": _redis,
    "postgres": _postgres,
    "s3": _s3,
}


@pytest.fixture(params=list(BACKENDS))
def backend_repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    yield from BACKENDS[request.param](request, tmp_path)


def test_every_backend_sends_the_seed_names_over_udp(
    backend_repo: StateRepository, server: StatsdServer, collector: StatsdMetrics
) -> None:
    repo = InstrumentedRepository(backend_repo, collector)
    backend = backend_repo.backend
    repo.store("a", *make(1))
    assert repo.fetch("a") == 1
    assert repo.fetch_record("zz") is None
    repo.store_many({"b": make(2), "c": make(3), "d": make(4)})
    assert set(repo.fetch_many(["b", "c", "x"])) == {"b", "c"}
    assert repo.delete("a") is True
    assert repo.delete_many(["b", "c"]) == 2
    assert repo.keys("*") == ["d"]
    repo.touch_many(["d"], 0.0)
    collector.flush()
    lines = server.receive()

    p = f"state.repository.{backend}.operations."
    assert totals(lines) == {
        p + "fetch_total": 2,
        p + "store_total": 1,
        p + "delete_total": 1,
        p + "store_many_total": 1,
        p + "delete_many_total": 1,
        p + "fetch_many_total": 1,
        p + "keys_total": 1,
        p + "touch_many_total": 1,
    }
    ops = ("fetch", "store", "delete", "store_many", "delete_many", "fetch_many", "keys")
    assert names(lines, "ms") == {p + op + "_latency_ms" for op in (*ops, "touch_many")} | {p + "batch_size"}
    batch = sorted(float(v) for n, v, t, _ in lines if n == p + "batch_size")
    assert batch == [1.0, 2.0, 3.0, 3.0]  # touch_many, delete_many, fetch_many, store_many
    latencies = [float(v) for n, v, t, _ in lines if n.endswith("_latency_ms")]
    assert all(0 <= v < 60_000 for v in latencies)
    assert not any(n.endswith("errors_total") for n, *_ in lines)
    assert all(len(d) <= collector.max_packet for d in server.datagrams)


def test_the_manager_sends_manager_counters_and_sweep_gauges(
    tmp_path: Path, server: StatsdServer, collector: StatsdMetrics
) -> None:
    with tiered_state.open(tmp_path, metrics=collector) as state:
        assert all(isinstance(r, InstrumentedRepository) for r in state.repositories.values())
        state.set("k", {"qty": 1.5})
        assert state.get("k") == {"qty": 1.5}
        assert state.get("missing") is None
        state.sweep()
        collector.flush()
        lines = server.receive()
    counters = totals(lines)
    assert counters["state.manager.hit_hot"] == 1
    assert counters["state.manager.miss"] == 1
    assert counters["state.repository.memory.operations.store_total"] >= 1
    assert counters["state.repository.sqlite.operations.store_total"] >= 1
    assert "state.repository.memory.operations.fetch_latency_ms" in names(lines, "ms")
    gauges = names(lines, "g")
    assert gauges and all(g.startswith("state.manager.sweep.") for g in gauges)


def test_a_statsd_client_can_be_passed_directly(tmp_path: Path, server: StatsdServer) -> None:
    client = statsd.StatsClient("127.0.0.1", server.port)
    repo = InstrumentedRepository(MemoryStateRepository(), client)
    repo.store_many({"a": make(1), "b": make(2)})
    with tiered_state.open(tmp_path, metrics=client) as state:
        state.set("k", 1)
        assert state.get("k") == 1
    lines = server.receive()
    p = "state.repository.memory.operations."
    assert (p + "store_many_total", "1", "c", 1.0) in lines
    assert (p + "batch_size", "2.000000", "ms", 1.0) in lines
    assert totals(lines)["state.manager.hit_hot"] == 1


def test_metrics_none_records_nothing(tmp_path: Path, server: StatsdServer) -> None:
    with tiered_state.open(tmp_path) as state:
        assert state.metrics is None
        assert not any(isinstance(r, InstrumentedRepository) for r in state.repositories.values())
        state.set("k", 1)
        assert state.get("k") == 1
        assert "metrics" not in state.stats()["manager"]
    assert server.receive(quiet=0.2) == []


def test_environment_variable_builds_a_statsd_collector(
    tmp_path: Path, server: StatsdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_STATSD, f"127.0.0.1:{server.port}")
    monkeypatch.setenv(ENV_STATSD + "_PREFIX", "app")
    with tiered_state.open(tmp_path) as state:
        assert isinstance(state.metrics, StatsdMetrics)
        state.set("k", 1)
        state.get("k")
        state.metrics.flush()
    lines = server.receive()
    assert totals(lines)["app.state.manager.hit_hot"] == 1
    assert all(name.startswith("app.state.") for name, *_ in lines)


# ------------------------------------------------------------------ faults
def test_a_dead_statsd_port_does_not_break_operations(tmp_path: Path) -> None:
    metrics = StatsdMetrics("127.0.0.1", free_port(), flush_interval=0.01)
    with tiered_state.open(tmp_path, metrics=metrics) as state:
        for i in range(50):
            state.set(f"k{i}", i)
            assert state.get(f"k{i}") == i
        metrics.flush()
    metrics.close()


def test_an_unresolvable_host_is_retried_and_never_raises(
    server: StatsdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def no_dns(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "statsd.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    metrics = StatsdMetrics("statsd.example", server.port, flush_interval=3600)
    repo = InstrumentedRepository(MemoryStateRepository(), metrics)
    repo.store("a", *make(1))
    metrics.flush()
    assert metrics.dropped_flushes == 1
    # DNS is back: the next flush resolves and sends.
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k))
    repo.store("b", *make(2))
    metrics.close()
    assert totals(server.receive())["state.repository.memory.operations.store_total"] == 1


def test_errors_total_counts_a_server_that_is_down(server: StatsdServer) -> None:
    require_module("redis")
    metrics = StatsdMetrics("127.0.0.1", server.port, flush_interval=3600)
    url = f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=0.2&socket_timeout=0.2"
    with InstrumentedRepository(open_repository(url), metrics) as repo:
        with pytest.raises(BackendUnavailableError):
            repo.fetch("a")
        with pytest.raises(BackendUnavailableError):
            repo.store_many({"a": make(1)})
    metrics.close()
    counters = totals(server.receive())
    p = "state.repository.redis.operations."
    assert counters[p + "errors_total"] == 2
    assert counters[p + "fetch_total"] == 1
    assert counters[p + "store_many_total"] == 1


@pytest.mark.parametrize("error", [BackendError("boom", backend="memory"), RuntimeError("raw")])
def test_errors_total_counts_every_exception(error: Exception) -> None:
    # A mock failure: a driver error slipping through untranslated must count too.
    inner = MemoryStateRepository()

    def fail(*args: Any) -> None:
        raise error

    inner.delete_many = fail  # type: ignore[assignment,method-assign]
    metrics = InMemoryMetrics()
    repo = InstrumentedRepository(inner, metrics)
    with pytest.raises(type(error)):
        repo.delete_many(["a"])
    p = "state.repository.memory.operations."
    assert metrics.counters[p + "errors_total"] == 1
    assert metrics.counters[p + "delete_many_total"] == 1
    assert metrics.timers[p + "delete_many_latency_ms"]


def test_a_failing_collector_never_raises_into_the_caller(tmp_path: Path) -> None:
    class Broken:
        def incr(self, *args: Any) -> None:
            raise OSError("socket gone")

        timing = gauge = incr

    with tiered_state.open(tmp_path, metrics=Broken()) as state:  # type: ignore[arg-type]
        state.set("k", 1)
        assert state.get("k") == 1
        state.sweep()


# ------------------------------------------------------------------ aggregation
def test_counters_are_exact_across_threads(server: StatsdServer, collector: StatsdMetrics) -> None:
    tick = collector.ticker("ops").tick

    def work() -> None:
        for _ in range(5000):
            collector.incr("hits")
            tick()
            collector.timing("t", 1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    collector.flush()  # racing the writers on purpose
    for t in threads:
        t.join()
    collector.flush()
    lines = server.receive()
    assert totals(lines) == {"hits": 20000, "ops": 20000}
    # Timer samples racing a flush may be lost (documented); counts may not.
    seen = sum(1 / rate for name, _, _, rate in lines if name == "t")
    assert seen == pytest.approx(20000, rel=0.01)
    assert not collector._buffers  # the finished threads' buffers are gone


def test_timers_are_a_bounded_sample_with_the_true_count(server: StatsdServer) -> None:
    metrics = StatsdMetrics("127.0.0.1", server.port, flush_interval=3600, max_samples=100)
    for i in range(1000):
        metrics.timing("t", float(i))
    metrics.close()
    lines = [line for line in server.receive() if line[0] == "t"]
    assert len(lines) == 100
    assert {rate for *_, rate in lines} == {0.1}
    assert sum(1 / rate for *_, rate in lines) == pytest.approx(1000)
    values = sorted(float(v) for _, v, _, _ in lines)
    assert values[0] < 200 and values[-1] > 800  # spread over the whole run


def test_busy_operations_are_timed_at_a_reduced_rate(server: StatsdServer, collector: StatsdMetrics) -> None:
    collector.max_samples = 50
    repo = InstrumentedRepository(MemoryStateRepository(), collector)
    for _ in range(1000):
        repo.fetch_record("a")
    collector.flush()
    server.receive()
    for _ in range(4000):  # timed at 50/1000: about 200 calls, 50 kept
        repo.fetch_record("a")
    collector.flush()
    lines = server.receive()
    p = "state.repository.memory.operations."
    assert totals(lines)[p + "fetch_total"] == 4000
    timed = [line for line in lines if line[0] == p + "fetch_latency_ms"]
    assert 0 < len(timed) <= 50
    assert sum(1 / rate for *_, rate in timed) == pytest.approx(4000, rel=0.35)


def test_gauges_counters_and_prefix_on_the_wire(server: StatsdServer) -> None:
    metrics = StatsdMetrics("127.0.0.1", server.port, prefix="app", flush_interval=3600)
    metrics.gauge("g.set", 5)
    metrics.gauge("g.set", 7)
    metrics.gauge("g.delta", 2, delta=True)
    metrics.gauge("g.delta", -5, delta=True)
    metrics.gauge("g.neg", -3)
    metrics.incr("c", 3)
    metrics.decr("c")
    metrics.histogram("h", 12)
    metrics.close()
    lines = server.receive()
    assert ("app.g.set", "7", "g", 1.0) in lines
    assert ("app.g.delta", "-3", "g", 1.0) in lines
    # A negative absolute gauge is sent as 0 then the value (StatsD reads "-3" as a delta).
    assert [v for n, v, _, _ in lines if n == "app.g.neg"] == ["0", "-3"]
    assert ("app.c", "2", "c", 1.0) in lines
    assert ("app.h", "12.000000", "ms", 1.0) in lines
    metrics.incr("after.close")  # still never raises


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_sends_its_own_metrics(server: StatsdServer, collector: StatsdMetrics) -> None:
    collector.incr("parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            collector.incr("child")
            collector.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    collector.flush()
    counters = totals(server.receive())
    assert counters == {"parent": 1, "child": 1}


# ------------------------------------------------------------------ collectors
def test_in_memory_metrics_feed_stats(tmp_path: Path) -> None:
    metrics = InMemoryMetrics()
    with tiered_state.open(tmp_path, metrics=metrics) as state:
        state.set("k", 1)
        state.get("k")
        state.get("nope")
        manager = state.stats()["manager"]
    assert manager["metrics"]["counters"]["state.manager.hit_hot"] == 1
    assert manager["metrics"]["counters"]["state.manager.miss"] == 1
    assert manager["hit_ratio"]["hot"] == pytest.approx(0.5)
    timer = manager["metrics"]["timers"]["state.repository.memory.operations.fetch_latency_ms"]
    assert timer["count"] >= 1 and timer["p50"] <= timer["p99"]


def test_null_metrics_and_as_collector() -> None:
    null = NullMetrics()
    assert as_collector(null) is null
    assert as_collector(None) is None
    client = statsd.StatsClient("127.0.0.1", free_port())
    adapted = as_collector(client)
    assert isinstance(adapted, MetricsCollector)
    adapted.histogram("x", 1)
    with pytest.raises(ConfigurationError):
        as_collector(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9125", ("127.0.0.1", 9125)),
        ("statsd", ("statsd", 8125)),
        ("[::1]:8126", ("::1", 8126)),
        ("[::1]", ("::1", 8125)),
        ("::1", ("::1", 8125)),  # bare IPv6: no port
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:0", "host:99999", "host:port", ":8125", "[::1", "[::1]x"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_address(text)


def test_metrics_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert metrics_from_env() is None
    monkeypatch.setenv(ENV_STATSD, "nonsense:port")
    with pytest.raises(ConfigurationError):
        metrics_from_env()


def test_import_tiered_state_does_not_import_statsd(python: str) -> None:
    import subprocess

    code = "import sys, tiered_state, tiered_state.metrics; print('statsd' in sys.modules)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ contrib
def _all_names(backend: str) -> list[tuple[str, str]]:
    p = f"state.repository.{backend}.operations."
    ops = (*SEED_COUNTERS, "fetch_many", "keys", "touch_many")
    out = [(p + op + "_total", "counter") for op in ops]
    out += [(p + "errors_total", "counter"), (p + "batch_size", "observer")]
    out += [(p + op + "_latency_ms", "observer") for op in ops]
    return out


def test_statsd_exporter_mapping_gives_the_seed_prometheus_names() -> None:
    yaml = require_module("yaml")
    import re

    config = yaml.safe_load((CONTRIB / "statsd_exporter.yml").read_text())
    mappings = config["mappings"]
    assert config["defaults"]["match_type"] == "regex"

    def map_name(name: str, kind: str) -> tuple[str, dict[str, str]]:
        for m in mappings:
            if m.get("match_metric_type", kind) != kind:
                continue
            assert m.get("match_type", "regex") == "regex"
            found = re.fullmatch(m["match"], name)
            if found:

                def sub(text: str) -> str:
                    return re.sub(r"\$\{?(\d)\}?", lambda g: found.group(int(g.group(1))), text)

                return sub(m["name"]), {k: sub(v) for k, v in m.get("labels", {}).items()}
        raise AssertionError(f"no mapping for {name}")

    tiers = {
        "memory": "hot",
        "redis": "hot",
        "sqlite": "warm",
        "postgres": "warm",
        "filesystem": "cold",
        "s3": "cold",
    }
    for backend, tier in tiers.items():
        for name, kind in _all_names(backend):
            prom, labels = map_name(name, kind)
            assert labels["backend"] == backend and labels["tier"] == tier
            if name.endswith("_total"):
                assert prom == name.replace(".", "_")  # the seed's names, verbatim
    assert map_name("state.repository.redis.operations.fetch_total", "counter") == (
        "state_repository_redis_operations_fetch_total",
        {"backend": "redis", "tier": "hot", "operation": "fetch"},
    )
    assert map_name("state.manager.hit_warm", "counter")[0] == "state_manager_hit_warm"
    assert map_name("state.manager.sweep.moved", "gauge")[0] == "state_manager_sweep_moved"


def test_grafana_dashboard_has_the_seed_panels_and_latency_percentiles() -> None:
    dashboard = json.loads((CONTRIB / "grafana-dashboard.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    exprs = {t: " ".join(x["expr"] for x in p["targets"]) for t, p in panels.items()}
    assert any("_operations_" in e and "rate(" in e for e in exprs.values())
    errors = [p for t, p in panels.items() if "errors_total" in exprs[t]]
    assert errors and any(p.get("alert") or _has_threshold(p) for p in errors)
    assert any(p["type"] == "heatmap" and "batch_size" in exprs[t] for t, p in panels.items())
    assert any("state_manager_hit_" in e for e in exprs.values())
    latency = " ".join(e for e in exprs.values() if "latency" in e)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}" in latency


def _has_threshold(panel: dict[str, Any]) -> bool:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    return len(steps) > 1
