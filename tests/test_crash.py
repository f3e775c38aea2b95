"""Killing a process in the middle of a sweep loses nothing.

The test fills an embedded store (memory + SQLite + files, fsync on) with
thousands of keys: idle ones the sweep moves WARM -> COLD, expired ones it
purges, expired ones whose tombstone hides an older COLD copy (both must go,
the old value must never come back) and hot ones a writer thread keeps
rewriting while the sweep runs. A child process runs the writer and the sweep
and is SIGKILLed at a different moment in each run. Afterwards every key must
read as its latest acknowledged value: the writer appends an fsynced JSON line
after each ``set`` returns (and one before it starts, so the single write in
flight may also be the one that landed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import TieringPolicy

IDLE = 2500
EXPIRED = 200
SHADOWED = 100
HOT = 100
COLD_AFTER = 0.5
TTL = 0.3
POLICY = TieringPolicy(cold_after=COLD_AFTER, batch_size=250)
#: When the child is killed, one run each: after the sweep reported this many
#: batches (0: as soon as it starts), plus this many seconds -- a moment
#: inside the next batch (one takes about 0.1 s).
KILL_AT = ((0, 0.0), (0, 0.04), (1, 0.01), (2, 0.07), (4, 0.02), (6, 0.05), (8, 0.03), (10, 0.08))

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import tiered_state
    from tiered_state import TieringPolicy

    path, ack_path, sweep_at, hot = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    state = tiered_state.open(path, policy=TieringPolicy(cold_after=float(sys.argv[5]), batch_size=250))
    ack = open(ack_path, "a", encoding="utf-8")

    def note(**line):
        ack.write(json.dumps(line) + "\\n")
        ack.flush()
        os.fsync(ack.fileno())

    def writer():
        n = 0
        while True:
            key, value = f"hot:{n % hot}", {"n": n}
            note(key=key, value=value, intent=True)
            version = state.set(key, value, tier=("hot", "warm")[n % 2])
            note(key=key, value=value, version=version)
            n += 1

    threading.Thread(target=writer, daemon=True).start()
    time.sleep(max(0.0, sweep_at - time.time()))
    print("sweeping", flush=True)
    report = state.sweep(progress=lambda r: print("batch", flush=True))
    print("swept", json.dumps(report.as_dict()), flush=True)
    time.sleep(60)  # the parent kills us
    """
)


def _fill(path: Path) -> dict[str, tuple[Any, int]]:
    """Write the records the sweep will work on; returns key -> (value, version) expected."""
    expected: dict[str, tuple[Any, int]] = {}
    with tiered_state.open(path, policy=POLICY) as state:
        shadowed = {f"shadow:{i}": {"old": i} for i in range(SHADOWED)}
        state.set_many(shadowed, tier="cold")
        # A newer, short-lived version on top: once it expires the key is
        # gone, and the older COLD copy must never resurface.
        state.set_many({k: {"new": True} for k in shadowed}, tier="warm", ttl=TTL)
        state.set_many({f"exp:{i}": i for i in range(EXPIRED)}, tier="warm", ttl=TTL)
        for start in range(0, IDLE, 500):
            chunk = {f"idle:{i}": {"i": i, "pad": "x" * (i % 50)}
                     for i in range(start, min(IDLE, start + 500))}
            for key, version in state.set_many(chunk, tier="warm").items():
                expected[key] = (chunk[key], version)
        hot = {f"hot:{i}": {"n": -1} for i in range(HOT)}
        for key, version in state.set_many(hot, tier="warm").items():
            expected[key] = (hot[key], version)
    return expected


def _acknowledged(ack_path: Path, expected: dict[str, tuple[Any, int]]) -> dict[str, Any]:
    """Fold the writer's log into ``expected``; return key -> value of the write in flight."""
    in_flight: dict[str, Any] = {}
    for line in ack_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line may be cut by the kill
        if entry.get("intent"):
            in_flight = {entry["key"]: entry["value"]}
        else:
            expected[entry["key"]] = (entry["value"], entry["version"])
            in_flight = {}
    return in_flight


def _check(state: tiered_state.StateManager, expected: dict[str, tuple[Any, int]],
           in_flight: dict[str, Any]) -> None:
    wrong = []
    for key, (value, version) in expected.items():
        record = state.get_record(key)
        got = None if record is None else (record.value, record.version)
        if got == (value, version):
            continue
        landed = key in in_flight and record is not None and record.value == in_flight[key]
        if landed and record is not None and record.version > version:
            continue  # the write in flight at the kill landed
        wrong.append((key, (value, version), got))
    assert not wrong, f"{len(wrong)} keys not at their latest acknowledged value, e.g. {wrong[:3]}"
    gone = [k for k in (*(f"exp:{i}" for i in range(EXPIRED)), *(f"shadow:{i}" for i in range(SHADOWED)))
            if state.get(k) is not None]
    assert not gone, f"expired keys readable again: {gone[:5]}"


@pytest.mark.parametrize(("batches", "delay"), KILL_AT)
def test_sigkill_during_sweep_loses_nothing(tmp_path: Path, batches: int, delay: float) -> None:
    path = tmp_path / "store"
    ack_path = tmp_path / "ack.jsonl"
    expected = _fill(path)
    # Every filled record is idle (and every short-lived one expired) by then.
    sweep_at = time.time() + max(COLD_AFTER, TTL) + 0.05
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(ack_path), str(sweep_at), str(HOT), str(COLD_AFTER)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    try:
        line = child.stdout.readline()
        assert line.startswith("sweeping"), child.stderr.read() if child.stderr else line
        for _ in range(batches):
            line = child.stdout.readline()
            assert line.startswith("batch"), f"the sweep ended before the kill: {line}"
        time.sleep(delay)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    in_flight = _acknowledged(ack_path, expected)

    with tiered_state.open(path, policy=POLICY) as state:
        _check(state, expected, in_flight)
        # A new sweep finishes the interrupted one without errors, and
        # still nothing is lost.
        report = state.sweep()
        assert report.failed == 0, report.errors
        _check(state, expected, in_flight)
        cold = state.repositories[tiered_state.Tier.COLD]
        assert not [k for k in cold.keys("shadow:*")], "a purged key's old COLD copy is still there"
