"""The ``tiered-state`` command: inspect, operate, upgrade and demo a store.

Global options (before the command) name the store exactly as
:func:`tiered_state.open` does: ``--hot/--warm/--cold`` URLs (or ``none``)
and ``--path`` for the embedded tiers, each falling back to its
``TIERED_STATE_*`` environment variable. Results go to stdout; progress,
warnings and errors go to stderr, one line each, errors as
``tiered-state: error: MESSAGE``. ``--json`` (after the command) prints a
command's result as one JSON document on one line instead (``keys``: JSON
Lines, one JSON string per key); a command that fails with an error line
prints nothing on stdout.

Exit status: 0 success, 1 an absent key or an operational failure (a server
unreachable, a version conflict, a record that failed its checksum, nothing
moved), 2 a usage or configuration error (bad option, bad JSON, bad URL,
missing driver, a store that needs ``tiered-state upgrade``), 130
interrupted. A reader that goes away (``tiered-state keys | head``) is not an
error: exit 0, nothing more printed. No traceback unless ``--debug``. Every
line printed passes through :func:`tiered_state.config.redact`, so a password
in a URL never reaches the terminal.

The command is a client of the public API and nothing else:
:func:`tiered_state.open`, :func:`tiered_state.probe`,
:func:`tiered_state.upgrade` and the methods of
:class:`~tiered_state.StateManager`. ``keys`` and ``export`` stream the
catalog (``iter_keys`` / ``iter_records``); ``import`` hands the records of an
export to ``restore`` in chunks of :data:`CHUNK` lines, so versions,
timestamps and TTLs are kept and memory stays flat however many records
there are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any

from . import (
    BackendUnavailableError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    InvalidKeyError,
    MissingDependencyError,
    Record,
    RestoreReport,
    SerializationError,
    StateManager,
    SweepReport,
    Tier,
    TieredStateError,
    TieringPolicy,
    __version__,
    codec,
    probe,
)
from . import open as open_store
from . import upgrade as upgrade_store
from .codec import JSON, Codec
from .config import ENV_COLD, ENV_HOT, ENV_PATH, ENV_WARM, environ, redact
from .inspection import CopyInfo

__all__ = ["main"]

log = logging.getLogger(__name__)

PROG = "tiered-state"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Lines (import) and records (keys, export) handled per step: bounds memory
#: and sets how often progress is drawn. One import chunk is one ``restore``
#: call, so a bad line is kept out of a batch, not the batch out of the store.
CHUNK = 500
#: Fields of an export line, in the order they are written.
EXPORT_FIELDS = ("key", "value", "version", "checksum", "created_at", "updated_at",
                 "expires_at", "tier")
_ORDER = (Tier.HOT, Tier.WARM, Tier.COLD)
_ENV = {Tier.HOT: ENV_HOT, Tier.WARM: ENV_WARM, Tier.COLD: ENV_COLD}
_DRIVERS = (("redis", "redis"), ("psycopg2", "postgres"), ("boto3", "s3"), ("statsd", "statsd"))


class CommandError(Exception):
    """A failure the command reports as one line, with its exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- output
def _line(text: str) -> str:
    """One redacted line: a message never spans lines nor shows a password."""
    return redact(" ".join(str(text).split()))


def emit(text: str, stream: IO[str] | None = None) -> None:
    """Print a redacted line to stdout (or ``stream``)."""
    print(redact(text), file=stream or sys.stdout)


def emit_json(document: Any) -> None:
    """Print ``document`` as one JSON document on one line (redacted like every line)."""
    emit(json.dumps(document, ensure_ascii=False, sort_keys=True, default=str))


def error_line(message: str) -> None:
    """The one form of an error on stderr: ``tiered-state: error: MESSAGE``."""
    print(_line(f"{PROG}: error: {message}"), file=sys.stderr)


class _RedactingFormatter(logging.Formatter):
    """``tiered-state: LEVEL: message`` in lower case, so a logged error reads
    like every other error line (``tiered-state: error: ...``)."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(name)s: %(message)s" if debug else "%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        level = "error" if record.levelno >= logging.ERROR else record.levelname.lower()
        return _line(f"{PROG}: {level}: {super().format(record)}")


def _setup_logging(debug: bool, quiet: bool) -> Callable[[], None]:
    """Send the library's log lines to stderr, one redacted line each.

    :returns: a function undoing it, so that ``main`` called in-process (tests,
        an embedding tool) leaves no handler or level behind.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(debug))
    root = logging.getLogger("tiered_state")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(level)

    return undo


