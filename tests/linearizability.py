"""A linearizability checker for histories of versioned key-value registers.

The history test runs several processes against one store, records every
operation with the time it was invoked and the time it completed, and asks
this module whether some single order of the operations -- one that respects
real time -- explains every result. The approach is the one of Jepsen's
Knossos and of porcupine: check each key on its own, search for a
linearization with Wing & Gong's algorithm as improved by Lowe (memoised
configurations, operations linearized "just in time"). It stands alone:
nothing here imports :mod:`tiered_state`.

History
    One :class:`Op` per operation, one JSON object per line
    (:meth:`Op.to_json`, :meth:`Op.from_json`, :func:`load_history`). Times
    are nanoseconds from a clock every process shares. ``result`` is ``ok``,
    ``fail`` (a ``cas`` whose expected version did not match) or ``info``:
    indeterminate -- the worker was killed, or got an error or a timeout. An
    info operation may have taken effect at any one instant after its invoke,
    or never; its ``complete`` is ignored (treated as +infinity).

Model (the sequential specification, per key)
    A register: absent, or present with a value and a version; plus the
    *floor*, the greatest version any write produced so far (the store starts
    empty: absent, floor 0).

    ===============================  =============================================================
    ``write(v)`` ok, version V       requires V > floor; -> present(v, V), floor = V
    ``cas(v, E)`` ok, version V      requires present with version E (E = 0: absent), V > floor;
                                     -> present(v, V), floor = V
    ``cas(v, E)`` fail               requires NOT (present with version E, or E = 0 and absent)
    ``read`` -> (v, V) / absent      requires present(v, V) / absent
    ``delete`` existed True / False  requires present / absent; -> absent
    ``delete`` existed None          either; -> absent (a batch delete reports only a count)
    ===============================  =============================================================

    Written values are unique per write, so a read names the write it saw.
    An info write or cas whose value some read returned therefore did take
    effect, with the version that read saw (the checker derives this itself).
    One no read returned has an unknown version: if it is linearized the key
    becomes present with an UNKNOWN version (> floor; the floor stays as it
    was, a permissive simplification that never rejects a linearizable
    history). No read can return that state, no ``cas`` ok can have matched
    it (its expected version came from a reply), a ``cas`` fail is
    consistent with it.

Algorithm
    Real time: A precedes B iff ``A.complete < B.invoke``. The history is
    linearizable iff some total order extending that partial order is a legal
    run of the model. Per key (P-compositionality: keys are independent
    registers), the search walks the invoke and complete events in time
    order and keeps the *frontier*: every configuration ``(bitset of the
    running operations already linearized, model state)`` some legal
    linearization of the past can be in. The bitset covers only operations
    still running (a slot per running operation, freed when it completes),
    so it stays a small int. At the completion of operation X every
    configuration that has not linearized X yet is extended by linearizing
    running operations, in every order, until X is in (Lowe's just-in-time
    linearization); the configurations met are memoised for that event
    (Lowe's cache), and only those with X in survive. When none survives, X
    is the operation that could not be linearized, and everything invoked
    before that moment had a linearization (the exact rerun of pruning 7 may
    also stop at the invoke of a write whose version is already below every
    configuration's floor). This is the breadth-first form
    of the search (Knossos' "linear" checker): no backtracking across the
    history, so a failing history costs no more than a passing one, and the
    first failure is found exactly.

Prunings, and why each is sound (none rejects a linearizable history)
    1. *Versions order the writes.* Every ok write or cas (and every info one
       whose version a read revealed) must exceed the floor, which its
       predecessor set, so they linearize in increasing version order: only
       the next one in version order is ever tried. Two with one version can
       never both linearize.
    2. *Read-only operations go first.* A read, a ``cas`` fail or a
       ``delete`` that found nothing never changes the state. If one is
       running and legal in the current state, it is linearized at once, with
       no branch: in any legal order that places it later, moving it to the
       front leaves every other step seeing the same state (it is legal now,
       and removing an identity step from later changes nothing).
    3. *Leaving a version for good.* Once present(v, V) is replaced, no later
       step can bring version V back (new versions exceed the floor). So the
       state may leave V only after every read of V and every ``cas`` ok
       expecting V has been linearized; if one of them is not even invoked
       yet, the configuration is dead and is dropped at once instead of
       lingering until that operation completes.
    4. *Unobserved info operations are tokens.* An info write or cas that no
       read saw, and any info delete, is never a running operation of the
       search (it never completes, so it would be pending -- doubling the
       configurations -- forever). Its only possible effect is to make the
       key present-UNKNOWN (write, cas) or absent (delete). Take any legal
       order: a token whose next real step is legal without it either can be
       dropped (that step overwrites the state: write, cas ok, delete True or
       None) or moved after that step (the step is read-only); tokens precede
       nothing in real time, so moving one later keeps the order legal. So it
       suffices to spend a token immediately before a real step that is not
       legal in the current state and becomes legal through it, and a run of
       tokens there reduces to at most two (delete then cas-on-absent). A
       token can be spent once its invoke is in the past and stays usable
       forever, so same-kind tokens are interchangeable: a configuration
       counts the tokens it spent (write, cas-on-absent, delete) instead of
       naming them. An info ``cas`` expecting version E > 0 can only fire in
       the one stretch where the version is E, and after it the version is
       never E again, so it needs no count. Where a cheaper token does the
       job (a cas expecting the current version, a cas-on-absent from
       absent) the search spends it rather than a write token, which can do
       anything those can and is kept for later.
    5. *Observed info operations get a deadline.* An info write a read
       returned must be linearized before that read completes, so it is
       treated as an ordinary operation completing then.
    6. *Dominance.* Of two configurations with the same bitset and state, one
       that spent no more tokens of every kind can do whatever the other can;
       the other is dropped.
    7. *Look-ahead.* Prunings 1 and 3 may drop a configuration because of an
       op not invoked yet (a lower version, a read of the old version). That
       is exact for the verdict but makes the search fail at an innocent op,
       so once a key is proven not linearizable it is searched again without
       the look-ahead (the floor alone orders the versions), to name the
       first event at which no linearization of the past survives.

Windows
    :func:`shortest_failing_window` explains a failure with a short run of
    consecutive operations (by invoke) that is not linearizable on its own,
    from an unknown initial state: a wildcard that the first read, cas or
    delete pins, with an unknown floor (a version must still exceed every
    version linearized inside the window). While it searches, the ops
    outside a window that overlap it in time -- still running when it
    starts, invoked before its last op completes, or info -- may take effect
    inside it, or not; without them almost any two reads straddling a write
    just outside the window would "fail". They only ever add possibilities (a
    read whose outside writer disagrees with it is treated as reading an
    unknown value). One more relaxation, for windows only: a ``cas`` may
    match the unknown version of an info write when some read of the whole
    history revealed that version -- a read outside the window may hold the
    reveal, and without it failure would not be monotone. So a window that
    fails with all that fails alone too, and it is a genuine witness: were
    the whole history linearizable, every window would be. Growing a window
    at either end only removes possibilities, so failure is monotone in both
    ends, which is what makes the binary searches sound. A window that starts
    with the key's first op starts from the empty store instead.

Assumptions and limits
    Values are unique per write (a value written twice raises ValueError); a
    cas expects a version some worker was told (never the version of an
    unrevealed info write, which nobody knows); versions are compared, never
    counted (an unknown version only has to exceed the floor, so a write
    right after an unrevealed info write is not required to skip a number).
    Keys are independent registers: a multi-key operation must be recorded
    as one op per key. The frontier can hold up to 2^k configurations when
    k mutating ops (writes, deletes) are running at once; each worker runs
    one op at a time, so k is at most the number of processes (8 processes:
    measured about 1 s for 40,000 ops). A search that outruns
    ``time_limit`` is "unknown".
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "KeyResult",
    "Op",
    "Report",
    "check_history",
    "check_key",
    "format_ops",
    "load_history",
    "shortest_failing_window",
]

FUNCTIONS = ("write", "cas", "read", "delete")
RESULTS = ("ok", "fail", "info")


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One operation on one key, as a worker recorded it.

    :param process: the worker process (a killed worker's successor gets a new one)
    :param key: the key the operation touched
    :param f: ``"write"``, ``"cas"``, ``"read"`` or ``"delete"``
    :param value: the value written (write, cas) or read (None: absent)
    :param expected: the version a cas expected (0: the key must be absent)
    :param version: the version a write or cas produced, or a read returned
    :param existed: what a delete reported (None: unknown, from a batch delete)
    :param result: ``"ok"``, ``"fail"`` (cas only) or ``"info"`` (indeterminate)
    :param invoke: nanoseconds, when the call started
    :param complete: nanoseconds, when it returned; None for an info operation
    """

    process: int
    key: str
    f: str
    value: object | None = None
    expected: int | None = None
    version: int | None = None
    existed: bool | None = None
    result: str = "ok"
    invoke: int
    complete: int | None = None

    def to_json(self) -> str:
        """This operation as one line of JSON (no newline)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> Op:
        """Parse one line written by :meth:`to_json`.

        :raises ValueError: not a JSON object, a required field is missing,
            or the operation is malformed (see :func:`check_key`)
        """
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object: {line!r}")
        missing = [name for name in ("process", "key", "f", "invoke") if name not in data]
        if missing:
            raise ValueError(f"operation without {', '.join(missing)}: {line!r}")
        known = {f.name for f in fields(cls)}
        op = cls(**{name: value for name, value in data.items() if name in known})
        _validate(op)
        return op


def load_history(paths: Iterable[str | Path]) -> list[Op]:
    """Read and merge per-process JSONL files into one history, ordered by invoke.

    Each line is one complete operation. A last line without its newline that
    does not parse is skipped: the worker was killed while appending it, and
    the harness records that operation itself (as info). Any other bad line
    raises.

    :param paths: the files, one per worker process
    :returns: every operation, sorted by invoke time (then process)
    :raises ValueError: a malformed line
    """
    ops: list[Op] = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                ops.append(Op.from_json(line))
            except ValueError as exc:
                torn = number == len(lines) and not text.endswith("\n")
                if torn and isinstance(exc, json.JSONDecodeError):
                    continue
                raise ValueError(f"{path}:{number}: {exc}") from exc
    ops.sort(key=_order)
    return ops


@dataclass(slots=True)
class KeyResult:
    """The verdict on one key.

    :param key: the key
    :param status: ``"ok"``, ``"failed"`` (proven not linearizable) or
        ``"unknown"`` (the time limit ran out first)
    :param ops: operations checked
    :param info_ops: how many of them were indeterminate
    :param op: on failure, the operation that could not be linearized
    :param prefix: on failure, how many operations (by invoke) were invoked
        before the check failed: that prefix of the history had a
        linearization (operations still running then may or may not have
        taken effect); on success, all of them
    :param message: a one-line explanation
    :param seconds: time spent on this key
    :param window: on failure, when asked for, the shortest failing window
    """

    key: str
    status: str
    ops: int
    info_ops: int
    op: Op | None = None
    prefix: int = 0
    message: str = ""
    seconds: float = 0.0
    window: list[Op] | None = None

    @property
    def ok(self) -> bool:
        """True iff the key was proven linearizable."""
        return self.status == "ok"

    def describe(self) -> str:
        """The verdict in one paragraph (``str(report)`` adds the key and the window)."""
        return f"{self.message} [{self.ops} ops, {self.info_ops} info, {self.seconds:.2f} s]"


@dataclass(slots=True)
class Report:
    """The verdict on a whole history.

    :param ok: every key was proven linearizable (an unknown key is not ok)
    :param keys_checked: keys in the history
    :param ops_checked: operations in the history
    :param info_ops: indeterminate operations among them
    :param failures: the keys that failed or are unknown, with their results
    :param seconds: total time spent
    """

    ok: bool
    keys_checked: int
    ops_checked: int
    info_ops: int
    failures: dict[str, KeyResult] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed_keys(self) -> list[str]:
        """Keys proven not linearizable."""
        return [key for key, result in self.failures.items() if result.status == "failed"]

    @property
    def unknown_keys(self) -> list[str]:
        """Keys the time limit stopped before a verdict."""
        return [key for key, result in self.failures.items() if result.status == "unknown"]

    def __str__(self) -> str:
        head = (
            f"{'linearizable' if self.ok else 'NOT linearizable'}: {self.keys_checked} keys, "
            f"{self.ops_checked} ops ({self.info_ops} info) in {self.seconds:.2f} s"
        )
        parts = [head]
        for key, result in self.failures.items():
            text = f"key {key!r}: {result.describe()}"
            if result.window:
                text += f"\nshortest failing window ({len(result.window)} ops, > marks the op blamed):\n"
                text += format_ops(result.window, mark=result.op)
            parts.append(text)
        return "\n\n".join(parts)


def check_history(
    ops: Iterable[Op], *, time_limit: float | None = None, explain: bool = True
) -> Report:
    """Check every key of a history for linearizability.

    :param ops: the history, in any order, any number of keys
    :param time_limit: seconds allowed per key (None: no limit); a key that
        runs out is reported ``"unknown"``
    :param explain: attach the shortest failing window to each failed key
    :returns: the report; ``report.ok`` is False if any key failed or is unknown
    :raises ValueError: a malformed operation (a harness bug, not a store bug)
    """
    started = time.perf_counter()
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    report = Report(ok=True, keys_checked=len(by_key), ops_checked=0, info_ops=0)
    for key in sorted(by_key):
        result = check_key(by_key[key], time_limit=time_limit)
        report.ops_checked += result.ops
        report.info_ops += result.info_ops
        if result.ok:
            continue
        report.ok = False
        if explain and result.status == "failed":
            result.window = _shortest_window(sorted(by_key[key], key=_order), result.prefix)
        report.failures[key] = result
    report.seconds = time.perf_counter() - started
    return report


def check_key(ops: Sequence[Op], *, initial: str = "empty", time_limit: float | None = None) -> KeyResult:
    """Check the history of one key.

    :param ops: the operations on the key, in any order
    :param initial: ``"empty"`` (the store starts empty) or ``"unknown"``
        (a wildcard state, as for a window cut out of a longer history)
    :param time_limit: seconds allowed (None: no limit)
    :returns: ok, failed (with the operation that could not be linearized
        and the linearizable prefix) or unknown
    :raises ValueError: a malformed operation, ops on several keys, or an
        unknown ``initial``
    """
    started = time.perf_counter()
    history = sorted(ops, key=_order)
    keys = {op.key for op in history}
    if len(keys) > 1:
        raise ValueError(f"check_key got several keys: {sorted(keys)}")
    if initial not in ("empty", "unknown"):
        raise ValueError(f"initial must be 'empty' or 'unknown', not {initial!r}")
    for op in history:
        _validate(op)
    key = history[0].key if history else ""
    info = sum(op.result == "info" for op in history)
    result = KeyResult(key=key, status="ok", ops=len(history), info_ops=info, prefix=len(history))
    deadline = None if time_limit is None else started + time_limit
    search = _Search(history, [], wild=initial == "unknown")
    outcome = search.run(deadline)
    if outcome is not None and outcome is not _TIMEOUT:
        # Proven not linearizable; find the first failing event exactly.
        exact = _Search(history, [], wild=initial == "unknown", lookahead=False).run(deadline)
        if exact is not None and exact is not _TIMEOUT:
            outcome = exact
    result.seconds = time.perf_counter() - started
    if outcome is _TIMEOUT:
        result.status = "unknown"
        done = bisect.bisect_right([op.invoke for op in history], search.clock)
        result.prefix = done
        result.message = (
            f"unknown: gave up after {result.seconds:.1f} s (time_limit) with {done} of {len(history)} "
            f"ops explored and {search.widest} configurations at the widest; neither proven "
            "linearizable nor proven not to be"
        )
    elif outcome is not None:
        entry, when = outcome
        result.status = "failed"
        result.op = entry.op
        result.prefix = bisect.bisect_right([op.invoke for op in history], when)
        result.message = (
            f"not linearizable: at +{(when - history[0].invoke) / 1e6:.3f} ms no order of the "
            f"{result.prefix} ops invoked so far can include {_describe(entry.op)}; until then "
            "they had one"
        )
    else:
        result.message = f"linearizable ({len(history)} ops, {info} info)"
    return result


def shortest_failing_window(ops: Sequence[Op], *, time_limit: float | None = None) -> list[Op]:
    """The shortest run of consecutive operations that is not linearizable on its own.

    The operations are ordered by invoke; a window ``ops[i:j]`` is checked
    from an unknown initial state (from the empty store if it starts with
    the first op), letting operations outside it that overlap it in time
    take effect inside it or not (see the module docstring). A failing
    window thus proves the whole history is not linearizable, and failure
    only grows when a window grows at either end. So the search starts from
    the failing prefix :func:`check_key` finds (it explains the *first*
    failure), gallops and binary-searches the start, binary-searches the
    end, then tries the ends nearby for a shorter window. A window it
    returns also fails alone: ``check_key(window, initial="unknown")``
    (``initial="empty"`` if it starts with the first op). In the rare case
    that only the rule "a cas never matches an unrevealed info write's
    version" proves the failure, no window can show it and the failing
    prefix is returned.

    :param ops: the operations on one key
    :param time_limit: seconds for the first full check (None: no limit)
    :returns: the window, ordered by invoke; empty if the key is linearizable
        (or the full check ran out of time)
    """
    history = sorted(ops, key=_order)
    verdict = check_key(history, time_limit=time_limit)
    if verdict.status != "failed":
        return []
    return _shortest_window(history, verdict.prefix)


def format_ops(ops: Iterable[Op], *, origin: int | None = None, mark: Op | None = None) -> str:
    """A readable table of operations, for failure messages.

    :param ops: the operations (sorted by invoke here)
    :param origin: time zero in nanoseconds (default: the first invoke)
    :param mark: an operation to flag with ``>`` (the one that failed)
    :returns: one line per operation: invoke and complete in ms relative to
        ``origin``, process, function, value, version / expected / existed, result
    """
    rows = sorted(ops, key=_order)
    if not rows:
        return "(no operations)"
    zero = rows[0].invoke if origin is None else origin
    several_keys = len({op.key for op in rows}) > 1
    lines = [
        f"  {'invoke ms':>11} {'complete ms':>11} {'proc':>5}  {'f':<6} {'value':<26} "
        f"{'version':<28} result" + ("  key" if several_keys else "")
    ]
    for op in rows:
        done = "-" if op.complete is None or op.result == "info" else f"{(op.complete - zero) / 1e6:.3f}"
        flag = ">" if mark is not None and op is mark else " "
        line = (
            f"{flag} {(op.invoke - zero) / 1e6:>11.3f} {done:>11} {op.process:>5}  {op.f:<6} "
            f"{_short(op.value):<26} {_version_text(op):<28} {op.result}"
        )
        lines.append(line + (f"  {op.key}" if several_keys else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Helpers


def _shortest_window(history: list[Op], prefix: int) -> list[Op]:
    """The body of :func:`shortest_failing_window`, given the failing prefix of a sorted history."""
    windows = _Windows(history)
    end = prefix
    start = windows.last_failing_start(end, 0)
    if start == 0 and not windows.fails(0, end):
        # An info write that a read after the failure revealed is only a
        # token inside the prefix: look further.
        if not windows.fails(0, len(history)):
            # Only the rule that a cas never matches an unrevealed version
            # proves the failure, and windows do not use it.
            return history[:prefix]
        passing, end = prefix, len(history)
        while end - passing > 1:
            mid = (passing + end) // 2
            if windows.fails(0, mid):
                end = mid
            else:
                passing = mid
        start = windows.last_failing_start(end, 0)
    end = windows.first_failing_end(start, end)
    best = (start, end)
    # Failure is monotone in both ends, the length is not: a shorter window
    # may end a little earlier (starting before ``start``) or later. For each
    # nearby end, one check of the longest window that would beat the best
    # says whether any does.
    last = max(prefix, end)
    later = max(1, start - (end - start))
    probes = 256  # a long first window must not cost thousands of checks
    while later <= last and best[1] - best[0] > 1 and probes:
        first = later - (best[1] - best[0]) + 1
        if first >= 0 and later != best[1] and windows.fails(first, later):
            best = (windows.last_failing_start(later, first), later)
        later += 1
        probes -= 1
    return history[best[0] : best[1]]


def _order(op: Op) -> tuple[int, int, str]:
    return (op.invoke, op.process, op.f)


def _short(value: object) -> str:
    text = "-" if value is None else repr(value)
    return text if len(text) <= 26 else text[:23] + "..."


def _version_text(op: Op) -> str:
    if op.f == "delete":
        return "existed=" + ("?" if op.existed is None else str(op.existed))
    if op.f == "read":
        return "absent" if op.version is None and op.result == "ok" else f"v={op.version}"
    parts = [] if op.f != "cas" else [f"expected={op.expected}"]
    if op.version is not None:
        parts.append(f"v={op.version}")
    return " ".join(parts)


def _describe(op: Op) -> str:
    what = {
        "write": f"write {_short(op.value)} -> v={op.version}",
        "cas": f"cas {_short(op.value)} expected={op.expected} -> {op.result}"
        + (f" v={op.version}" if op.version is not None else ""),
        "read": "read -> absent" if op.version is None else f"read -> {_short(op.value)} v={op.version}",
        "delete": f"delete -> existed={op.existed}",
    }[op.f]
    return f"{what} (process {op.process}, {op.result})"


def _validate(op: Op) -> None:
    """Raise ValueError for an operation the harness should never record."""
    problem = ""
    if op.f not in FUNCTIONS:
        problem = f"f must be one of {FUNCTIONS}"
    elif op.result not in RESULTS:
        problem = f"result must be one of {RESULTS}"
    elif not isinstance(op.invoke, int):
        problem = "invoke must be an int (nanoseconds)"
    elif op.result != "info" and not isinstance(op.complete, int):
        problem = "a completed operation needs an int complete time"
    elif op.result != "info" and op.complete is not None and op.complete < op.invoke:
        problem = "complete is before invoke"
    elif op.result == "fail" and op.f != "cas":
        problem = "only a cas can fail (an error is info)"
    elif op.f == "cas" and not isinstance(op.expected, int):
        problem = "a cas needs an int expected version"
    elif op.f in ("write", "cas") and op.result == "ok" and not isinstance(op.version, int):
        problem = "an ok write or cas needs the int version it produced"
    elif op.f in ("write", "cas") and op.value is None:
        problem = "a write needs a value (None means absent)"
    elif op.f == "read" and op.result == "ok" and (op.value is None) != (op.version is None):
        problem = "a read returns both value and version, or neither (absent)"
    elif op.f == "delete" and op.existed not in (True, False, None):
        problem = "existed must be True, False or None"
    if problem:
        raise ValueError(f"malformed operation ({problem}): {op!r}")


def _revealed(writers: Iterable[Op], readers: Iterable[Op]) -> dict[int, tuple[int, int]]:
    """id(info write or cas) -> (version, earliest completion) of the reads that returned its value."""
    info = {_value_key(op.value): op for op in writers if op.f in ("write", "cas") and op.result == "info"}
    reads = [
        (_order(op), _value_key(op.value), op.version, op.complete)
        for op in readers
        if op.f == "read" and op.result == "ok" and op.version is not None and op.complete is not None
    ]
    found: dict[int, tuple[int, int]] = {}
    for _, vkey, read_version, read_complete in sorted(reads, key=lambda read: read[0]):
        writer = info.get(vkey)
        if writer is not None:
            # the earliest read names the version; the first to complete sets the deadline
            version, complete = found.get(id(writer), (read_version, read_complete))
            found[id(writer)] = (version, min(complete, read_complete))
    return found


def _value_key(value: object) -> object:
    """A hashable stand-in for a value (values are compared by equality)."""
    if isinstance(value, str):
        return value
    return ("json", json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr))


# --------------------------------------------------------------------------
# The search

# Model state: (kind, mandatory versioned ops linearized, floor, current).
# KNOWN's version is always the floor (the write that set it raised the floor
# to its own version); ``current`` names that write: an entry id, or for a
# value pinned from the wildcard ("x", value key, version).
_ABS, _KNOWN, _UNK, _WILD = 0, 1, 2, 3
# Entry kinds; the first four are read-only (pruning 2).
_RVAL, _RABS, _CASF, _DELF, _VERS, _DELT, _DELA = range(7)
_FUTURE, _DONE = -1, -2
_NO_TOKENS = (0, 0, 0)  # spent (write, cas-on-absent, delete) tokens

State = tuple[int, int, int | None, Any]
Tokens = tuple[int, int, int]


class _Timeout(Exception):
    pass


_TIMEOUT: Any = object()


class _Entry:
    """An operation as the search sees it (tokens are not entries)."""

    __slots__ = ("deadline", "expected", "id", "invoke", "kind", "mand", "match", "op", "rank", "slot",
                 "version", "wild")

    def __init__(self, op: Op, kind: int, mand: bool, deadline: int | None) -> None:
        self.op = op
        self.kind = kind
        self.mand = mand  # False: an outside op a window may use (optional)
        self.invoke = op.invoke
        self.deadline = deadline
        self.id = 0
        self.version: int | None = op.version
        self.expected = op.expected
        self.match: Any = None  # _RVAL: the ``current`` it needs; None: impossible
        self.wild = False  # may be linearized from the wildcard state
        self.rank = 0  # _VERS: mandatory versioned ops below its version
        self.slot = _FUTURE


class _Search:
    """One breadth-first just-in-time search over one key's events."""

    def __init__(
        self,
        mandatory: list[Op],
        context: list[Op],
        *,
        wild: bool,
        lookahead: bool = True,
        guessable: frozenset[int] = frozenset(),
    ) -> None:
        # lookahead: prunings 1 and 3 may kill a configuration for the sake
        # of an op not invoked yet. Fast, and exact for the verdict, but the
        # failure then shows at an innocent op; without them (the floor still
        # orders the versions) the search fails exactly at the first event
        # no linearization of the past survives.
        self.lookahead = lookahead
        # Windows only: versions a read somewhere revealed for an info write
        # that this check may not see revealed; a cas may expect one of them
        # from an unrevealed info write's unknown version (see _Windows).
        self.guessable: set[int] | frozenset[int] = guessable
        self.init: State = (_WILD, 0, None, None) if wild else (_ABS, 0, 0, None)
        self.clock = 0
        self.widest = 0
        self.used = 0  # occupied slots
        self.pure_pending = 0  # slots holding a mandatory read-only op
        self.vers_pending = 0  # slots holding a mandatory versioned op
        self.slot_entry: list[_Entry] = []
        self.avail = [0, 0, 0]  # tokens invoked so far: write, cas-on-absent, delete
        self.avail_cas: set[int] = set()  # expected versions of invoked info cas tokens
        self.needers: dict[int, list[_Entry]] = {}
        self.events: list[tuple[int, int, int, Any]] = []
        self._deadline: float | None = None
        self._pops = 0  # closure steps, to look at the clock now and then
        self._build(mandatory, context, wild)

    # -- preparation -------------------------------------------------------

    def _build(self, mandatory: list[Op], context: list[Op], wild: bool) -> None:
        merged = sorted([(op, True) for op in mandatory] + [(op, False) for op in context],
                        key=lambda pair: _order(pair[0]))
        writers: dict[object, Op] = {}
        for op, _ in merged:
            if op.f in ("write", "cas") and op.result in ("ok", "info"):
                vkey = _value_key(op.value)
                if vkey in writers:
                    raise ValueError(f"value {op.value!r} written twice (values must be unique): {op!r}")
                writers[vkey] = op
        revealed = _revealed((op for op, _ in merged), mandatory)
        entries: list[_Entry] = []
        by_op: dict[int, _Entry] = {}
        tokens: list[tuple[int, str, int | None]] = []
        for op, mand in merged:
            f, res = op.f, op.result
            if res == "info":
                if f == "read":
                    continue  # an indeterminate read constrains nothing
                if f == "delete":
                    tokens.append((op.invoke, "d", None))
                    continue
                found = revealed.get(id(op))
                if found is None:
                    token = "w" if f == "write" else ("c0" if op.expected == 0 else "ce")
                    tokens.append((op.invoke, token, op.expected))
                    continue
                # Pruning 5: it took effect, with the version a read saw,
                # before that read completed.
                entry = _Entry(op, _VERS, mand, found[1])
                entry.version = found[0]
                if f == "write":
                    entry.expected = None
            elif f == "read":
                if not mand:
                    continue  # outside read-only ops cannot help a window
                entry = _Entry(op, _RABS if op.version is None else _RVAL, mand, op.complete)
            elif f == "delete":
                kind = _DELA if op.existed is None else (_DELT if op.existed else _DELF)
                if kind == _DELF and not mand:
                    continue
                entry = _Entry(op, kind, mand, op.complete)
            elif res == "fail":
                if not mand:
                    continue
                entry = _Entry(op, _CASF, mand, op.complete)
            else:
                entry = _Entry(op, _VERS, mand, op.complete)
                if f == "write":
                    entry.expected = None
            entry.id = len(entries)
            entries.append(entry)
            by_op[id(op)] = entry
        # Pruning 1: ranks in version order (ties sorted, so a duplicate fails).
        versioned = sorted((e for e in entries if e.kind == _VERS), key=lambda e: (e.version, e.invoke))
        mandatory_versions = {e.version for e in versioned if e.mand}
        if self.guessable:
            self.guessable = self.guessable - {e.version for e in versioned}
        below = 0
        group_start = 0
        for position, e in enumerate(versioned):
            if position and e.version != versioned[position - 1].version:
                group_start = below
            if e.mand:
                e.rank = below
                below += 1
            else:
                e.rank = group_start
            if e.expected:
                e.wild = wild and e.expected not in mandatory_versions
                if e.mand:
                    self.needers.setdefault(e.expected, []).append(e)
        for e in entries:
            if e.kind != _RVAL:
                continue
            writer = writers.get(_value_key(e.op.value))
            target = None if writer is None else by_op.get(id(writer))
            if target is not None and target.kind == _VERS and target.version == e.version:
                e.match = target.id
                e.wild = wild and not target.mand
            elif wild and (target is None or not target.mand):
                # Written before the known history (or by an outside op that
                # disagrees): only the wildcard can explain it. Outside ops
                # only ever add possibilities, so that a window failing with
                # them also fails alone.
                e.match = ("x", _value_key(e.op.value), e.version)
                e.wild = True
            if e.match is not None and e.version is not None:
                self.needers.setdefault(e.version, []).append(e)
        seq = 0
        for e in entries:
            self.events.append((e.invoke, 0, seq, e))
            if e.deadline is not None:
                self.events.append((e.deadline, 1, seq, e))
            seq += 1
        for spent in tokens:
            self.events.append((spent[0], 0, seq, spent))
            seq += 1
        self.events.sort(key=lambda event: (event[0], event[1], event[2]))

    # -- the walk ----------------------------------------------------------

    def run(self, deadline: float | None) -> Any:
        """None if linearizable, (entry, time) at the first failure, or _TIMEOUT."""
        frontier: dict[tuple[int, State], list[Tokens]] = {(0, self.init): [_NO_TOKENS]}
        self._deadline = deadline
        try:
            for number, (when, order, _, x) in enumerate(self.events):
                self.clock = when
                if deadline is not None and not number & 255 and time.perf_counter() > deadline:
                    return _TIMEOUT
                if order == 0:
                    if isinstance(x, tuple):
                        self._token_invoked(x)
                    elif x.slot == _FUTURE:
                        frontier = self._invoked(x, frontier)
                        if not frontier:
                            return (x, when)
                    continue
                if x.slot == _FUTURE:
                    # Revealed by a read that completed before it was invoked.
                    if x.mand:
                        return (x, when)
                    x.slot = _DONE  # an outside op: it just cannot be used
                    continue
                frontier = self._completed(x, frontier)
                if not frontier:
                    return (x, when)
                self.widest = max(self.widest, len(frontier))
        except _Timeout:
            return _TIMEOUT
        return None

    def _token_invoked(self, token: tuple[int, str, int | None]) -> None:
        kind = token[1]
        if kind == "w":
            self.avail[0] += 1
        elif kind == "c0":
            self.avail[1] += 1
        elif kind == "d":
            self.avail[2] += 1
        elif token[2] is not None:
            self.avail_cas.add(token[2])

    def _invoked(
        self, e: _Entry, frontier: dict[tuple[int, State], list[Tokens]]
    ) -> dict[tuple[int, State], list[Tokens]]:
        low = ~self.used & (self.used + 1)
        e.slot = low.bit_length() - 1
        self.used |= low
        if e.slot == len(self.slot_entry):
            self.slot_entry.append(e)
        else:
            self.slot_entry[e.slot] = e
        if e.kind == _VERS and e.mand:
            self.vers_pending |= low
            version = e.version
            if not self.lookahead and version is not None:
                # A configuration whose floor passed its version can never
                # linearize it (pruning 1 without look-ahead).
                frontier = {
                    key: toks for key, toks in frontier.items() if key[1][2] is None or key[1][2] < version
                }
        if e.kind > _DELF or not e.mand:
            return frontier
        self.pure_pending |= low
        # Pruning 2: linearize it now wherever it is legal.
        new: dict[tuple[int, State], list[Tokens]] = {}
        for (m, s), toks in frontier.items():
            if s[0] != _WILD and self._pure_ok(e, s):
                m |= low
            new[(m, s)] = toks
        return new

    def _completed(
        self, e: _Entry, frontier: dict[tuple[int, State], list[Tokens]]
    ) -> dict[tuple[int, State], list[Tokens]]:
        bit = 1 << e.slot
        found: list[tuple[int, State, Tokens]] = []
        seen: set[tuple[int, State, Tokens]] = set()
        for (m, s), toks in frontier.items():
            if m & bit:
                found.extend((m, s, tk) for tk in toks)
                continue
            if not e.mand:
                found.extend((m, s, tk) for tk in toks)  # it took effect before the window, or never
            for tk in toks:
                self._closure(m, s, tk, bit, found, seen)
        e.slot = _DONE
        self.used &= ~bit
        self.pure_pending &= ~bit
        self.vers_pending &= ~bit
        new: dict[tuple[int, State], list[Tokens]] = {}
        for m, s, tk in found:
            key = (m & ~bit, s)
            kept = new.get(key)
            if kept is None:
                new[key] = [tk]
            elif tk not in kept:
                # Pruning 6: keep only token vectors nobody dominates.
                if any(a[0] <= tk[0] and a[1] <= tk[1] and a[2] <= tk[2] for a in kept):
                    continue
                kept[:] = [a for a in kept if not (tk[0] <= a[0] and tk[1] <= a[1] and tk[2] <= a[2])]
                kept.append(tk)
        return new

    def _closure(
        self,
        m0: int,
        s0: State,
        tk0: Tokens,
        target: int,
        found: list[tuple[int, State, Tokens]],
        seen: set[tuple[int, State, Tokens]],
    ) -> None:
        """Linearize running ops in every order until ``target`` is in."""
        stack = [(m0, s0, tk0)]
        entries = self.slot_entry
        while stack:
            m, s, tk = stack.pop()
            self._pops += 1
            if not self._pops & 4095 and self._deadline is not None and time.perf_counter() > self._deadline:
                raise _Timeout
            free = self.used & ~m
            while free:
                low = free & -free
                free ^= low
                for s2, tk2 in self._steps(entries[low.bit_length() - 1], s, tk, m):
                    m2 = m | low
                    if s2 is not s:
                        m2 = self._greedy(m2, s2)
                    key = (m2, s2, tk2)
                    if key in seen:
                        continue
                    seen.add(key)
                    if m2 & target:
                        found.append(key)
                    else:
                        stack.append(key)

    # -- the model ---------------------------------------------------------

    @staticmethod
    def _pure_ok(e: _Entry, s: State) -> bool:
        """A read-only op is legal in ``s`` (not the wildcard) and leaves it as is."""
        kind = e.kind
        if kind == _RVAL:
            return s[0] == _KNOWN and s[3] == e.match
        if kind == _CASF:
            x = e.expected
            return not ((x == 0 and s[0] == _ABS) or (x != 0 and s[0] == _KNOWN and s[2] == x))
        return s[0] == _ABS

    def _greedy(self, m: int, s: State) -> int:
        if s[0] == _WILD:
            return m
        cand = self.pure_pending & ~m
        entries = self.slot_entry
        pure_ok = self._pure_ok
        while cand:
            low = cand & -cand
            cand ^= low
            if pure_ok(entries[low.bit_length() - 1], s):
                m |= low
        return m

    def _lower_pending(self, e: _Entry, m: int) -> bool:
        """An invoked mandatory op of a lower version is not linearized yet."""
        waiting = self.vers_pending & ~m
        entries = self.slot_entry
        while waiting:
            low = waiting & -waiting
            waiting ^= low
            if entries[low.bit_length() - 1].rank < e.rank:
                return True
        return False

    def _leave_ok(self, version: int | None, m: int, exclude: _Entry | None) -> bool:
        """Pruning 3: the state may leave ``version`` for good."""
        for n in self.needers.get(version, ()) if version is not None else ():
            if n is exclude or n.slot == _DONE:
                continue
            if n.slot == _FUTURE:
                if self.lookahead:
                    return False
            elif not (m >> n.slot) & 1:
                return False
        return True

    def _to_absent(self, s: State, tk: Tokens, m: int, exclude: _Entry | None) -> tuple[State, Tokens] | None:
        """Spend an info delete (pruning 4)."""
        if tk[2] >= self.avail[2]:
            return None
        if s[0] == _KNOWN and not self._leave_ok(s[2], m, exclude):
            return None
        return (_ABS, s[1], s[2], None), (tk[0], tk[1], tk[2] + 1)

    def _to_unknown(self, s: State, tk: Tokens, m: int) -> list[tuple[State, Tokens]]:
        """Spend info write/cas tokens to make the key present-UNKNOWN (pruning 4)."""
        w, c0, d = tk
        unknown = (_UNK, s[1], s[2], None)
        if s[0] == _ABS:
            if c0 < self.avail[1]:
                return [(unknown, (w, c0 + 1, d))]
            if w < self.avail[0]:
                return [(unknown, (w + 1, c0, d))]
            return []
        if not self._leave_ok(s[2], m, None):
            return []
        if s[2] in self.avail_cas:
            return [(unknown, tk)]
        out = []
        if w < self.avail[0]:
            out.append((unknown, (w + 1, c0, d)))
        if d < self.avail[2] and c0 < self.avail[1]:
            out.append((unknown, (w, c0 + 1, d + 1)))
        return out

    def _steps(self, e: _Entry, s: State, tk: Tokens, m: int) -> Sequence[tuple[State, Tokens]]:
        """Every (state, tokens) after linearizing ``e`` next, rescued by tokens if needed."""
        k, idx, floor, _ = s
        kind = e.kind
        if kind == _VERS:
            version = e.version
            assert version is not None
            if floor is not None and version <= floor:
                return ()
            if idx != e.rank and (self.lookahead or self._lower_pending(e, m)):
                return ()
            after: State = (_KNOWN, idx + 1 if e.mand else idx, version, e.id)
            expected = e.expected
            if expected is None or (expected == 0 and k == _WILD):
                if k == _KNOWN and not self._leave_ok(floor, m, e):
                    return ()
                return ((after, tk),)
            if expected == 0:
                if k == _ABS:
                    return ((after, tk),)
                rescued = self._to_absent(s, tk, m, e)
                return () if rescued is None else ((after, rescued[1]),)
            if k == _KNOWN and floor == expected:
                return ((after, tk),) if self._leave_ok(floor, m, e) else ()
            if k == _WILD:
                return ((after, tk),) if e.wild and version > expected else ()
            if expected not in self.guessable or version <= expected:
                return ()
            # Window only: the unknown version of an info write was ``expected``.
            if k == _UNK:
                return ((after, tk),) if floor is None or expected > floor else ()
            return tuple(
                (after, tk2) for u, tk2 in self._to_unknown(s, tk, m) if u[2] is None or expected > u[2]
            )
        if kind == _RVAL:
            if k == _KNOWN:
                return ((s, tk),) if s[3] == e.match else ()
            if k == _WILD and e.wild:
                return (((_KNOWN, idx, e.version, e.match), tk),)
            return ()
        if kind == _RABS or kind == _DELF:
            if k == _ABS:
                return ((s, tk),)
            if k == _WILD:
                return (((_ABS, idx, floor, None), tk),)
            rescued = self._to_absent(s, tk, m, None)
            return () if rescued is None else (rescued,)
        if kind == _CASF:
            expected = e.expected
            if k == _WILD or k == _UNK:
                return ((s, tk),)
            if expected == 0:
                return ((s, tk),) if k != _ABS else self._to_unknown(s, tk, m)
            if k != _KNOWN or floor != expected:
                return ((s, tk),)
            out = self._to_unknown(s, tk, m)
            rescued = self._to_absent(s, tk, m, None)
            if rescued is not None:
                out.append(rescued)
            return out
        absent: State = (_ABS, idx, floor, None)
        if kind == _DELT:
            if k == _ABS:
                return [(absent, tk2) for _, tk2 in self._to_unknown(s, tk, m)]
        elif k == _ABS:  # _DELA on an absent key changes nothing
            return ((s, tk),)
        if k == _KNOWN and not self._leave_ok(floor, m, None):
            return ()
        return ((absent, tk),)


