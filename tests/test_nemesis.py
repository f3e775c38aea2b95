"""Histories under a nemesis: the history workload while the servers fail.

The workload of :mod:`tests.test_history` -- worker processes doing random
single and batch set / get / delete / compare-and-set on a few keys, a
sweeper and a migrator moving them between tiers, random SIGKILLs -- runs
against servers this test owns (:mod:`tests.servers`), while a nemesis thread
injects faults at random, seeded moments. Each lasts 0.2-2 s and is repaired:

========================  ================================================================
``redis_cut``             every process's path to Redis is cut (dropped, refused)
``redis_blackhole``       every path to Redis accepts and never answers
``redis_partial_cut``     one process's path to Redis is cut; the others keep theirs
``redis_kill``            kill -9, then a restart from the last snapshot -- older than
                          the writes made since
``redis_save``            a snapshot (SAVE or BGSAVE) at a random moment (instant)
``redis_pause``           SIGSTOP, then SIGCONT: commands sent meanwhile run late
``pg_restart_fast``       PostgreSQL stopped cleanly (clients disconnected), then started
``pg_restart_immediate``  PostgreSQL crashed (immediate stop), then started: WAL recovery
``process_kill``          (the main thread) SIGKILL of a worker, sweeper or migrator
========================  ================================================================

Every process reaches Redis through a proxy of its own, so a partial cut
isolates one process only. Afterwards every key's history must be
linearizable (:mod:`tests.linearizability`), no process may have failed and
nothing corrupt may have been served. The faults come in storms (short
gaps) separated by calms long enough for HOT to be trusted again, and HOT
must have served reads after the first fault -- else the run tested nothing
about it. A summary -- operations by kind and outcome, reads by the tier
that served them, faults by kind, keys checked, anomalies -- is printed
(``-s``) and written as JSON next to the logs.

Layouts: *server* (HOT private Redis, WARM private PostgreSQL behind a proxy,
COLD S3 under a unique prefix) and *embedded* (private Redis + SQLite +
files; no PostgreSQL faults). ``TIERED_STATE_NEMESIS_SECONDS`` is the run
length per layout (default 60), ``TIERED_STATE_NEMESIS_SEED`` the seed
(default random, printed), ``TIERED_STATE_NEMESIS_REPORT`` a directory to
copy each layout's summary JSON into.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from .linearizability import Op, check_history, format_ops
from .servers import PrivatePostgres, PrivateRedis
from .support import ProxyGroup, TCPProxy
from .test_history import KEYS, WORKERS, Cluster, load_ops

# Read at import: the autouse fixture in conftest.py hides TIERED_STATE_* from tests.
SECONDS = float(os.environ.get("TIERED_STATE_NEMESIS_SECONDS", "60"))
SEED = os.environ.get("TIERED_STATE_NEMESIS_SEED", "").strip()
REPORT_DIR = os.environ.get("TIERED_STATE_NEMESIS_REPORT", "").strip()
#: A worker that got an error waits this long before its next operation.
ERROR_PAUSE = 0.02
#: How long one fault lasts before it is repaired, and the quiet time between two.
FAULT_SECONDS = (0.2, 2.0)
GAP_SECONDS = (0.3, 1.5)
#: The faults come in storms separated by calms. A calm is long enough for a
#: HOT that was written around during the storm to be trusted again (the
#: guard's write-around marker lasts 5 s), so the reads of the calm show
#: whether what HOT serves after the repairs is current, and the next storm
#: strikes a HOT that is serving copies.
STORM_SECONDS = (8.0, 14.0)
CALM_SECONDS = (18.0, 24.0)
#: Seconds between two SIGKILLs of a process (the main thread's share).
KILL_SECONDS = (3.0, 8.0)
#: Short client timeouts: a Redis that does not answer costs a call well under a second.
REDIS_OPTIONS = "socket_timeout=0.5&socket_connect_timeout=0.25"
#: Every process of a run, each with its own proxy in front of Redis.
SLOTS = [f"worker-{i}" for i in range(WORKERS)] + ["sweeper", "migrator"]
#: The checker's time per key; a key it cannot decide in time is a failure.
CHECK_SECONDS = max(60.0, SECONDS)

REDIS_FAULTS = {"redis_cut": 3, "redis_blackhole": 1, "redis_partial_cut": 3, "redis_kill": 2,
                "redis_save": 2, "redis_pause": 2}
PG_FAULTS = {"pg_restart_fast": 1, "pg_restart_immediate": 1}


def role_of(slot: str) -> str:
    return "worker" if slot.startswith("worker") else slot


@dataclass
class Fault:
    """One injected fault; times are ``time.monotonic_ns()``, the histories' clock."""

    kind: str
    detail: str
    start: int
    end: int