class Progress:
    """A single updating line on stderr: count, rate and (when the size is known) ETA.

    Silent unless stderr is a terminal and ``--quiet`` is off, so logs and
    pipes never fill with carriage returns.
    """

    INTERVAL = 0.1

    def __init__(self, label: str, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.started = time.monotonic()
        self._shown = 0.0
        self._drawn = False

    def update(self, count: int, *, fraction: float | None = None, detail: str = "",
               force: bool = False) -> None:
        """Redraw with ``count`` done; ``fraction`` (0..1) of the job done gives the ETA."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._shown < self.INTERVAL:
            return
        self._shown = now
        elapsed = max(now - self.started, 1e-9)
        parts = [f"{self.label}: {count:,}", f"{count / elapsed:,.0f}/s"]
        if fraction is not None and 0 < fraction < 1:
            parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
        if detail:
            parts.append(detail)
        self.stream.write("\r" + " | ".join(parts) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the line, leaving the terminal as it was."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- the store
def _tier_url(args: argparse.Namespace, tier: Tier) -> str | None:
    """The URL ``tiered_state.open`` will use for ``tier`` (None: switched off).

    Only shown (by ``doctor``): the user knows a tier by the URL they gave,
    while :func:`tiered_state.probe` reports the repository's ``repr``.
    """
    given = getattr(args, tier.value)
    value = given if given is not None else environ(_ENV[tier])
    if value is None:
        root = Path(args.path if args.path is not None else environ(ENV_PATH, ".tiered_state")
                    or ".tiered_state").resolve()
        return {
            Tier.HOT: "memory://",
            Tier.WARM: f"sqlite:///{root / 'warm.db'}",
            Tier.COLD: (root / "cold").as_uri(),
        }[tier]
    if value.strip().lower() in ("none", "off", ""):
        return None
    return value


def _open(args: argparse.Namespace, policy: TieringPolicy | None = None) -> StateManager:
    return open_store(args.path, hot=args.hot, warm=args.warm, cold=args.cold, policy=policy,
                      codec=getattr(args, "codec", None))


def _chunks(items: Iterable[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    """Lists of at most ``size`` items, one held at a time."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# ---------------------------------------------------------------- commands
def cmd_get(args: argparse.Namespace) -> int:
    if args.json:
        # The record as an export line: value, version, times, the tier it was read from.
        with _open(args) as state:
            record = state.get_record(args.key)
            if record is None:
                raise CommandError(f"key {args.key!r} not found")
            emit(_export_line(record, state.codec).rstrip("\n"))
        return EXIT_OK
    with _open(args) as state:
        value = state.get(args.key, _ABSENT)
        if value is _ABSENT:
            raise CommandError(f"key {args.key!r} not found")
        emit(state.codec.encode(value))
    return EXIT_OK


_ABSENT: Any = object()


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CommandError(f"invalid JSON value: {exc} (quote strings: '\"text\"')",
                           EXIT_USAGE) from None


def cmd_set(args: argparse.Namespace) -> int:
    value = _parse_json(args.value)
    with _open(args) as state:
        version = state.set(args.key, value, tier=args.tier, ttl=args.ttl,
                            if_version=args.if_version)
    if args.json:
        emit_json({"key": args.key, "version": version})
    else:
        emit(str(version))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args) as state:
        deleted = state.delete_many(args.keys)
    if args.json:
        emit_json({"deleted": deleted})
    else:
        emit(str(deleted))
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    write = sys.stdout.write
    # --json: JSON Lines (one JSON string per key), not an array, so the
    # listing streams and `| head` still cuts it at a line.
    form: Callable[[str], str] = _json if args.json else str
    with _open(args) as state:
        # Streamed from the catalog as it lists them: nothing is sorted or held here.
        for key in state.iter_keys(args.pattern):
            write(form(key) + "\n")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args) as state:
        stats = state.stats()
    if args.json:
        emit_json(stats)
        return EXIT_OK
    blocks = []
    for tier, data in stats["tiers"].items():
        rows = [(k, v) for k, v in data.items() if k not in ("backend", "tier") and v is not None]
        width = max((len(k) for k, _ in rows), default=0)
        lines = [f"{tier} ({data.get('backend', '?')})"]
        lines += [f"  {k.ljust(width)}  {_cell(v)}" for k, v in rows]
        blocks.append("\n".join(lines))
    down = stats["manager"].get("down")
    if down:
        blocks.append("unreachable: " + ", ".join(down))
    emit("\n\n".join(blocks))
    return EXIT_OK


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value) if not isinstance(value, (dict, list)) else _json(value)
    if isinstance(value, float):
        return f"{value:,.3f}"
    return f"{value:,}"


def _policy(args: argparse.Namespace) -> TieringPolicy:
    return TieringPolicy(cold_after=args.cold_after, purge_after=args.purge_after)


def _seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0: {text!r}")
    return value


def _seconds_or_none(text: str) -> float | None:
    if text.strip().lower() in ("none", "never"):
        return None
    return _seconds_or_zero(text)


def cmd_sweep(args: argparse.Namespace) -> int:
    progress = Progress("sweep", enabled=not args.quiet)

    def show(report: SweepReport) -> None:
        progress.update(report.scanned, detail=f"moved {report.moved:,} purged {report.purged:,}")

    with _open(args, _policy(args)) as state:
        try:
            if args.dry_run:
                report = state.sweep(progress=show, dry_run=True)
            else:
                report = state.sweep(progress=show)
        finally:
            progress.close()
    if args.json:
        document = {"dry_run": args.dry_run, **report.as_dict()}
        if args.dry_run:
            # A dry run neither looks for garbage, nor packs, nor gives space back.
            for name in ("collected", "packed", "compacted", "segments_deleted", "reclaimed_bytes"):
                document[name] = None
        emit_json(document)
    else:
        emit(_sweep_summary(report, args.dry_run))
    for key, error in list(report.errors.items())[:10]:
        log.error("%r: %s", key, error)
    return EXIT_FAILED if report.failed else EXIT_OK