class _Windows:
    """Checks windows ``ops[i:j]`` of one key's sorted history, with their context."""

    def __init__(self, history: list[Op]) -> None:
        self.ops = history
        self.invokes = [op.invoke for op in history]
        self.infos = [n for n, op in enumerate(history) if op.result == "info"]
        # running maximum of completion times, to stop the backward scan early
        self.reach: list[int] = []
        top = -1
        for op in history:
            if op.result != "info" and op.complete is not None:
                top = max(top, op.complete)
            self.reach.append(top)
        self.cache: dict[tuple[int, int], bool] = {}
        # A read outside a window may reveal the version of an info write
        # inside it, which a cas inside expects. Alone, the window would see
        # an unrevealed info write and a cas expecting a version nobody
        # wrote, and fail; with the reveal it may pass. So failure would not
        # be monotone. Letting an unrevealed info write match such a cas
        # makes it a superset of the revealed one, and keeps the witness
        # sound (the versions are what reads saw).
        self.guessable = frozenset(version for version, _ in _revealed(history, history).values())

    def fails(self, i: int, j: int) -> bool:
        """Whether ``ops[i:j]`` is not linearizable, whatever happened around it."""
        if j - i <= 0:
            return False
        cached = self.cache.get((i, j))
        if cached is not None:
            return cached
        ops = self.ops
        window = ops[i:j]
        context: list[Op] = []
        if i > 0:
            start = ops[i].invoke
            # Ops before the window still running when it starts: info ops
            # forever, the others until they complete.
            context.extend(ops[n] for n in self.infos if n < i)
            n = i - 1
            while n >= 0 and self.reach[n] >= start:
                op = ops[n]
                if op.result != "info" and op.complete is not None and op.complete >= start:
                    context.append(op)
                n -= 1
        # Ops after the window invoked before its last op completed.
        horizon = max((op.complete for op in window if op.result != "info" and op.complete is not None),
                      default=None)
        if horizon is not None:
            context.extend(ops[j : bisect.bisect_right(self.invokes, horizon, lo=j)])
        outcome = _Search(window, context, wild=i > 0, guessable=self.guessable).run(None)
        self.cache[(i, j)] = failed = outcome is not None
        return failed

    def last_failing_start(self, j: int, known: int) -> int:
        """The greatest i with ``ops[i:j]`` failing, given that ``ops[known:j]`` fails."""
        failing, passing = known, j
        step = 4
        while j - step > failing:  # gallop back from the end: the culprit is usually near it
            if self.fails(j - step, j):
                failing = j - step
                break
            passing = j - step
            step *= 2
        while passing - failing > 1:
            mid = (failing + passing) // 2
            if self.fails(mid, j):
                failing = mid
            else:
                passing = mid
        return failing

    def first_failing_end(self, i: int, j: int) -> int:
        """The least end with ``ops[i:end]`` failing, given that ``ops[i:j]`` fails."""
        passing, failing = i, j
        while failing - passing > 1:
            mid = (passing + failing) // 2
            if self.fails(i, mid):
                failing = mid
            else:
                passing = mid
        return failing
