"""The linearizability checker (tests/linearizability.py) against known answers.

* Hand-written histories: concurrency the checker must accept, and the
  violations real bugs produce (stale read, double cas, resurrection, a
  version going backwards, a lost write, an info write taking effect before
  it was invoked...).
* A brute-force reference: every order of every subset of the info ops,
  against the sequential model as the brief states it, with no pruning at
  all. On thousands of small random histories the checker must agree with it
  exactly, both ways -- that is what shows the prunings are sound and lose
  nothing.
* Simulated clients on a correct register: thousands of ops, crashes turning
  ops into info, several seeds -- all must pass. The same histories with one
  injected fault must fail, with a short window that fails on its own.
* Speed: 40,000 ops on one key, 8 clients, 25 info ops.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from pathlib import Path

import pytest

from tests.linearizability import (
    Op,
    check_history,
    check_key,
    format_ops,
    load_history,
    shortest_failing_window,
)

# --------------------------------------------------------------------------
# Building histories by hand (times are plain ticks; info ops never complete)


def w(p: int, t0: int, t1: int | None, value: str, version: int | None = None, **kw: object) -> Op:
    result = "info" if t1 is None else "ok"
    return Op(process=p, key="k", f="write", value=value, version=version, result=result, invoke=t0,
              complete=t1, **kw)  # type: ignore[arg-type]


def cas(p: int, t0: int, t1: int | None, value: str, expected: int, version: int | None = None,
        result: str | None = None) -> Op:
    result = result or ("info" if t1 is None else "ok" if version is not None else "fail")
    return Op(process=p, key="k", f="cas", value=value, expected=expected, version=version, result=result,
              invoke=t0, complete=t1)


def rd(p: int, t0: int, t1: int | None, value: object = None, version: int | None = None) -> Op:
    return Op(process=p, key="k", f="read", value=value, version=version,
              result="info" if t1 is None else "ok", invoke=t0, complete=t1)


def dl(p: int, t0: int, t1: int | None, existed: bool | None = None) -> Op:
    return Op(process=p, key="k", f="delete", existed=existed, result="info" if t1 is None else "ok",
              invoke=t0, complete=t1)


LINEARIZABLE = {
    "empty history": [],
    "read overlapping a write sees the old value": [
        w(1, 0, 10, "a", 1), w(1, 20, 40, "b", 2), rd(2, 25, 30, "a", 1)],
    "read overlapping a write sees the new value": [
        w(1, 0, 10, "a", 1), w(1, 20, 40, "b", 2), rd(2, 25, 30, "b", 2)],
    "two reads overlapping a write see new then old is fine if they overlap": [
        w(1, 0, 10, "a", 1), w(1, 20, 40, "b", 2), rd(2, 21, 30, "b", 2), rd(3, 22, 35, "a", 1)],
    "concurrent writes complete in either order, versions decide": [
        w(1, 0, 10, "a", 2), w(2, 1, 9, "b", 1), rd(3, 11, 12, "a", 2)],
    "cas success chain and a conflicting cas": [
        w(1, 0, 1, "a", 1), cas(1, 2, 3, "b", 1, 2), cas(2, 4, 5, "c", 2, 3), cas(3, 6, 7, "d", 2),
        rd(2, 8, 9, "c", 3)],
    "cas on an absent key, a second one conflicts": [
        cas(1, 0, 10, "a", 0, 4), cas(2, 1, 11, "b", 0), rd(3, 12, 13, "a", 4)],
    "concurrent cas expecting one version: one wins": [
        w(1, 0, 1, "a", 1), cas(1, 2, 10, "b", 1, 2), cas(2, 3, 9, "c", 1), rd(3, 11, 12, "b", 2)],
    "delete existed True then False": [
        w(1, 0, 1, "a", 1), dl(1, 2, 3, True), dl(2, 4, 5, False), rd(3, 6, 7)],
    "concurrent deletes: one found it": [
        w(1, 0, 1, "a", 1), dl(1, 2, 10, False), dl(2, 3, 9, True), rd(3, 11, 12)],
    "batch delete with unknown existed, present and absent": [
        w(1, 0, 1, "a", 1), dl(1, 2, 3, None), dl(2, 4, 5, None), rd(1, 6, 7)],
    "re-create after delete with a greater version": [
        w(1, 0, 1, "a", 5), dl(1, 2, 3, True), w(2, 4, 5, "b", 9), rd(3, 6, 7, "b", 9),
        cas(1, 8, 9, "c", 9, 12), rd(2, 10, 11, "c", 12)],
    "info write observed by a later read": [
        w(1, 0, None, "a"), rd(2, 5, 6, "a", 7), w(3, 8, 9, "b", 8), rd(2, 10, 11, "b", 8)],
    "info write observed long after, then overwritten": [
        w(1, 0, 1, "a", 1), w(2, 2, None, "b"), rd(3, 50, 60, "b", 3), w(3, 61, 62, "c", 4)],
    "info write never took effect": [
        w(1, 0, None, "a"), rd(2, 5, 6), cas(2, 7, 8, "b", 0, 3), rd(3, 9, 10, "b", 3)],
    "unobserved info write explains a conflict and a delete": [
        w(1, 0, None, "a"), cas(2, 5, 6, "b", 0), dl(2, 7, 8, True), rd(3, 9, 10)],
    "unobserved info write explains a conflict, then a write overwrites it": [
        w(1, 0, 1, "z", 1), dl(1, 2, 3, True), w(2, 4, None, "a"), cas(3, 5, 6, "b", 0),
        w(3, 7, 8, "c", 5), rd(1, 9, 10, "c", 5)],
    "info cas that took effect": [
        w(1, 0, 1, "a", 1), cas(2, 2, None, "b", 1), rd(3, 5, 6, "b", 2), cas(3, 7, 8, "c", 2, 3)],
    "unobserved info cas explains a conflict": [
        w(1, 0, 1, "a", 1), cas(2, 2, None, "b", 1), cas(3, 5, 6, "c", 1), dl(3, 7, 8, True)],
    "info delete explains an absent read": [
        w(1, 0, 1, "a", 1), dl(2, 2, None), rd(3, 5, 6), cas(3, 7, 8, "b", 0, 2)],
    "info delete then cas-on-absent info explain a conflict": [
        w(1, 0, 1, "a", 1), dl(2, 2, None), cas(4, 3, None, "x", 0), cas(3, 5, 6, "b", 1)],
    "indeterminate read is ignored": [
        w(1, 0, 1, "a", 1), rd(2, 2, None, "nonsense", 99), rd(3, 3, 4, "a", 1)],
    "same timestamp at complete and invoke is concurrency, not order": [
        w(1, 0, 5, "a", 1), rd(2, 5, 6)],
}


@pytest.mark.parametrize("name", list(LINEARIZABLE))
def test_linearizable_history_passes(name: str) -> None:
    ops = LINEARIZABLE[name]
    result = check_key(ops)
    assert result.ok, (result.message, format_ops(ops))
    assert _brute_force(ops), "the reference disagrees with the test itself"


VIOLATIONS = {
    "stale read after a completed write": (
        [w(1, 0, 1, "a", 1), w(1, 2, 3, "b", 2), rd(2, 4, 5, "a", 1)], 2),
    "two cas ok expecting the same version": (
        [w(1, 0, 1, "a", 1), cas(1, 2, 5, "b", 1, 2), cas(2, 3, 6, "c", 1, 3)], None),
    "resurrection: a deleted value read after the delete completed": (
        [w(1, 0, 1, "a", 1), dl(1, 2, 3, True), rd(2, 4, 5, "a", 1)], 2),
    "a version going backwards": (
        [w(1, 0, 1, "a", 5), w(1, 2, 3, "b", 3)], 1),
    "delete existed True twice without a write between": (
        [w(1, 0, 1, "a", 1), dl(1, 2, 3, True), dl(2, 4, 5, True)], 2),
    "a lost write: an older value read after a newer write completed": (
        [w(1, 0, 10, "a", 1), w(2, 2, 3, "b", 2), rd(3, 4, 5, "a", 1)], 2),
    "a lost write: absent after a write completed": (
        [w(1, 0, 1, "a", 1), rd(2, 2, 3)], 1),
    "an info write taking effect before its invoke": (
        [rd(2, 0, 5, "a", 7), w(1, 10, None, "a")], 0),
    "a value nobody wrote": (
        [w(1, 0, 1, "a", 1), rd(2, 2, 3, "zzz", 1)], 1),
    "a cas that failed although its expected version was current": (
        [w(1, 0, 1, "a", 1), cas(2, 2, 3, "b", 1)], 1),
    "delete existed False while present": (
        [w(1, 0, 1, "a", 1), dl(2, 2, 3, False)], 1),
    "one version produced twice": (
        [w(1, 0, 1, "a", 4), w(2, 2, 3, "b", 4)], 1),
    "a read whose version disagrees with the write it saw": (
        [w(1, 0, 1, "a", 4), rd(2, 2, 3, "a", 5)], 1),
    "a failed cas took effect": (
        [w(1, 0, 1, "a", 1), cas(2, 2, 3, "b", 7), rd(3, 4, 5, "b", 8)], 2),
    "an observed info write cannot come back after being overwritten": (
        [w(1, 0, None, "a"), rd(2, 1, 2, "a", 3), w(3, 3, 4, "b", 4), rd(2, 5, 6, "a", 3)], 3),
    "a cas cannot match the unknown version of an unrevealed info write": (
        [w(1, 0, None, "a"), cas(2, 5, 6, "b", 123, 200)], 1),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_violation_is_caught(name: str) -> None:
    ops, culprit = VIOLATIONS[name]
    result = check_key(ops)
    assert result.status == "failed", format_ops(ops)
    assert not _brute_force(ops), "the reference disagrees with the test itself"
    if culprit is not None:
        assert result.op is ops[culprit], result.message
    assert result.message.startswith("not linearizable")
    window = shortest_failing_window(ops)
    assert window
    assert not check_key(window, initial="empty" if window[0] is ops[0] else "unknown").ok


def test_prefix_is_what_ran_before_the_failure() -> None:
    ops = [w(1, 0, 1, "a", 1), w(1, 2, 3, "b", 2), rd(2, 4, 5, "a", 1), rd(3, 4, 9, "b", 2),
           w(1, 10, 11, "c", 3)]
    result = check_key(ops)
    assert result.op is ops[2]
    assert result.prefix == 4  # everything invoked by the time the stale read returned


# --------------------------------------------------------------------------
# The unconstrained initial state of a window


def test_unknown_initial_state_pins_on_first_observation() -> None:
    # alone, each of these is fine from some initial state
    assert check_key([dl(1, 0, 1, True), rd(2, 2, 3)], initial="unknown").ok
    assert check_key([rd(1, 0, 1, "old", 40), w(2, 2, 3, "a", 41)], initial="unknown").ok
    assert check_key([cas(1, 0, 1, "a", 40, 41), rd(2, 2, 3, "a", 41)], initial="unknown").ok
    assert check_key([cas(1, 0, 1, "a", 7), dl(2, 2, 3, False)], initial="unknown").ok
    # ...but the initial state is one state, and versions still only grow
    assert not check_key([rd(1, 0, 1, "old", 40), rd(2, 2, 3)], initial="unknown").ok
    assert not check_key([rd(1, 0, 1, "old", 40), w(2, 2, 3, "a", 39)], initial="unknown").ok
    assert not check_key([w(2, 0, 1, "a", 39), rd(1, 2, 3, "old", 38)], initial="unknown").ok
    assert not check_key([dl(1, 0, 1, True), dl(2, 2, 3, True)], initial="unknown").ok
    # the empty store is not a wildcard
    assert not check_key([dl(1, 0, 1, True)]).ok


def test_window_is_short_and_from_the_middle() -> None:
    ops = simulate(3, 2000, clients=4)
    history = sorted(ops, key=lambda op: (op.invoke, op.process))
    later = [op for op in history[1500:] if op.f == "read" and op.version is not None]
    older = [op for op in history[:1000] if op.f == "write"]
    bad = dataclasses.replace(later[0], value=older[-1].value, version=older[-1].version)
    history[history.index(later[0])] = bad
    window = shortest_failing_window(history)
    assert bad in window
    assert 2 <= len(window) <= 10, format_ops(window)
    assert not check_key(window, initial="unknown").ok
    assert shortest_failing_window(ops) == []


# --------------------------------------------------------------------------
# Reference: brute force over the literal model, no pruning


_UNKNOWN = object()
Model = tuple[bool, object, object, int]  # present, value, version (or _UNKNOWN), floor


def _brute_force(ops: list[Op]) -> bool:
    """Try every order of the ops (and every subset of the info ops) against the model."""
    ops = sorted((op for op in ops if not (op.f == "read" and op.result == "info")),
                 key=lambda op: (op.invoke, op.process))
    revealed: dict[int, int] = {}  # an info write's version is what the first read of it saw
    for read in ops:
        if read.f == "read" and read.result == "ok" and read.version is not None:
            for op in ops:
                if op.f in ("write", "cas") and op.result == "info" and op.value == read.value:
                    revealed.setdefault(id(op), read.version)
    ends = [float("inf") if op.complete is None or op.result == "info" else float(op.complete) for op in ops]
    required = sum(1 << n for n, op in enumerate(ops) if op.result != "info")

    def matches(state: Model, expected: int | None) -> bool:
        present, _, version, _ = state
        if expected == 0:
            return not present
        return present and version is not _UNKNOWN and version == expected

    def step(op: Op, state: Model) -> Model | None:
        present, value, version, floor = state
        if op.f == "write" or (op.f == "cas" and op.result != "fail"):
            if op.f == "cas" and not matches(state, op.expected):
                return None
            new = revealed.get(id(op)) if op.result == "info" else op.version
            if new is None:  # unrevealed: present, version unknown, floor as it was
                return (True, op.value, _UNKNOWN, floor)
            return (True, op.value, new, new) if new > floor else None
        if op.f == "cas":
            return None if matches(state, op.expected) else state
        if op.f == "read":
            if op.version is None:
                return None if present else state
            ok = present and value == op.value and version is not _UNKNOWN and version == op.version
            return state if ok else None
        if op.result == "ok" and op.existed is not None and op.existed != present:
            return None
        return (False, None, None, floor)

    dead: set[tuple[int, Model]] = set()

    def search(done: int, state: Model) -> bool:
        if done & required == required:
            return True
        if (done, state) in dead:
            return False
        for n, op in enumerate(ops):
            if done >> n & 1:
                continue
            if any(not done >> m & 1 and m != n and ends[m] < op.invoke for m in range(len(ops))):
                continue  # something not yet linearized precedes it in real time
            after = step(op, state)
            if after is not None and search(done | 1 << n, after):
                return True
        dead.add((done, state))
        return False

    return search(0, (False, None, None, 0))


def _random_history(rng: random.Random) -> list[Op]:
    """A small history of random ops with random results: mostly garbage, often linearizable."""
    ops = []
    written = []
    for n in range(rng.randint(2, 7)):
        t0 = rng.randint(0, 20)
        t1 = None if rng.random() < 0.35 else t0 + rng.randint(0, 8)
        f = rng.choice(["write", "cas", "cas", "read", "read", "delete", "delete"])
        process = n % 3 if t1 is not None else 10 + n
        if f == "write":
            written.append(f"v{n}")
            ops.append(w(process, t0, t1, f"v{n}", None if t1 is None else rng.choice([8, 16, 24, 32])))
        elif f == "cas":
            written.append(f"v{n}")
            expected = rng.choice([0, 0, 8, 16, 24])
            version = rng.choice([None, 8, 16, 24, 32]) if t1 is not None else None
            ops.append(cas(process, t0, t1, f"v{n}", expected, version))
        elif f == "delete":
            ops.append(dl(process, t0, t1, rng.choice([True, False, None])))
        else:
            ops.append(rd(process, t0, t1))
    for n, op in enumerate(ops):
        if op.f == "read" and op.result == "ok" and written and rng.random() < 0.65:
            ops[n] = dataclasses.replace(op, value=rng.choice(written), version=rng.choice([8, 16, 24, 32]))
    return ops


def test_agrees_with_brute_force_on_random_small_histories() -> None:
    rng = random.Random(20240611)
    verdicts = {True: 0, False: 0}
    for _ in range(1500):
        ops = _random_history(rng)
        expected = _brute_force(ops)
        assert check_key(ops).ok == expected, format_ops(ops)
        verdicts[expected] += 1
    assert min(verdicts.values()) > 300  # both kinds well represented


def test_agrees_with_brute_force_on_small_simulations_with_faults() -> None:
    rng = random.Random(7)
    verdicts = {True: 0, False: 0}
    for _ in range(400):
        size, clients, info = rng.randint(3, 8), rng.randint(1, 3), rng.randint(0, 2)
        ops = simulate(rng.randrange(10**6), size, clients=clients, info=info, span=rng.randint(1, 12))
        reads = [n for n, op in enumerate(ops) if op.f == "read" and op.result == "ok"]
        writes = [op for op in ops if op.f in ("write", "cas") and op.version is not None]
        if reads and rng.random() < 0.6:
            # a read returns some other write's value, or nothing
            source = rng.choice([*writes, rd(0, 0, 0)])
            n = rng.choice(reads)
            ops[n] = dataclasses.replace(ops[n], value=source.value, version=source.version)
        expected = _brute_force(ops)
        assert check_key(ops).ok == expected, format_ops(ops)
        verdicts[expected] += 1
    assert min(verdicts.values()) > 40


def test_windows_of_a_linearizable_history_never_fail() -> None:
    # A failing window must be a genuine witness; the ops outside it that
    # overlap it may act inside it. Exhaustively on small histories.
    from tests.linearizability import _order, _Windows

    rng = random.Random(99)
    for _ in range(150):
        ops = simulate(rng.randrange(10**6), 8, clients=3, info=rng.randint(0, 2), span=12)
        ops.sort(key=_order)
        windows = _Windows(ops)
        for i, j in itertools.combinations(range(len(ops) + 1), 2):
            assert not windows.fails(i, j), format_ops(ops[i:j])


# --------------------------------------------------------------------------
# Simulated clients on a correct register


def simulate(seed: int, n_ops: int, *, clients: int = 8, info: int = 0, span: int = 40) -> list[Op]:
    """Clients driving a correct sequential register, as a real run would record them.

    Each op takes effect at one instant (its linearization point, a few
    ticks after the previous one); its invoke is some time before that, after
    its client's previous op completed, and its complete some time after.
    ``info`` ops, picked at random, crash: their client is replaced by a new
    process, they never complete, and they took effect or not at random. A
    cas expects a version a client was told, never the unknown version of a
    crashed write (as real workers do).
    """
    rng = random.Random(seed)
    present, value, version, floor = False, None, 0, 0
    told = [0]
    crash = set(rng.sample(range(n_ops), min(info, n_ops)))
    free_at = [0] * clients
    processes = list(range(clients))
    ops: list[Op] = []
    now = 0
    for n in range(n_ops):
        now += rng.randint(1, 6)
        idle = [c for c in range(clients) if free_at[c] < now]
        if not idle:
            now = min(free_at) + 1
            idle = [c for c in range(clients) if free_at[c] < now]
        c = rng.choice(idle)
        process = processes[c]
        invoke = rng.randint(free_at[c] + 1, now)
        complete: int | None = now + rng.randint(0, span)
        crashed = n in crash
        applies = not crashed or rng.random() < 0.5
        roll = rng.random()
        fields: dict[str, object] = {"result": "ok"}
        if roll < 0.4:
            f = "read"
            if present:
                fields.update(value=value, version=version)
                if not crashed:
                    told.append(version)
        elif roll < 0.65:
            f = "write"
            new = floor + rng.randint(1, 3) * 8
            fields.update(value=f"w{process}-{n}", version=new)
            if applies:
                present, value, version, floor = True, f"w{process}-{n}", new, new
                if not crashed:
                    told.append(new)
        elif roll < 0.85:
            f = "cas"
            pick = rng.random()
            current = version if present else 0
            expected = current if pick < 0.5 and current in told else 0 if pick < 0.7 else rng.choice(told)
            fields.update(value=f"w{process}-{n}", expected=expected)
            if (expected == 0 and not present) or (present and expected == version):
                new = floor + rng.randint(1, 3) * 8
                fields.update(version=new)
                if applies:
                    present, value, version, floor = True, f"w{process}-{n}", new, new
                    if not crashed:
                        told.append(new)
            else:
                fields.update(result="fail")
        else:
            f = "delete"
            fields.update(existed=None if rng.random() < 0.2 else present)
            if applies:
                present, value = False, None
        if crashed:
            fields.update(result="info", version=None, existed=None)
            if f == "read":
                fields.update(value=None)
            complete = None
            processes[c] = 1000 + n  # the harness starts a new worker
            free_at[c] = now
        else:
            assert complete is not None
            free_at[c] = complete
        ops.append(Op(process=process, key="k", f=f, invoke=invoke * 1000,
                      complete=None if complete is None else complete * 1000, **fields))  # type: ignore[arg-type]
    return ops


def _max_overlap(ops: list[Op]) -> int:
    events = sorted([(op.invoke, 1) for op in ops if op.complete is not None]
                    + [(op.complete, -1) for op in ops if op.complete is not None],
                    key=lambda event: (event[0], -event[1]))
    running = top = 0
    for _, delta in events:
        running += delta
        top = max(top, running)
    return top


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_simulated_correct_register_passes(seed: int) -> None:
    ops = simulate(seed, 4000, clients=8, info=20)
    assert _max_overlap(ops) >= 6
    assert sum(op.result == "info" for op in ops) == 20
    result = check_key(ops)
    assert result.ok, result.message


def test_simulated_register_with_many_info_ops_passes_quickly() -> None:
    # every info op stays pending forever: without pruning 4 each would
    # double the configurations
    ops = simulate(11, 6000, clients=8, info=300)
    started = time.perf_counter()
    assert check_key(ops).ok
    assert time.perf_counter() - started < 5.0


def _sorted(ops: list[Op]) -> list[Op]:
    return sorted(ops, key=lambda op: (op.invoke, op.process, op.f))


def _by_version(ops: list[Op]) -> list[Op]:
    return sorted((op for op in ops if op.f in ("write", "cas") and op.result == "ok"),
                  key=lambda op: op.version)  # type: ignore[arg-type,return-value]


def _pinned(history: list[Op], n: int, floor: int) -> bool:
    """Whether an op that completed just before ``history[n]`` began showed a version above ``floor``.

    Such an op and ``history[n]`` bound a short window that proves the fault,
    so the test may demand a short window.
    """
    for before in history[max(0, n - 7) : n]:
        if before.result == "ok" and before.complete < history[n].invoke:  # type: ignore[operator]
            if before.version is not None and before.version > floor:
                return True
    return False


def _stale_read(history: list[Op], rng: random.Random) -> Op:
    """A read now returns an older value, although a newer write completed before it began."""
    writes = _by_version(history)
    candidates = []
    for n, read in enumerate(history):
        if read.f == "read" and read.result == "ok" and read.version is not None:
            older = [op for op in writes if op.version < read.version]  # type: ignore[operator]
            if len(older) > 1 and _pinned(history, n, older[-2].version):  # type: ignore[arg-type]
                candidates.append((n, older[-2]))
    n, source = rng.choice(candidates)
    history[n] = dataclasses.replace(history[n], value=source.value, version=source.version)
    return history[n]


def _version_down(history: list[Op], rng: random.Random) -> Op:
    """A write's version is below that of a write that completed before it began."""
    writes = _by_version(history)
    position = {id(op): n for n, op in enumerate(history)}
    candidates = [
        (before, after) for before, after in itertools.pairwise(writes)
        if after.f == "write" and before.complete < after.invoke  # type: ignore[operator]
        and _pinned(history, position[id(after)], before.version - 1)  # type: ignore[operator]
    ]
    before, after = rng.choice(candidates)
    n = position[id(after)]
    history[n] = dataclasses.replace(after, version=before.version - 1)  # type: ignore[operator]
    return history[n]