def _sweep_summary(report: SweepReport, dry_run: bool) -> str:
    if dry_run:  # a dry run does not look for garbage, so it has no "collected"
        return (f"dry run: scanned {report.scanned:,}, would move {report.moved:,} to cold, "
                f"would purge {report.purged:,} expired, skipped {report.skipped:,}, "
                f"failed {report.failed:,} in {report.seconds:.2f}s")
    return (f"scanned {report.scanned:,}, moved {report.moved:,} to cold, purged "
            f"{report.purged:,} expired, collected {report.collected:,} unreferenced payloads, "
            f"skipped {report.skipped:,}, failed {report.failed:,}"
            + (f", packed {report.packed:,}, compacted {report.compacted:,} and deleted "
               f"{report.segments_deleted:,} segments"
               if report.packed or report.compacted or report.segments_deleted else "")
            + (f", gave back {report.reclaimed_bytes / 1e6:,.1f} MB" if report.reclaimed_bytes else "")
            + f" in {report.seconds:.2f}s")


def cmd_promote(args: argparse.Namespace) -> int:
    with _open(args) as state:
        if state.promote(args.key, to=args.to):
            if args.json:
                emit_json({"key": args.key, "to": args.to, "promoted": True})
            else:
                emit(f"promoted {args.key!r} to {args.to}")
            return EXIT_OK
        if state.get_record(args.key, promote=False) is None:
            raise CommandError(f"key {args.key!r} not found")
    raise CommandError(f"{args.key!r} was not copied to {args.to}: it changed meanwhile "
                       "or the tier is unreachable")


def _value_tier(copies: list[CopyInfo]) -> Tier | None:
    """The tier holding the value a read would serve (a catalog value or the
    payload its stub points at); None when the key is absent."""
    for copy in copies:
        if copy.current and copy.role in ("value", "payload"):
            return Tier.parse(copy.tier)
    return None


def cmd_demote(args: argparse.Namespace) -> int:
    target = Tier.parse(args.to)
    with _open(args) as state:
        moved = state.demote(args.key, to=target)
        # Nothing moved: say why, from where the value is now (inspect never
        # promotes nor counts as a read).
        where = target if moved else _value_tier(state.inspect(args.key))
    if where is None:
        raise CommandError(f"nothing moved: key {args.key!r} not found")
    if _ORDER.index(where) < _ORDER.index(target):
        raise CommandError(f"nothing moved: {args.key!r} was written while it was being moved "
                           f"to {args.to}; run the command again")
    if args.json:
        emit_json({"key": args.key, "to": args.to, "moved": moved, "tier": where.value})
    elif moved:
        emit(f"moved {args.key!r} to {args.to}")
    else:
        emit(f"nothing moved: {args.key!r} is in {where} already, with no copy above it")
    return EXIT_OK


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open(args) as state:
        copies = state.inspect(args.key)
    if not copies:
        raise CommandError(f"key {args.key!r} not found in any tier")
    if args.json:
        emit_json({"key": args.key, "copies": [copy.as_dict() for copy in copies]})
        return EXIT_OK
    rows = [("tier", "role", "version", "current", "checksum", "size", "encoding", "expires",
             "location")]
    for c in copies:
        check = "-" if c.checksum_ok is None else "ok" if c.checksum_ok else "FAILED"
        rows.append((c.tier, c.role, str(c.version), "yes" if c.current else "no", check,
                     f"{c.size_bytes:,}", c.encoding or "-", _when(c.expires_at), c.location))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for cells in rows:
        emit("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1])
    return EXIT_OK


# ---------------------------------------------------------------- doctor
_NO_CREDENTIALS = ("no aws credentials", "unable to locate credentials", "nocredentialserror")


def _no_credentials(exc: BaseException | str | None) -> bool:
    """Whether ``exc`` says boto3 found no AWS credentials (the s3 repository
    raises ConfigurationError from botocore's NoCredentialsError)."""
    texts = [str(exc).lower()]
    if isinstance(exc, BaseException):
        texts += [type(e).__name__.lower() for e in (exc, exc.__cause__) if e is not None]
    return any(needle in text for text in texts for needle in _NO_CREDENTIALS)


def _hint(tier: Tier, exc: BaseException | str | None) -> str:
    """How to fix what ``exc`` (an exception, or its text) says is wrong with ``tier``."""
    option = f"--{tier.value} / {_ENV[tier]}"
    text = str(exc).lower()
    if isinstance(exc, MissingDependencyError):
        return f"install the driver: pip install 'tiered-state[{exc.extra}]'"
    if isinstance(exc, ImportError):
        return "this install lacks the backend module: reinstall tiered-state"
    if _no_credentials(exc):
        # Checked before ConfigurationError: the URL is fine, the environment is not.
        return ("give boto3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                f"AWS_PROFILE, ~/.aws/credentials, an instance role), or ?profile=NAME in the "
                f"URL ({option})")
    if isinstance(exc, ConfigurationError):
        if "bucket" in text:
            return ("create the bucket (aws s3 mb s3://BUCKET) or add ?create_bucket=true "
                    "to the URL")
        return f"fix the URL ({option}); `none` switches the tier off"
    if isinstance(exc, BackendUnavailableError) or any(
            w in text for w in ("unreachable", "cannot reach", "timed out", "timeout")):
        return f"start the server or fix host/port in the URL ({option})"
    if "bucket" in text:
        return "create the bucket (aws s3 mb s3://BUCKET) or add ?create_bucket=true to the URL"
    if any(w in text for w in ("relation", "table", "schema")):
        return "the table is missing and could not be created: GRANT CREATE on the schema"
    if any(w in text for w in ("password", "authentication", "denied", "permission",
                               "forbidden", "credentials", "noauth")):
        return f"check the credentials and permissions in the URL ({option})"
    return "see the message; --debug shows the full error"


