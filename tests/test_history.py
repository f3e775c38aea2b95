"""Histories of concurrent processes, checked for linearizability.

Several worker processes run random single and batch set / get / delete /
compare-and-set operations on a few keys of one store, while a sweeper
(tiny ``cold_after``) and a migrator (demote / promote) move the same keys
between tiers, and random processes are SIGKILLed and restarted. Every
operation is logged with its invoke and complete times (one killed mid-call
is indeterminate); each key's history is then checked against a register
with versions and compare-and-set (:mod:`tests.linearizability`).

It runs on the embedded layout (memory + SQLite + files, a private memory
tier per process) and on Redis + PostgreSQL + S3 when their test URLs are
set. ``TIERED_STATE_HISTORY_SECONDS`` sets the run length per layout
(default 20); a soak is the same test with a larger value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .linearizability import Op, check_history, format_ops, shortest_failing_window
from .support import unique_name

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("TIERED_STATE_HISTORY_SECONDS", "20"))
KEYS = [f"k{i}" for i in range(10)]
WORKERS = 3


class Cluster:
    """The processes of one run: start, kill, restart, stop -- every wait bounded."""

    def __init__(self, config: dict[str, Any], logs: Path, seed: int,
                 seconds: float = SECONDS) -> None:
        self.config = config
        self.logs = logs
        self.rng = random.Random(seed)
        self.seconds = seconds
        self.next_process = 1
        self.procs: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
        #: Per-process config overrides (e.g. the process's own proxy URL for
        #: HOT): a killed process's successor inherits its predecessor's.
        self.overrides: dict[int, dict[str, Any]] = {}
        self.kills = 0
        self.stop_file = logs / "stop"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.env = env

    def start(self, role: str, overrides: dict[str, Any] | None = None) -> int:
        """Start a process of ``role``; ``overrides`` replace entries of the shared config."""
        process = self.next_process
        self.next_process += 1
        config = {**self.config, **(overrides or {}), "process": process,
                  "seed": self.rng.randrange(2**32), "logs": str(self.logs),
                  "stop_file": str(self.stop_file), "seconds": self.seconds + 30}
        self.overrides[process] = dict(overrides or {})
        err = open(self.logs / f"{role}-{process}.stderr", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "tests.history_worker", role,
                                 json.dumps(config)], env=self.env, stderr=err,
                                stdout=subprocess.DEVNULL)
        err.close()
        self.procs[process] = (role, proc)
        return process

    def kill_one(self) -> str:
        """SIGKILL a random process and start its successor; which one (for logs)."""
        process = self.rng.choice(sorted(self.procs))
        role, proc = self.procs.pop(process)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.kills += 1
        self.start(role, self.overrides.get(process))
        return f"{role} {process}"

    def stop(self) -> list[str]:
        """Stop every process; the stderr of those that did not exit cleanly."""
        self.stop_file.touch()
        failed = []
        deadline = time.monotonic() + 60
        for process, (role, proc) in self.procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=30)
            if code != 0:
                err = (self.logs / f"{role}-{process}.stderr").read_text(errors="replace")
                failed.append(f"{role} {process} exited {code}: {err[-2000:]}")
        return failed


def run(config: dict[str, Any], logs: Path, seed: int) -> int:
    """Run the processes for SECONDS with SIGKILLs; returns how many were killed.

    Every process still running at the end must stop cleanly: an exception
    other than the library's own errors is a bug.
    """
    cluster = Cluster(config, logs, seed)
    for _ in range(WORKERS):
        cluster.start("worker")
    cluster.start("sweeper")
    cluster.start("migrator")
    deadline = time.monotonic() + SECONDS
    try:
        # Let the processes open the store before the first kill.
        time.sleep(min(2.0, SECONDS / 4))
        while time.monotonic() < deadline:
            time.sleep(min(cluster.rng.uniform(0.5, 2.5), max(0.0, deadline - time.monotonic())))
            if time.monotonic() < deadline:
                cluster.kill_one()
    finally:
        failed = cluster.stop()
    assert not failed, "\n".join(failed)
    return cluster.kills


def load_ops(logs: Path) -> tuple[list[Op], list[str]]:
    """Every worker's operations as per-key ops, and the errors that must not happen.

    ``get_many`` reports values without versions; values are unique per
    write, so each one's version is the version its write was given (or a
    single read saw). A batch read of a value whose version nobody learned
    (its write was cut short and no single read saw it) is left out.
    """
    raw: list[Op] = []
    bad: list[str] = []
    for path in sorted(logs.glob("worker-*.jsonl")):
        invokes: dict[int, dict[str, Any]] = {}
        results: dict[int, dict[str, Any]] = {}
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue  # torn by the SIGKILL
                event = json.loads(line)
                (invokes if event["e"] == "invoke" else results)[event["id"]] = event
        for op_id, call in invokes.items():
            done = results.get(op_id)
            if done is not None and "IntegrityError" in str(done.get("error", "")):
                bad.append(f"process {call['p']}: {done['error']}")
            raw.extend(_per_key(call, done))
    versions = {(o.key, o.value): o.version for o in raw
                if o.version is not None and o.f in ("write", "cas", "read")}
    ops: list[Op] = []
    for o in raw:
        if o.f == "read" and o.value is not None and o.version is None:
            version = versions.get((o.key, o.value))
            if version is None:
                continue
            o = dataclasses.replace(o, version=version)
        ops.append(o)
    return ops, bad


def _per_key(call: dict[str, Any], done: dict[str, Any] | None) -> Iterator[Op]:
    f, process, invoke = call["f"], call["p"], call["t"]
    result = "info" if done is None or done["e"] == "info" else done["e"]
    complete = None if result == "info" else done["t"]  # type: ignore[index]

    def op(key: str, kind: str, **fields: Any) -> Op:
        base: dict[str, Any] = {"value": None, "expected": None, "version": None, "existed": None}
        base.update(fields)
        return Op(process=process, key=key, f=kind, result=result, invoke=invoke,
                  complete=complete, **base)

    if f in ("read", "read_many"):
        if result != "ok":
            return  # an indeterminate read constrains nothing
        for key in call["keys"]:
            seen = done["values"].get(key)  # type: ignore[index]
            if f == "read":
                value, version = (None, None) if seen is None else seen
            else:  # get_many reports values only (versions are filled in by load_ops)
                found = key in done["found"]  # type: ignore[index]
                value, version = (seen if found else None), None
            yield op(key, "read", value=value, version=version)
    elif f in ("write", "write_many"):
        for key in call["keys"]:
            version = done["versions"].get(key) if result == "ok" else None  # type: ignore[index]
            yield op(key, "write", value=call["values"][key], version=version)
    elif f == "cas":
        key = call["keys"][0]
        version = done["versions"][key] if result == "ok" else None  # type: ignore[index]
        yield op(key, "cas", value=call["values"][key], expected=call["expected"], version=version)
    elif f == "delete":
        key = call["keys"][0]
        existed = done["existed"][key] if result == "ok" else None  # type: ignore[index]
        yield op(key, "delete", existed=existed)
    else:  # delete_many: per key the outcome is unknown, only the total
        for key in call["keys"]:
            yield op(key, "delete", existed=None)


def sweep_totals(logs: Path) -> dict[str, int]:
    """What the sweeper processes' sweeps did, summed (lines torn by a SIGKILL skipped)."""
    totals: dict[str, int] = {}
    for path in logs.glob("sweeps-*.jsonl"):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                for name, n in json.loads(line).items():
                    totals[name] = totals.get(name, 0) + n
    return totals