def _cas_fail_to_ok(history: list[Op], rng: random.Random) -> Op:
    """A cas succeeds although the version it expected was replaced before it began."""
    versions = {op.version for op in _by_version(history)}
    candidates = [
        n for n, op in enumerate(history)
        if op.f == "cas" and op.result == "fail" and op.expected in versions
        and _pinned(history, n, op.expected)  # type: ignore[arg-type]
    ]
    n = rng.choice(candidates)
    history[n] = dataclasses.replace(history[n], result="ok", version=history[n].expected + 1)  # type: ignore[operator]
    return history[n]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mutate", [_stale_read, _version_down, _cas_fail_to_ok])
def test_injected_fault_is_caught_with_a_short_window(mutate, seed: int) -> None:  # type: ignore[no-untyped-def]
    history = _sorted(simulate(seed, 3000, clients=8, info=10))
    assert check_key(history).ok
    bad = mutate(history, random.Random(seed))
    result = check_key(history)
    assert result.status == "failed"
    assert result.op is bad, f"blamed {result.op}, injected {bad}"
    window = shortest_failing_window(history)
    assert bad in window
    assert 1 <= len(window) <= 10, format_ops(window, mark=bad)
    assert not check_key(window, initial="empty" if window[0] is history[0] else "unknown").ok