def _store_hint(exc: BaseException) -> str:
    """How to fix a store whose tiers all answer but which does not open."""
    text = str(exc)
    if "tiered-state upgrade" in text:
        return (f"run `{PROG} upgrade` once with the same --path/--hot/--warm/--cold "
                "(stop the applications using the store first; safe to interrupt and run again)")
    if "newer tiered-state" in text:
        return "install the tiered-state that wrote it: pip install -U tiered-state"
    return "see the message; --debug shows the full error"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _error_text(exc: BaseException | str | None) -> str | None:
    if exc is None or isinstance(exc, str):
        return exc
    return _line(f"{type(exc).__name__}: {exc}")


def _health(state: StateManager) -> dict[str, dict[str, Any]]:
    """``state.health()``: ``{tier: {backend, ok, latency_ms, error}}``, the error as text."""
    return {str(Tier.parse(tier)): {**row, "error": _error_text(row.get("error"))}
            for tier, row in state.health().items()}


def _doctor(args: argparse.Namespace) -> dict[str, Any]:
    """What ``doctor`` found, as the JSON document ``doctor --json`` prints.

    Each tier is first reached on its own (:func:`tiered_state.probe`), so a
    missing driver or a store in an older format is diagnosed tier by tier;
    when all answer, the store is opened and asked for its ``health()``.
    """
    document: dict[str, Any] = {
        "version": __version__,
        "python": sys.version.split()[0],
        "drivers": {extra: find_spec(module) is not None for module, extra in _DRIVERS},
        "tiers": {},
        "store": None,
        "ok": False,
    }
    found = probe(args.path, hot=args.hot, warm=args.warm, cold=args.cold)
    for tier in _ORDER:
        row = found[tier]
        exc = row["error"]
        problem = row["status"] not in ("ok", "off")
        document["tiers"][tier.value] = {
            "status": row["status"],
            "backend": row["backend"],
            "url": None if row["status"] == "off" else redact(_tier_url(args, tier)
                                                              or row["url"] or ""),
            "connect_ms": row["connect_ms"],
            "latency_ms": row["latency_ms"],
            "error": (_error_text(exc) or row["status"]) if problem else None,
            "hint": _hint(tier, exc) if problem else None,
        }
    if any(t["error"] for t in document["tiers"].values()):
        return document
    store: dict[str, Any] = {"ok": False, "catalog": None, "error": None, "hint": None,
                             "health": None, "warnings": []}
    document["store"] = store
    try:
        with _open(args) as state:
            catalog, health = state.catalog_tier.value, _health(state)
            if all(row["ok"] for row in health.values()):
                store["warnings"] = _cost_warnings(state)
    except (TieredStateError, OSError) as exc:
        log.debug("doctor: the store does not open", exc_info=True)
        store.update(error=_error_text(exc), hint=_store_hint(exc))
        return document
    store.update(catalog=catalog, health=health)
    for name, row in health.items():
        if not row["ok"]:
            tier = Tier.parse(name)
            store.update(error=f"{name}: {row['error']}", hint=_hint(tier, row["error"]))
            return document
    store["ok"] = document["ok"] = True
    return document


def _cost_warnings(state: StateManager) -> list[str]:
    """A line per tier whose dead fraction is above the sweep's compaction threshold."""
    threshold = TieringPolicy().compact_below
    warnings = []
    for name, found in state.stats()["tiers"].items():
        dead = (found.get("cost") or {}).get("dead_fraction")
        if dead is not None and dead > threshold:
            warnings.append(f"{name}: {dead:.0%} of its bytes are dead (more than "
                            f"{threshold:.0%}); a `{PROG} sweep` gives them back")
    return warnings