def check(logs: Path, kills: int, label: str, *, compaction: bool = False) -> None:
    """Check every key's history; with ``compaction``, also that the sweeps
    wrote, compacted and deleted COLD segments while it was made."""
    ops, bad = load_ops(logs)
    assert bad == [], f"{label}: corrupt data was served or found: {bad[:5]}"
    assert len(ops) > 100, f"{label}: too few operations ran ({len(ops)}); see {logs}"
    report = check_history(ops, time_limit=max(120.0, SECONDS * 3))
    totals: dict[str, int] = {}
    for path in logs.glob("*.stats"):  # processes that stopped cleanly
        for name, n in json.loads(path.read_text()).items():
            totals[name] = totals.get(name, 0) + n
    sweeps = sweep_totals(logs)
    summary = (f"{label}: {report.ops_checked} operations ({report.info_ops} indeterminate), "
               f"{kills} SIGKILLs, {report.keys_checked} key histories checked in "
               f"{report.seconds:.1f}s; counters of the processes that stopped cleanly: {totals}; "
               f"the sweeps: {sweeps}")
    print(summary)
    if compaction:
        # Records reach segments by the sweep's moves or by packing the
        # migrator's demotes, whichever the timing favours; both compact.
        assert sweeps.get("compacted") and sweeps.get("segments_deleted"), \
            f"no compaction ran under the history: {summary}"
    if not report.ok:
        lines = [summary, "NOT LINEARIZABLE:"]
        by_key: dict[str, list[Op]] = {}
        for o in ops:
            by_key.setdefault(o.key, []).append(o)
        for key, failure in report.failures.items():
            lines.append(f"key {key!r}: {failure.describe()}")
            window = failure.window or shortest_failing_window(
                sorted(by_key[key], key=lambda o: o.invoke))
            lines.append(format_ops(window))
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.mark.slow
def test_embedded_layout_is_linearizable(tmp_path: Path) -> None:
    store = tmp_path / "store"
    logs = tmp_path / "logs"
    logs.mkdir()
    config = {"path": str(store), "hot": "memory://", "warm": None, "cold": None, "keys": KEYS}
    kills = run(config, logs, seed=1)
    check(logs, kills, "embedded (memory + sqlite + file)", compaction=True)


@pytest.mark.slow
def test_server_layout_is_linearizable(tmp_path: Path, redis_url: str, postgres_url: str,
                                       s3_url: str) -> None:
    from tiered_state.config import open_repository

    prefix = unique_name("hist") + ":"
    table = unique_name("hist").replace("-", "_")
    hot = f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    warm = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={table}"
    logs = tmp_path / "logs"
    logs.mkdir()
    config = {"path": str(tmp_path / "store"), "hot": hot, "warm": warm, "cold": s3_url,
              "keys": KEYS}
    try:
        kills = run(config, logs, seed=2)
        check(logs, kills, "server (redis + postgres + s3)", compaction=True)
    finally:
        with open_repository(hot) as repo:
            repo.clear()
        with open_repository(warm) as repo:
            import psycopg2

            with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
                cur.execute(f'DROP TABLE IF EXISTS "{table}"')