def test_failure_late_in_a_long_history() -> None:
    history = _sorted(simulate(5, 20000, clients=8, info=25))
    tail = history[19000:]
    bad = _stale_read(tail, random.Random(5))
    history[19000:] = tail
    report = check_history(history)
    assert not report.ok
    result = report.failures["k"]
    assert result.op is bad
    assert result.window is not None and bad in result.window and len(result.window) <= 10
    assert result.prefix > 19000
    assert "shortest failing window" in str(report) and "NOT linearizable" in str(report)


# --------------------------------------------------------------------------
# Speed


def test_forty_thousand_ops_on_one_key_check_fast() -> None:
    ops = simulate(2024, 40000, clients=8, info=25)
    assert _max_overlap(ops) == 8
    started = time.perf_counter()
    result = check_key(ops)
    seconds = time.perf_counter() - started
    print(f"\n40,000 ops, overlap 8, 25 info: checked in {seconds:.2f} s")
    assert result.ok, result.message
    assert seconds < 10.0


# --------------------------------------------------------------------------
# The report, the history format, the table


def test_check_history_groups_keys_and_reports() -> None:
    good = [dataclasses.replace(op, key="good") for op in LINEARIZABLE["delete existed True then False"]]
    bad_ops = [dataclasses.replace(op, key="bad") for op in VIOLATIONS["a version going backwards"][0]]
    report = check_history(good + bad_ops + [dataclasses.replace(rd(9, 0, None), key="bad")])
    assert not report.ok
    assert report.keys_checked == 2
    assert report.ops_checked == len(good) + len(bad_ops) + 1
    assert report.info_ops == 1
    assert report.failed_keys == ["bad"] and report.unknown_keys == []
    assert report.failures["bad"].window is not None
    assert report.seconds >= 0
    assert check_history(good).ok