def cmd_doctor(args: argparse.Namespace) -> int:
    document = _doctor(args)
    tiers, store = document["tiers"], document["store"]
    failed = [name for name, row in tiers.items() if row["error"]]
    if args.json:
        emit_json(document)
    else:
        emit(f"tiered-state {document['version']}, Python {document['python']}")
        missing = [extra for extra, ok in document["drivers"].items() if not ok]
        drivers = " ".join(f"{extra}={'yes' if ok else 'no'}"
                           for extra, ok in document["drivers"].items())
        hint = (f"  (server backends: pip install 'tiered-state[{','.join(missing)}]')"
                if missing else "")
        emit(f"drivers: {drivers}{hint}")
        rows = [("tier", "status", "connect", "latency", "url")]
        rows += [(name, row["status"], _ms(row["connect_ms"]), _ms(row["latency_ms"]),
                  row["url"] or "-") if row["status"] != "off" else (name, "off", "-", "-", "-")
                 for name, row in tiers.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for cells in rows:
            emit("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[4])
            row = tiers.get(cells[0])
            if row is not None and row["error"]:
                emit(f"      {row['error']}")
                emit(f"      fix: {row['hint']}")
        if store is not None and store["ok"]:
            backend = tiers[store["catalog"]]["backend"]
            emit(f"store: ok, catalog in {store['catalog']} ({backend}), format current")
            for name, row in store["health"].items():
                if row.get("primaries"):
                    emit(f"{name}: {row['topology']}, primaries {', '.join(row['primaries'])}")
            for warning in store["warnings"]:
                emit(f"warning: {warning}")
        elif store is not None:
            emit("store: does not open" if store["catalog"] is None
                 else "store: opens, but a tier fails its health check")
            emit(f"      {store['error']}")
            emit(f"      fix: {store['hint']}")
    if failed:
        error_line(f"{len(failed)} configured tier(s) not usable: {', '.join(failed)}")
        return EXIT_FAILED
    if store is not None and not store["ok"]:
        error_line("the store does not open" if store["catalog"] is None
                   else "the store fails its health check")
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------- export / import
_json_string = json.JSONEncoder(ensure_ascii=False).encode


def _json_time(value: float | None) -> str:
    # repr of a finite float is valid JSON and round-trips exactly.
    return "null" if value is None else repr(float(value))


def _sha256(text: str) -> str:
    """The checksum of an export line's value: hex SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _export_line(record: Record, value_codec: Codec = JSON) -> str:
    """One JSON Lines record; ``value`` is the store codec's text of the value
    (JSON, also for a typed codec's tagged values) embedded raw.

    Built by hand because json.dumps per field dominated the export. The
    canonical text is what ``checksum`` covers and what import re-encodes,
    so a line is its own proof of integrity.
    """
    value = value_codec.encode(record.value)
    digest = record.checksum
    if _sha256(value) != digest:
        # The store's checksum covers its stored text; a line must carry the
        # checksum of the text it holds, or no import would accept it.
        log.warning("%r: the stored text is not in canonical form; exported re-encoded", record.key)
        digest = _sha256(value)
    return (
        f'{{"key":{_json_string(record.key)},"value":{value},"version":{record.version:d},'
        f'"checksum":"{digest}","created_at":{_json_time(record.created_at)},'
        f'"updated_at":{_json_time(record.updated_at)},"expires_at":{_json_time(record.expires_at)},'
        f'"tier":"{record.tier.value}"}}\n'
    )


def _estimate(state: StateManager, pattern: str) -> int | None:
    """Roughly how many records an export of ``pattern`` will see, for the ETA.

    The catalog's count, for the whole store only (no backend counts a
    pattern cheaply); None when unknown.
    """
    if pattern != "*":
        return None
    count = state.stats()["tiers"].get(state.catalog_tier.value, {}).get("key_count")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


class _WriteError(Exception):
    """Writing the export's output failed (disk full, file too large...)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or type(cause).__name__)


def export_records(state: StateManager, out: IO[str], pattern: str = "*",
                   progress: Progress | None = None) -> tuple[int, list[str]]:
    """Write every live record matching ``pattern`` to ``out`` as JSON Lines.

    :returns: (records written, keys left out because no copy passed its checksum).
    :raises _WriteError: writing to ``out`` failed (the store's own errors pass as they are).
    """
    written = 0
    corrupt: list[str] = []

    def left_out(key: str, error: IntegrityError) -> None:
        corrupt.append(key)
        log.error("%r: no copy passes its checksum; not exported", key)

    total = _estimate(state, pattern) if progress is not None and progress.enabled else None
    for chunk in _chunks(state.iter_records(pattern, on_error=left_out)):
        text = "".join(_export_line(record, state.codec) for record in chunk)
        try:
            out.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _WriteError(exc) from exc
        written += len(chunk)
        if progress is not None:
            progress.update(written, fraction=written / total if total else None)
    return written, corrupt


def _cannot_write(name: str, exc: BaseException, code: int = EXIT_FAILED) -> CommandError:
    # The target's name and the OS's reason only: an OSError's own text names
    # the temporary .partial file, which never outlives a failed export.
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return CommandError(f"cannot write {name}: {reason}", code)


def _export_to_file(state: StateManager, args: argparse.Namespace,
                    progress: Progress) -> tuple[int, list[str]]:
    """Export into ``args.file``, written aside and renamed at the end: a failed
    export leaves neither a truncated file that looks like a complete backup
    nor its ``.partial`` file."""
    target = Path(args.file)
    if target.is_dir():
        raise CommandError(f"cannot write {args.file}: it is a folder", EXIT_USAGE)
    try:
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial",
                                   dir=target.parent if str(target.parent) else ".")
    except OSError as exc:  # no such folder, no permission
        raise _cannot_write(args.file, exc, EXIT_USAGE) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            result = export_records(state, out, args.pattern, progress)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, _WriteError) or (isinstance(exc, OSError)
                                            and not isinstance(exc, TieredStateError)):
            raise _cannot_write(args.file, exc) from None
        raise
    return result


def cmd_export(args: argparse.Namespace) -> int:
    to_stdout = args.file == "-"
    if to_stdout and args.json:
        raise CommandError("export --json needs a FILE: with '-', stdout holds the records "
                           "themselves (JSON Lines)", EXIT_USAGE)
    progress = Progress("export", enabled=not args.quiet)
    with _open(args) as state:
        try:
            if to_stdout:
                try:
                    count, corrupt = export_records(state, sys.stdout, args.pattern, progress)
                except _WriteError as exc:
                    raise _cannot_write("stdout", exc) from None
                sys.stdout.flush()
            else:
                count, corrupt = _export_to_file(state, args, progress)
        finally:
            progress.close()
    if args.json:
        emit_json({"exported": count, "file": args.file, "corrupt": corrupt})
        return EXIT_FAILED if corrupt else EXIT_OK
    summary = f"exported {count:,} records" + ("" if to_stdout else f" to {args.file}")
    if corrupt:
        summary += f"; {len(corrupt):,} failed their checksum and were left out"
    if not to_stdout:
        emit(summary)
    elif not args.quiet or corrupt:
        print(_line(f"{PROG}: {summary}"), file=sys.stderr)
    return EXIT_FAILED if corrupt else EXIT_OK


