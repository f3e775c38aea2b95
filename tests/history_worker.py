"""One process of the history test: random operations on a shared store, logged.

Run as ``python -m tests.history_worker ROLE CONFIG_JSON``. ROLE is
``worker`` (random single and batch set / get / delete / compare-and-set on
a small key set), ``sweeper`` (sweeps with a tiny ``cold_after``) or
``migrator`` (random demote / promote). Only workers log operations: every
call appends an ``invoke`` line before it starts and a result line after it
returns, each flushed at once, so an operation cut short by SIGKILL is left
with an invoke and no result -- indeterminate. Times are
``time.monotonic_ns()``, one clock for every process on the machine.

CONFIG_JSON is this process's own: a test may give each process other tier
URLs (its own proxy in front of Redis, so one process can be cut off while
the others are not).

Every loop is bounded: the process stops at the deadline in its config, when
the stop file appears, or after ``max_ops`` operations.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from typing import Any

import tiered_state
from tiered_state.errors import ConflictError, IntegrityError, TieredStateError


def _open(config: dict[str, Any]) -> tiered_state.StateManager:
    policy = tiered_state.TieringPolicy(
        cold_after=config.get("cold_after", 0.05), hot_ttl=config.get("hot_ttl", 30),
        batch_size=config.get("batch_size", 50), purge_after=config.get("purge_after", 2.0),
        # Compacts a segment as soon as any of it is dead, so that a short
        # history has compactions racing the writers in it.
        compact_below=config.get("compact_below", 1.0),
    )
    return tiered_state.open(config["path"], hot=config["hot"], warm=config["warm"],
                             cold=config["cold"], policy=policy)


class Log:
    """Appends one JSON line per event; a line is flushed before the call it announces."""

    def __init__(self, path: str, process: int) -> None:
        self.file = open(path, "a", encoding="utf-8", buffering=1)
        self.process = process
        self.next_id = 0
        self.last = ""

    def invoke(self, f: str, keys: list[str], **fields: Any) -> int:
        self.next_id += 1
        self._write({"e": "invoke", "id": self.next_id, "f": f, "keys": keys, **fields})
        return self.next_id

    def done(self, op: int, result: str, **fields: Any) -> None:
        self.last = result
        self._write({"e": result, "id": op, **fields})

    def _write(self, event: dict[str, Any]) -> None:
        event["p"] = self.process
        event["t"] = time.monotonic_ns()
        self.file.write(json.dumps(event, separators=(",", ":")) + "\n")


_WRITES = itertools.count(1)

#: Writes pick the last two keys rarely, so that their records stay put long
#: enough for a sweep to find them live next to dead frames: compaction (and
#: the packing of the one-record segments demotes write) then runs under the
#: checked history. With every key rewritten every few milliseconds, a segment
#: was often wholly dead before any sweep looked at it.
RARE_KEYS = 2
RARE_WEIGHT = 1 / 30


def _weights(keys: list[str]) -> list[float]:
    return [RARE_WEIGHT if i >= len(keys) - RARE_KEYS else 1.0 for i in range(len(keys))]


def written_key(rng: random.Random, keys: list[str]) -> str:
    """The key a single write, compare-and-set or delete goes to."""
    return rng.choices(keys, weights=_weights(keys))[0]


def written_keys(rng: random.Random, keys: list[str], count: int) -> list[str]:
    """``count`` distinct keys for a batch write or delete, weighted like
    :func:`written_key` (each key's score is random ** (1 / weight); the
    highest scores win: weighted sampling without replacement)."""
    scored = sorted(zip(keys, _weights(keys)), key=lambda kw: rng.random() ** (1 / kw[1]),
                    reverse=True)
    return [key for key, _ in scored[:count]]


def run_worker(config: dict[str, Any], state: tiered_state.StateManager, log: Log,
               rng: random.Random) -> None:
    keys = config["keys"]
    tiers = ["hot", "warm", "cold"]

    def value() -> str:
        return f"w{log.process}-{next(_WRITES)}"  # unique across the run: reads name their write

    f = rng.choices(["read", "write", "cas", "delete", "read_many", "write_many", "delete_many"],
                    weights=[30, 20, 20, 8, 10, 8, 4])[0]
    if f == "read":
        key = rng.choice(keys)
        op = log.invoke("read", [key])
        try:
            record = state.get_record(key)
        except IntegrityError as exc:
            log.done(op, "info", error=f"IntegrityError: {exc}")
            return
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        if record is None:
            log.done(op, "ok", values={key: None})
        else:
            log.done(op, "ok", values={key: [record.value, record.version]}, tier=record.tier.value)
    elif f == "write":
        key, v, tier = written_key(rng, keys), value(), rng.choice(tiers)
        op = log.invoke("write", [key], values={key: v}, tier=tier)
        try:
            version = state.set(key, v, tier=tier)
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", versions={key: version})
    elif f == "cas":
        key = written_key(rng, keys)
        op = log.invoke("read", [key])
        try:
            record = state.get_record(key)
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", values={key: None if record is None else [record.value, record.version]})
        expected = 0 if record is None else record.version
        v, tier = value(), rng.choice(tiers)
        op = log.invoke("cas", [key], values={key: v}, expected=expected, tier=tier)
        try:
            version = state.set(key, v, tier=tier, if_version=expected)
        except ConflictError:
            log.done(op, "fail")
            return
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", versions={key: version})
    elif f == "delete":
        key = written_key(rng, keys)
        op = log.invoke("delete", [key])
        try:
            existed = state.delete(key)
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", existed={key: existed})
    elif f == "read_many":
        chosen = rng.sample(keys, rng.randint(2, 4))
        op = log.invoke("read_many", chosen)
        try:
            found = state.get_many(chosen)
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", values={k: found.get(k) for k in chosen},
                 found=[k for k in chosen if k in found])
    elif f == "write_many":
        chosen = written_keys(rng, keys, rng.randint(2, 4))
        values = {k: value() for k in chosen}
        tier = rng.choice(tiers)
        op = log.invoke("write_many", chosen, values=values, tier=tier)
        try:
            versions = state.set_many(values, tier=tier)
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", versions=versions)
    else:
        chosen = written_keys(rng, keys, rng.randint(2, 4))
        op = log.invoke("delete_many", chosen)
        try:
            count = state.delete_many(chosen)
        except TieredStateError as exc:
            log.done(op, "info", error=repr(exc))
            return
        log.done(op, "ok", count=count)


def run_sweeper(config: dict[str, Any], state: tiered_state.StateManager, log: Log,
                rng: random.Random) -> None:
    try:
        report = state.sweep()
    except TieredStateError as exc:
        print(f"sweeper: {exc!r}", file=sys.stderr)
        time.sleep(config.get("error_pause", 0.0))
    else:
        # What the sweeps did, so a test can tell that segments were written,
        # compacted and deleted under the history it checks.
        done = {k: v for k, v in report.as_dict().items()
                if k in ("moved", "packed", "compacted", "segments_deleted") and v}
        if done:
            with open(os.path.join(config["logs"], f"sweeps-{config['process']}.jsonl"), "a") as f:
                f.write(json.dumps(done) + "\n")
    time.sleep(rng.uniform(0.0, 0.05))


def run_migrator(config: dict[str, Any], state: tiered_state.StateManager, log: Log,
                 rng: random.Random) -> None:
    key = rng.choice(config["keys"])
    move = rng.choice(["demote_cold", "demote_warm", "promote_hot", "promote_warm"])
    try:
        if move == "demote_cold":
            state.demote(key, to="cold")
        elif move == "demote_warm":
            state.demote(key, to="warm")
        elif move == "promote_hot":
            state.promote(key, to="hot")
        else:
            state.promote(key, to="warm")
    except TieredStateError as exc:
        print(f"migrator: {move} {key}: {exc!r}", file=sys.stderr)
        time.sleep(config.get("error_pause", 0.0))


ROLES = {"worker": run_worker, "sweeper": run_sweeper, "migrator": run_migrator}


def main() -> int:
    role, raw = sys.argv[1], sys.argv[2]
    config = json.loads(raw)
    process = int(config["process"])
    rng = random.Random(config["seed"])
    log = Log(os.path.join(config["logs"], f"{role}-{process}.jsonl"), process)
    state = _open(config)
    step = ROLES[role]
    deadline = time.monotonic() + float(config["seconds"])
    stop = config["stop_file"]
    # After an operation that failed with an error, wait this long: a client
    # that retries a dead server in a tight loop only floods the history with
    # indeterminate operations (and a restarting server with connections).
    error_pause = float(config.get("error_pause", 0.0))
    for n in range(int(config.get("max_ops", 10**7))):
        if time.monotonic() > deadline or (n % 20 == 0 and os.path.exists(stop)):
            break
        step(config, state, log, rng)
        if error_pause and log.last == "info":
            log.last = ""
            time.sleep(error_pause)
    counters = state.stats()["manager"]
    with open(os.path.join(config["logs"], f"{role}-{process}.stats"), "w") as f:
        # Every plain counter (hits per tier, flushes, errors...), for the summaries.
        json.dump({k: v for k, v in counters.items()
                   if isinstance(v, int) and not isinstance(v, bool)}, f)
    state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