def test_time_limit_gives_unknown_not_ok() -> None:
    ops = simulate(1, 3000, clients=8)
    report = check_history(ops, time_limit=0.0)
    assert not report.ok
    assert report.unknown_keys == ["k"] and report.failed_keys == []
    assert "time_limit" in report.failures["k"].message
    assert check_history(ops, time_limit=60.0).ok


def test_op_json_round_trip() -> None:
    ops = [w(1, 0, 5, "a", 9), cas(2, 1, None, "b", 9), rd(3, 2, 3, {"nested": [1, 2]}, 9), dl(4, 4, 6, None)]
    for op in ops:
        line = op.to_json()
        assert "\n" not in line
        assert Op.from_json(line) == op
    with pytest.raises(ValueError, match="process"):
        Op.from_json(json.dumps({"key": "k", "f": "read", "invoke": 1}))
    with pytest.raises(ValueError, match="only a cas can fail"):
        Op.from_json(dataclasses.replace(ops[0], result="fail").to_json())


def test_load_history_merges_files_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    first, second = tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    first.write_text(w(1, 0, 3, "a", 1).to_json() + "\n" + rd(1, 10, 12, "a", 1).to_json() + "\n")
    second.write_text(dl(2, 5, 6, True).to_json() + "\n" + '{"process": 2, "key": "k", "f": "wr')
    ops = load_history([first, second])
    assert [op.invoke for op in ops] == [0, 5, 10]
    second.write_text('{"process": 2, "key": \n' + dl(2, 5, 6, True).to_json() + "\n")
    with pytest.raises(ValueError, match=r"p2\.jsonl:1"):
        load_history([first, second])