class ImportCounts:
    """What an import did, by outcome."""

    def __init__(self) -> None:
        self.imported = 0
        self.unchanged = 0  # the store held the same version already
        self.newer = 0  # the store held a newer version
        self.expired = 0
        self.invalid = 0

    @property
    def done(self) -> int:
        return self.imported + self.unchanged + self.newer + self.expired + self.invalid

    def add(self, report: RestoreReport) -> None:
        self.imported += report.restored
        self.unchanged += report.unchanged
        self.newer += report.newer
        self.expired += report.expired

    def reject(self, number: int, exc: BaseException) -> None:
        """Count line ``number`` as invalid; the first ten are logged."""
        self.invalid += 1
        if self.invalid <= 10:
            log.error("line %d: %s", number, _line(str(exc)))

    def summary(self) -> str:
        return (f"imported {self.imported:,} records, {self.unchanged:,} unchanged, kept "
                f"{self.newer:,} newer copies, skipped {self.expired:,} expired, "
                f"{self.invalid:,} invalid lines")

    def as_dict(self) -> dict[str, int]:
        return {"imported": self.imported, "unchanged": self.unchanged, "newer": self.newer,
                "expired": self.expired, "invalid": self.invalid}


def _parse_record(line: str, value_codec: Codec = JSON) -> Record:
    """An export line as a :class:`Record` whose value matches its checksum.

    The key itself is judged by ``restore`` (see :func:`import_records`).

    :raises ValueError: the line is not a valid export record.
    :raises TieredStateError: the value cannot be encoded, or the tier is unknown.
    """
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [f for f in EXPORT_FIELDS[:-1] if f not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    key = data["key"]
    if not isinstance(key, str):
        raise ValueError(f"key must be a string, not {type(key).__name__}")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("version must be a positive integer")
    created, updated, expires = (_timestamp(data, f) for f in ("created_at", "updated_at",
                                                               "expires_at"))
    if created is None or updated is None:
        raise ValueError("created_at and updated_at are required")
    text = codec.encode(data["value"])  # the canonical JSON the checksum covers
    payload = text.encode("utf-8")  # a lone surrogate: ValueError
    if hashlib.sha256(payload).hexdigest() != data["checksum"]:
        raise ValueError("checksum mismatch: the value was altered")
    # A typed codec's tags are JSON too: its own decode gives the value back.
    value = data["value"] if value_codec.name == JSON.name else value_codec.decode(text)
    return Record(key=key, value=value, version=version, checksum=data["checksum"],
                  size_bytes=len(payload), created_at=created, updated_at=updated,
                  expires_at=expires, tier=Tier.parse(data.get("tier") or "warm"))


def _timestamp(data: dict[str, Any], name: str) -> float | None:
    value = data[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of epoch seconds")
    return float(value)


def import_records(state: StateManager, lines: Iterable[tuple[int, str]], counts: ImportCounts,
                   after_chunk: Callable[[], None] | None = None) -> None:
    """Restore the records of numbered export lines, keeping versions and TTLs.

    Each chunk of :data:`CHUNK` lines is one ``restore`` call: a record goes
    in only if the store holds no version of its key as new, through the
    store's one write path (so every process sees it at once); expired
    records are skipped. Invalid lines -- unparsable here, or refused by
    ``restore`` (an invalid or reserved key) -- are counted and logged,
    never stored.
    """
    for chunk in _chunks(lines):
        batch: list[Record] = []
        numbers: dict[int, int] = {}
        for number, line in chunk:
            if not line.strip():
                continue
            try:
                record = _parse_record(line, state.codec)
            except (ValueError, TieredStateError) as exc:
                counts.reject(number, exc)
                continue
            numbers[id(record)] = number
            batch.append(record)
        if batch:
            def refused(record: Record, exc: Exception, numbers: dict[int, int] = numbers) -> None:
                counts.reject(numbers[id(record)], exc)

            counts.add(state.restore(batch, on_error=refused))
        if after_chunk is not None:
            after_chunk()


def cmd_import(args: argparse.Namespace) -> int:
    counts = ImportCounts()
    progress = Progress("import", enabled=not args.quiet)
    source: IO[str]
    if args.file == "-":
        source, size = sys.stdin, None
    else:
        try:
            source = Path(args.file).open(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror}", EXIT_USAGE) from None
        size = os.fstat(source.fileno()).st_size or None
    read = 0

    def numbered() -> Iterator[tuple[int, str]]:
        nonlocal read
        for number, line in enumerate(source, 1):
            read += len(line)
            yield number, line

    def show() -> None:
        progress.update(counts.done, fraction=read / size if size else None)

    try:
        with _open(args) as state:
            import_records(state, numbered(), counts, show)
    finally:
        progress.close()
        if source is not sys.stdin:
            source.close()
    if args.json:
        emit_json(counts.as_dict())
    else:
        emit(counts.summary())
    return EXIT_FAILED if counts.invalid else EXIT_OK


# ---------------------------------------------------------------- upgrade
def cmd_upgrade(args: argparse.Namespace) -> int:
    report = upgrade_store(args.path, hot=args.hot, warm=args.warm, cold=args.cold, pack=args.pack)
    if args.json:
        emit_json(dataclasses.asdict(report))
    elif report.already:
        emit("the store is already in the current format"
             + (f"; packed {report.packed:,} cold records into segments" if args.pack
                else "; nothing to do"))
    else:
        emit(f"upgraded the store to the current format: moved {report.moved:,} records from "
             f"the 0.1 cold layout into the catalog, dropped {report.dropped:,} older or expired "
             f"copies, flushed {report.hot_flushed:,} hot copies, {report.corrupt:,} corrupt"
             + (f", packed {report.packed:,} cold records into segments" if args.pack else ""))
    if report.corrupt:
        error_line(f"{report.corrupt:,} cold object(s) fail their checksum and were left in "
                   "place, unread (the errors above name them)")
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """A tour on a temporary embedded store; the user's configuration is not touched."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tiered-state-demo-") as tmp:
        root = Path(tmp)
        # A throwaway store: skipping fsync keeps the tour quick on slow disks.
        warm = f"sqlite:///{root / 'warm.db'}"
        cold = (root / "cold").as_uri() + "?fsync=false"
        # cold_after=1s, so the sweep at the end has idle records to move.
        policy = TieringPolicy(cold_after=1.0, purge_after=0)
        say = emit
        say(f"A tour of tiered-state on a temporary store in {tmp}")
        with open_store(root, hot="memory://", warm=warm, cold=cold, policy=policy) as state:
            tiers = state.stats()["tiers"]
            say("  tiers: " + ", ".join(f"{t}={data['backend']}" for t, data in tiers.items())
                + f"; the catalog is in {state.catalog_tier.value}")
            say("")
            version = state.set("position:BTC", {"qty": 1.5, "avg": 64210.0})
            say(f'1. set position:BTC {{"qty": 1.5, "avg": 64210.0}} -> version {version}')
            say("   (durable in warm when set returns, with a copy in hot)")
            record = state.get_record("position:BTC")
            assert record is not None
            say(f"2. get position:BTC -> {codec.encode(record.value)}  (read from {record.tier})")
            versions = state.set_many({f"order:{n}": {"id": n, "side": "buy"} for n in range(1, 21)},
                                      tier="warm")
            say(f"3. set_many: {len(versions)} orders in one batch, straight to warm")
            state.set("session:42", {"user": "ada"}, ttl=1)
            say("4. set session:42 with ttl=1s (the record's lifetime, in every tier)")
            try:
                state.set("position:BTC", {"qty": 2.0}, if_version=1)
            except ConflictError as exc:
                say(f"5. set position:BTC if_version=1 -> refused: {exc}")
            state.demote("order:1", to="cold")
            found = state.get_record("order:1")
            assert found is not None
            say(f"6. demote order:1 to cold; get order:1 -> read from {found.tier}, "
                "copied back up to hot")
            time.sleep(1.1)
            gone = state.get("session:42", "<absent>")
            say(f"7. one second later: get session:42 -> {gone}")
            report = state.sweep()
            say(f"8. sweep: scanned {report.scanned}, moved {report.moved} idle records to cold, "
                f"purged {report.purged} expired")
            record = state.get_record("order:7")
            assert record is not None
            say(f"9. get order:7 -> {codec.encode(record.value)}  (read from {record.tier}: "
                "reads stay transparent)")
            say("")
            say("stats:")
            for tier, data in state.stats()["tiers"].items():
                say(f"  {tier:<4}  {data['backend']:<10}  {data['key_count']:>3} keys")
        say("")
        say(f"Done in {time.monotonic() - started:.1f}s; the temporary store is removed.")
        say("Next: tiered-state set greeting '\"hello\"' && tiered-state get greeting   "
            "(a store in ./.tiered_state)")
    return EXIT_OK


# ---------------------------------------------------------------- argparse
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other error."""

    def error(self, message: str) -> Any:
        # A subcommand's parser is named "tiered-state COMMAND": the command
        # goes into the message, so every error line starts the same way.
        command = self.prog[len(PROG):].strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, _line(f"{PROG}: error: {where}{message} (see {self.prog} --help)")
                  + "\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: only if absent)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Inspect, operate and demo a tiered-state store (HOT/WARM/COLD).",
        epilog="Exit status: 0 ok, 1 absent key or operational failure, 2 usage or "
               "configuration error (a store written by 0.1: run `tiered-state upgrade`). "
               "Global options go before the command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    for tier, example in ((Tier.HOT, "memory:// or redis://host:6379/0"),
                          (Tier.WARM, "sqlite:///path.db or postgresql://user@host/db"),
                          (Tier.COLD, "file:///dir or s3://bucket/prefix")):
        parser.add_argument(f"--{tier.value}", metavar="URL",
                            help=f"{tier.value.upper()} tier URL ({example}; 'none' switches it "
                                 f"off); default ${_ENV[tier]} or the embedded tier")
    parser.add_argument("--codec", metavar="NAME", choices=("json", "typed-json"),
                        help="the store's codec: json (the default) or typed-json "
                             "(TypedJSONCodec, for stores opened with it)")
    parser.add_argument("--path", metavar="DIR",
                        help=f"folder of the embedded tiers; default ${ENV_PATH} or ./.tiered_state")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress line, warnings or summaries on stderr")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging, and a traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str,
                json_help: str | None = "the result as one JSON document") -> Any:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func, json=False)
        if json_help is not None:
            p.add_argument("--json", action="store_true", help=json_help)
        return p

    p = command("get", cmd_get, "print the value of KEY as JSON (exit 1 if absent)",
                "the record as an export line: key, value, version, checksum, times, tier")
    p.add_argument("key", metavar="KEY")
    p = command("set", cmd_set, "store a JSON value under KEY; prints the new version")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="JSON", help="""a JSON value, e.g. '{"qty": 1}' or '"text"'""")
    p.add_argument("--tier", choices=[t.value for t in _ORDER], default="hot",
                   help="tier of the copy (a volatile tier is written through; default hot)")
    p.add_argument("--ttl", type=_positive, metavar="SECONDS", help="the record's lifetime")
    p.add_argument("--if-version", type=_version, metavar="N",
                   help="store only if the current version is N (0: only if absent)")
    p = command("delete", cmd_delete, "delete KEYs; prints how many this call deleted")
    p.add_argument("keys", metavar="KEY", nargs="+")
    p = command("keys", cmd_keys, "list keys matching a glob, one per line, streamed from "
                                  "the catalog", "JSON Lines: each key as a JSON string")
    p.add_argument("pattern", metavar="PATTERN", nargs="?", default="*",
                   help="glob: * ? [abc], \\ escapes (default *)")
    p = command("stats", cmd_stats, "per-tier statistics", "as JSON (with the manager counters)")
    p = command("sweep", cmd_sweep, "run the tiering policy once: move idle records to "
                                    "cold, purge expired ones, collect unreferenced payloads")
    p.add_argument("--dry-run", action="store_true", help="count what it would do; change nothing")
    p.add_argument("--cold-after", type=_seconds_or_none, default=TieringPolicy.cold_after,
                   metavar="SECONDS", help="idle time before warm -> cold (0: every warm "
                                           "record; 'none': never; default 7 days, as "
                                           "TieringPolicy)")
    p.add_argument("--purge-after", type=_seconds_or_zero, default=TieringPolicy.purge_after,
                   metavar="SECONDS", help="how long deletes' tombstones and expired records "
                                           "stay before they are purged (default 300, as "
                                           "TieringPolicy; 0: at once)")
    p = command("promote", cmd_promote, "copy KEY up into a tier (the lower copy stays)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--to", choices=["hot", "warm"], default="hot")
    p = command("demote", cmd_demote, "move KEY down into a tier (no copy stays above); "
                                      "exit 1 if nothing moved because KEY is absent or "
                                      "changed meanwhile")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--to", choices=["warm", "cold"], default="cold")
    p = command("inspect", cmd_inspect, "every stored copy of KEY, as stored: tier, role, "
                                        "version, checksum, size, expiry, location")
    p.add_argument("key", metavar="KEY")
    command("doctor", cmd_doctor, "reach every tier, then open the store: latency, what is "
                                  "missing or outdated, how to fix it")
    p = command("export", cmd_export, "write records with metadata as JSON Lines (streamed)",
                "the summary as JSON (needs a FILE)")
    p.add_argument("file", metavar="FILE", help="output file, '-' for stdout")
    p.add_argument("pattern", metavar="PATTERN", nargs="?", default="*")
    p = command("import", cmd_import, "load an export, keeping versions and TTLs")
    p.add_argument("file", metavar="FILE", help="input file, '-' for stdin")
    p = command("upgrade", cmd_upgrade, "bring a store written by tiered-state 0.1 to the "
                "current format (idempotent, safe to interrupt and run again; stop the "
                "applications using the store first)")
    p.add_argument("--pack", action="store_true",
                   help="also pack cold records stored one per file or object into segments "
                        "now (each sweep does it over time)")
    command("demo", cmd_demo, "a short tour on a temporary embedded store", None)
    return parser


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (ConfigurationError, InvalidKeyError, SerializationError, ImportError)):
        return EXIT_USAGE
    return EXIT_FAILED


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CommandError):
        return str(exc)
    if isinstance(exc, BackendUnavailableError):
        return f"unreachable: {exc}"
    if isinstance(exc, (TieredStateError, OSError)):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError):
        return f"cannot load a backend: {exc}"
    return f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_logging = _setup_logging(args.debug, args.quiet)
    try:
        code: int = args.func(args)
        # Flushed here, not at exit, so a reader gone away is seen below.
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`keys | head`): it has what it wanted. As the
        # Python docs advise (signal module, "Note on SIGPIPE"), point stdout
        # at devnull so the flush at exit does not fail again.
        # (Drivers' errors reach here translated, so a broken pipe is stdout's.)
        with contextlib.suppress(OSError, ValueError):  # ValueError: no real stdout
            stdout = sys.stdout.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout)
            os.close(devnull)
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if args.debug:
            traceback.print_exc()
        code = exc.code if isinstance(exc, CommandError) else _exit_code(exc)
        error_line(_describe(exc))
        return code
    finally:
        restore_logging()