class Nemesis:
    """Injects faults at random moments from a thread; every fault is repaired.

    Faults of the thread never overlap one another (the main thread's
    SIGKILLs may overlap them). :meth:`stop` joins the thread (bounded) and
    repairs everything, whatever state a failure left.
    """

    def __init__(self, rng: random.Random, redis: PrivateRedis, hot: ProxyGroup,
                 postgres: PrivatePostgres | None) -> None:
        self.rng = rng
        self.redis = redis
        self.hot = hot
        self.postgres = postgres
        self.weights = dict(REDIS_FAULTS)
        if postgres is not None:
            self.weights.update(PG_FAULTS)
        self.faults: list[Fault] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot: int | None = None  # monotonic ns of the last snapshot

    def note(self, kind: str, detail: str, start: int, end: int | None = None) -> None:
        with self._lock:
            self.faults.append(Fault(kind, detail, start, end if end is not None else start))

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(f.kind for f in self.faults
                                        if f.kind not in ("storm", "calm")))

    def first_fault(self) -> int | None:
        """When the first fault (not a snapshot, not a phase mark) began."""
        starts = [f.start for f in self.faults if f.kind not in ("storm", "calm", "redis_save")]
        return min(starts) if starts else None

    # -- the thread
    def start(self, deadline: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(deadline,), name="nemesis",
                                        daemon=True)
        self._thread.start()

    def _wait(self, seconds: float, deadline: float) -> bool:
        """Sleep (cut short by stop() or the deadline); True if the run is over."""
        if self._stop.wait(min(seconds, max(0.0, deadline - time.monotonic()))):
            return True
        return time.monotonic() >= deadline

    def _run(self, deadline: float) -> None:
        kinds, weights = list(self.weights), list(self.weights.values())
        try:
            # A snapshot first, so the first kill restores an old one.
            first = True
            for _storm in range(int(SECONDS / (STORM_SECONDS[0] + CALM_SECONDS[0])) + 2):
                storm_end = time.monotonic() + self.rng.uniform(*STORM_SECONDS)
                self.note("storm", "", time.monotonic_ns())
                for _ in range(int(STORM_SECONDS[1] / GAP_SECONDS[0]) + 2):
                    if self._wait(self.rng.uniform(*GAP_SECONDS), deadline):
                        return
                    if time.monotonic() >= storm_end:
                        break
                    kind = "redis_save" if first else self.rng.choices(kinds, weights)[0]
                    first = False
                    self._inject(kind, self.rng.uniform(*FAULT_SECONDS))
                self.note("calm", "", time.monotonic_ns())
                if self._wait(self.rng.uniform(*CALM_SECONDS), deadline):
                    return
        except BaseException as exc:  # reported by stop(); the test fails on it
            self.error = exc

    def _inject(self, kind: str, hold: float) -> None:
        start = time.monotonic_ns()
        heal: Callable[[], None] | None = None
        detail = f"{hold:.2f}s"
        try:
            if kind == "redis_cut":
                self.hot.cut()
                heal = self.hot.restore
            elif kind == "redis_blackhole":
                self.hot.blackhole()
                heal = self.hot.restore
            elif kind == "redis_partial_cut":
                slot = self.rng.choice(self.hot.names)
                detail += f" {slot}"
                self.hot.cut(slot)
                heal = lambda: self.hot.restore(slot)  # noqa: E731
            elif kind == "redis_kill":
                age = "none: restarts empty" if self._snapshot is None else \
                    f"{(start - self._snapshot) / 1e9:.1f}s old"
                detail += f", snapshot {age}"
                self.redis.kill()
                heal = self.redis.start
            elif kind == "redis_save":
                how = self.rng.choice(["SAVE", "BGSAVE"])
                if how == "SAVE":
                    self.redis.save()
                elif not self.redis.bgsave():
                    raise RuntimeError("BGSAVE failed")
                self._snapshot = time.monotonic_ns()
                self.note(kind, how, start, self._snapshot)
                return
            elif kind == "redis_pause":
                self.redis.pause()
                heal = self.redis.resume
            elif kind in ("pg_restart_fast", "pg_restart_immediate"):
                assert self.postgres is not None
                self.postgres.stop("fast" if kind == "pg_restart_fast" else "immediate")
                heal = self.postgres.start
            else:  # pragma: no cover
                raise ValueError(kind)
            time.sleep(hold)
        finally:
            if heal is not None:
                healing = time.monotonic()
                heal()
                if kind.startswith("pg_") or kind == "redis_kill":
                    detail += f", back up in {time.monotonic() - healing:.2f}s"
            if kind != "redis_save":
                self.note(kind, detail, start, time.monotonic_ns())

    def stop(self) -> None:
        """End the thread (bounded) and repair every fault."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=90)
            if self._thread.is_alive() and self.error is None:
                self.error = TimeoutError("the nemesis thread did not stop within 90 s")
        self.heal_all()

    def heal_all(self) -> None:
        self.hot.restore()
        self.redis.resume()
        if self.redis.proc is None:
            self.redis.start()
        if self.postgres is not None and not self.postgres.running:
            self.postgres.start()


# ---------------------------------------------------------------- the run
def run_under_nemesis(config: dict[str, Any], per_slot: dict[str, dict[str, Any]], logs: Path,
                      nemesis: Nemesis, seed: int) -> tuple[int, list[str]]:
    """Run the workload for SECONDS under ``nemesis``; (SIGKILLs, processes that failed)."""
    cluster = Cluster(config, logs, seed, seconds=SECONDS)
    rng = random.Random(seed + 1)
    failed: list[str] = []
    try:
        for slot in SLOTS:
            cluster.start(role_of(slot), per_slot[slot])
        # Let the processes open the store before the first fault.
        time.sleep(min(2.0, SECONDS / 4))
        deadline = time.monotonic() + SECONDS
        nemesis.start(deadline)
        for _ in range(int(SECONDS / KILL_SECONDS[0]) + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(rng.uniform(*KILL_SECONDS), left))
            if time.monotonic() < deadline:
                at = time.monotonic_ns()
                nemesis.note("process_kill", cluster.kill_one(), at)
    finally:
        try:
            nemesis.stop()
        finally:
            failed = cluster.stop()
    return cluster.kills, failed


def calls_by_kind(logs: Path) -> tuple[dict[str, dict[str, int]], dict[str, int],
                                       dict[tuple[int, int], str]]:
    """From the workers' logs: calls by function and outcome, errors by class,
    and the tier each single read was served from, by (process, invoke time)."""
    calls: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    errors: collections.Counter[str] = collections.Counter()
    tiers: dict[tuple[int, int], str] = {}
    for path in sorted(logs.glob("worker-*.jsonl")):
        invokes: dict[int, dict[str, Any]] = {}
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue  # torn by a SIGKILL
                event = json.loads(line)
                if event["e"] == "invoke":
                    invokes[event["id"]] = event
                    continue
                call = invokes.pop(event["id"], None)
                if call is None:
                    continue
                calls[call["f"]][event["e"]] += 1
                if event["e"] == "info":
                    errors[str(event.get("error", "?")).split("(", 1)[0].split(":", 1)[0]] += 1
                if "tier" in event:
                    tiers[(call["p"], call["t"])] = event["tier"]
        for call in invokes.values():
            calls[call["f"]]["cut short"] += 1
    return {f: dict(c) for f, c in sorted(calls.items())}, dict(errors.most_common(8)), tiers


def faults_near(faults: list[Fault], ops: list[Op]) -> list[str]:
    """The faults that overlap the time of ``ops`` (or ended up to 3 s before it)."""
    first = min(o.invoke for o in ops)
    last = max(o.complete or o.invoke for o in ops)
    near = [f for f in faults if f.end >= first - 3_000_000_000 and f.start <= last
            and f.kind not in ("storm", "calm")]
    return [f"  {f.kind} {f.detail}: {(f.start - first) / 1e6:+.0f} ms .. "
            f"{(f.end - first) / 1e6:+.0f} ms" for f in near]


def check_and_report(label: str, logs: Path, nemesis: Nemesis, kills: int, failed: list[str],
                     seed: int, extra: dict[str, Any]) -> None:
    ops, bad = load_ops(logs)
    calls, errors, tiers = calls_by_kind(logs)
    report = check_history(ops, time_limit=CHECK_SECONDS)
    served = dict(collections.Counter(tiers.values()))
    first_fault = nemesis.first_fault()
    hot_after = sum(1 for (_, t), tier in tiers.items()
                    if tier == "hot" and first_fault is not None and t > first_fault)
    totals: dict[str, int] = collections.Counter()
    for path in logs.glob("*.stats"):  # processes that stopped cleanly
        totals.update(json.loads(path.read_text()))
    anomalies = {key: result.describe() for key, result in report.failures.items()}
    summary = {
        "layout": label, "seed": seed, "seconds": SECONDS, **extra,
        "operations": calls, "info_errors": errors,
        "reads_served_by": served, "hot_reads_after_first_fault": hot_after,
        "faults": nemesis.counts(), "process_kills": kills,
        "keys_checked": report.keys_checked, "ops_checked": report.ops_checked,
        "info_ops": report.info_ops, "check_seconds": round(report.seconds, 2),
        "anomalies": anomalies, "corrupt_served": bad[:5], "failed_processes": len(failed),
        "counters": dict(totals),
        "fault_log": [asdict(f) for f in nemesis.faults],
    }
    (logs / "summary.json").write_text(json.dumps(summary, indent=1))
    if REPORT_DIR:
        Path(REPORT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(REPORT_DIR) / f"nemesis-{label.split()[0]}.json").write_text(
            json.dumps(summary, indent=1))
    text = [
        f"nemesis {label}: seed {seed}, {SECONDS:.0f}s",
        "  operations: " + "; ".join(f"{f} {dict(c)}" for f, c in calls.items()),
        f"  indeterminate by error: {errors}",
        f"  single reads served by tier: {served}; from HOT after the first fault: {hot_after}",
        f"  faults: {nemesis.counts()}",
        f"  {report.keys_checked} key histories, {report.ops_checked} ops ({report.info_ops} "
        f"indeterminate) checked in {report.seconds:.1f}s: "
        + ("linearizable" if report.ok else f"{len(anomalies)} ANOMALIES"),
        f"  counters of the processes that stopped cleanly: {dict(totals)}",
    ]
    print("\n".join(text))
    problems: list[str] = []
    if nemesis.error is not None:
        problems.append(f"the nemesis failed: {nemesis.error!r}")
    if failed:
        problems.append("processes failed:\n" + "\n".join(failed))
    if bad:
        problems.append(f"corrupt data was served or found: {bad[:5]}")
    if len(ops) < 100:
        problems.append(f"too few operations ran ({len(ops)})")
    if first_fault is not None and hot_after == 0:
        # Then a stale HOT copy could not have been caught: the verdict
        # below says nothing about HOT.
        problems.append(f"HOT served no read after the first fault ({served}): it is never "
                        "trusted again after faults, and the run could not test it")
    if not report.ok:
        by_key: dict[str, list[Op]] = collections.defaultdict(list)
        for o in ops:
            by_key[o.key].append(o)
        lines = ["NOT LINEARIZABLE:"]
        for key, result in report.failures.items():
            lines.append(f"key {key!r}: {result.describe()}")
            window = result.window or []
            if window:
                lines.append(format_ops(window, mark=result.op))
                lines.append("faults around that window (ms from its first invoke):")
                lines.extend(faults_near(nemesis.faults, window) or ["  none"])
            if result.op is not None and (result.op.process, result.op.invoke) in tiers:
                lines.append(f"the blamed read was served from "
                             f"{tiers[(result.op.process, result.op.invoke)]}")
        problems.append("\n".join(lines))
    if problems:
        pytest.fail("\n\n".join(["\n".join(text), *problems, f"logs: {logs}"]), pytrace=False)


def seed_for(layout: int) -> int:
    return int(SEED) + layout if SEED else random.SystemRandom().randrange(2**31)


def hot_url(address: str) -> str:
    return f"redis://{address}/0?{REDIS_OPTIONS}&prefix=nemesis:"


# ---------------------------------------------------------------- the layouts
@pytest.mark.slow
def test_server_layout_under_nemesis(tmp_path: Path, s3_url: str) -> None:
    seed = seed_for(0)
    logs = tmp_path / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(PrivateRedis(persistence=True))
        hot = stack.enter_context(ProxyGroup("127.0.0.1", redis.port, SLOTS))
        postgres = stack.enter_context(PrivatePostgres())
        warm_proxy = stack.enter_context(TCPProxy("127.0.0.1", postgres.port))
        warm = (f"postgresql://postgres@{warm_proxy.address}/{postgres.dbname}"
                "?table=nemesis&connect_timeout=2")
        config = {"path": str(tmp_path / "store"), "hot": None, "warm": warm, "cold": s3_url,
                  "keys": KEYS, "error_pause": ERROR_PAUSE}
        per_slot = {slot: {"hot": hot_url(hot.address(slot))} for slot in SLOTS}
        nemesis = Nemesis(random.Random(seed), redis, hot, postgres)
        kills, failed = run_under_nemesis(config, per_slot, logs, nemesis, seed)
        check_and_report("server (redis + postgres + s3)", logs, nemesis, kills, failed, seed,
                         {"postgres_startup_seconds": round(postgres.startup_seconds, 2)})


@pytest.mark.slow
def test_embedded_layout_under_nemesis(tmp_path: Path) -> None:
    seed = seed_for(1)
    logs = tmp_path / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(PrivateRedis(persistence=True))
        hot = stack.enter_context(ProxyGroup("127.0.0.1", redis.port, SLOTS))
        config = {"path": str(tmp_path / "store"), "hot": None, "warm": None, "cold": None,
                  "keys": KEYS, "error_pause": ERROR_PAUSE}
        per_slot = {slot: {"hot": hot_url(hot.address(slot))} for slot in SLOTS}
        nemesis = Nemesis(random.Random(seed), redis, hot, None)
        kills, failed = run_under_nemesis(config, per_slot, logs, nemesis, seed)
        check_and_report("embedded (redis + sqlite + files)", logs, nemesis, kills, failed, seed,
                         {})