@pytest.mark.parametrize(
    "bad",
    [
        dict(f="append"),
        dict(result="maybe"),
        dict(complete=None),
        dict(complete=-1),
        dict(version=None),
        dict(value=None),
    ],
)
def test_malformed_ops_are_rejected(bad: dict[str, object]) -> None:
    op = dataclasses.replace(w(1, 0, 5, "a", 1), **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="malformed"):
        check_key([op])


def test_a_value_written_twice_is_a_harness_bug() -> None:
    with pytest.raises(ValueError, match="written twice"):
        check_key([w(1, 0, 1, "a", 1), w(2, 2, 3, "a", 2)])


def test_format_ops_table() -> None:
    ops = [w(1, 1_000_000, 2_500_000, "a", 7), cas(2, 2_000_000, None, "b", 7), dl(3, 3_000_000, 4_000_000)]
    table = format_ops(ops, mark=ops[1])
    lines = table.splitlines()
    assert "invoke ms" in lines[0] and "result" in lines[0]
    assert lines[1].split()[:5] == ["0.000", "1.500", "1", "write", "'a'"]
    assert lines[2].startswith(">") and "expected=7" in lines[2] and lines[2].rstrip().endswith("info")
    assert "existed=?" in lines[3]
    assert format_ops([]) == "(no operations)"
