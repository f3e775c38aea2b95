"""Several live processes sharing one embedded store (memory + SQLite + files).

* Two processes with several threads each write the same folder at once:
  nothing is lost -- every key a thread owns ends at that thread's last
  value and version, and every shared key ends at the value of the write
  with the greatest version any writer was given for it.
* A process never serves a value another process overwrote or deleted from
  its private memory tier: it reads a key (so its memory tier holds a copy),
  the other process overwrites it, and the next read -- at once, no sleep --
  must return the new value. Repeated many times, in both directions, with
  writes aimed at every tier.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import tiered_state

PROCESSES = 2
THREADS = 4
ROUNDS = 120  # writes per thread
SHARED = [f"shared:{i}" for i in range(4)]
TIERS = ("hot", "warm", "cold")

WRITER = textwrap.dedent(
    """
    import json, sys, threading
    import tiered_state

    path, proc, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    shared = json.loads(sys.argv[5])
    tiers = ("hot", "warm", "cold")
    state = tiered_state.open(path)
    log = []  # (key, value, version) of every acknowledged write
    lock = threading.Lock()
    errors = []

    def work(thread):
        mine = []
        try:
            for i in range(rounds):
                value = {"p": proc, "t": thread, "i": i}
                own = f"own:{proc}:{thread}:{i % 10}"
                tier = tiers[(i + thread) % 3]
                if i % 7 == 3:
                    items = {own: value, shared[(i + thread) % len(shared)]: value}
                    for key, version in state.set_many(items, tier=tier).items():
                        mine.append((key, value, version))
                else:
                    mine.append((own, value, state.set(own, value, tier=tier)))
                    key = shared[(i * 3 + thread) % len(shared)]
                    mine.append((key, value, state.set(key, value, tier=tiers[i % 3])))
                if i % 5 == 0:
                    state.get(shared[i % len(shared)])  # copies into this process's memory tier
                if i % 31 == 0:
                    state.sweep()
        except BaseException as exc:
            errors.append(repr(exc))
        with lock:
            log.extend(mine)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    state.close()
    json.dump({"log": log, "errors": errors}, sys.stdout)
    """
)


def test_two_processes_with_threads_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store"
    tiered_state.open(path).close()  # schema and folders exist before the race
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(p), str(THREADS), str(ROUNDS),
             json.dumps(SHARED)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(PROCESSES)
    ]
    log: list[tuple[str, Any, int]] = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        result = json.loads(out)
        assert result["errors"] == [], result["errors"]
        log += [tuple(entry) for entry in result["log"]]  # type: ignore[misc]
    assert len(log) >= PROCESSES * THREADS * ROUNDS

    last_own: dict[str, tuple[Any, int]] = {}
    best_shared: dict[str, tuple[Any, int]] = {}
    seen_versions: dict[str, set[int]] = {}
    for key, value, version in log:
        versions = seen_versions.setdefault(key, set())
        assert version not in versions, f"two writes of {key!r} were given version {version}"
        versions.add(version)
        if key.startswith("own:"):
            # One thread writes each own key, in order: later entries are later writes.
            previous = last_own.get(key)
            assert previous is None or version > previous[1], f"{key!r}: version went backwards"
            last_own[key] = (value, version)
        elif key not in best_shared or version > best_shared[key][1]:
            best_shared[key] = (value, version)

    with tiered_state.open(path) as state:
        lost = []
        for key, (value, version) in {**last_own, **best_shared}.items():
            record = state.get_record(key)
            if record is None or (record.value, record.version) != (value, version):
                lost.append((key, value, version, record and (record.value, record.version)))
        assert not lost, f"{len(lost)} keys not at their newest write, e.g. {lost[:3]}"
        assert sorted(state.keys()) == sorted({*last_own, *best_shared})


PEER = textwrap.dedent(
    """
    import json, sys
    import tiered_state

    state = tiered_state.open(sys.argv[1])
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "get":
            out = {"value": state.get(op["key"], "<absent>")}
        elif op["op"] == "set":
            out = {"version": state.set(op["key"], op["value"], tier=op["tier"])}
        elif op["op"] == "set_many":
            out = {"versions": state.set_many({op["key"]: op["value"]}, tier=op["tier"])}
        else:
            out = {"deleted": state.delete(op["key"])}
        print(json.dumps(out), flush=True)
    state.close()
    """
)


class _Peer:
    """The other process, driven over a pipe one command at a time (the handshake)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def __call__(self, **op: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(op) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"peer process died: {err}")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err


def test_live_processes_never_serve_each_others_overwritten_values(tmp_path: Path) -> None:
    path = tmp_path / "store"
    rng = random.Random(20240611)
    with tiered_state.open(path) as here:
        peer = _Peer(path)
        try:
            stale = []
            for i in range(300):
                key = f"k{i % 3}"
                # Both read it, so both memory tiers may hold the current copy.
                here.get(key)
                peer(op="get", key=key)
                tier = rng.choice(TIERS)
                action = rng.choice(("set", "set", "set", "set_many", "delete"))
                value = {"i": i, "tier": tier}
                writer_is_peer = rng.random() < 0.5
                if action == "delete":
                    expected: Any = "<absent>"
                    if writer_is_peer:
                        peer(op="delete", key=key)
                    else:
                        here.delete(key)
                elif writer_is_peer:
                    expected = value
                    peer(op=action, key=key, value=value, tier=tier)
                else:
                    expected = value
                    if action == "set":
                        here.set(key, value, tier=tier)
                    else:
                        here.set_many({key: value}, tier=tier)
                # Read at once in the process that did not write.
                if writer_is_peer:
                    got = here.get(key, "<absent>")
                else:
                    got = peer(op="get", key=key)["value"]
                if got != expected:
                    stale.append((i, "peer" if writer_is_peer else "test", action, tier, got, expected))
            kinds = Counter((action, tier) for _, _, action, tier, _, _ in stale)
            assert not stale, (
                f"{len(stale)} reads served an overwritten value; by (write, tier): {dict(kinds)};"
                f" e.g. (step, writer, write, tier, got, expected): {stale[:3]}"
            )
        finally:
            peer.close()
