"""Shared timing harness for the benchmark scripts.

Each script compares a tiered-state operation with another way of doing the
same work *in the same process*, alternating the two in rounds so drift
(CPU frequency, other processes, server caches) hits both alike, and reports
the ratio of the medians. Results go to stdout as a table and to
``benchmarks/results/<name>.json``, with a description of the run (command,
commit, machine, library and server versions) that ``benchmarks.report``
turns into the README's table.

A row of that table is a dict built by :func:`compare` (a timed pair) or
:func:`fact` (a measured quantity, such as a memory peak):

* ``measurement`` -- our side, as rst text;
* ``vs`` -- the other side: a peer library's public API, the stdlib doing the
  same work, or a floor of our own (then named as such);
* ``level`` -- what our side calls: ``API`` (``tiered_state.open(...)`` and
  the ``StateManager`` it returns), ``repository`` (one backend, opened with
  ``open_repository(url)``: no encoding, checksum or metadata in the timed
  loop on either side) or ``CLI`` (the ``tiered-state`` command);
* ``ours`` / ``other`` in ``unit`` (``s/op`` for timings), ``ratio``
  (ours / other: for timings, lower is better), ``target``, ``met``;
* ``readme`` -- whether the README's table shows the row (every row is in the
  JSON and in the script's own output).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
REDIS_URL = os.environ.get("TIERED_STATE_TEST_REDIS_URL", "").strip()
POSTGRES_URL = os.environ.get("TIERED_STATE_TEST_POSTGRES_URL", "").strip()
S3_URL = os.environ.get("TIERED_STATE_TEST_S3_URL", "").strip()
#: ``BENCH_QUICK=1`` shrinks every size and round count: a smoke run whose
#: figures are marked as such and are not for publishing.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
#: Environment variables that change what a run measures; a run records the
#: ones that were set, and the command printed under the README's table
#: carries them.
KNOBS = ("BENCH_QUICK", "BENCH_DIR")
#: The peers' distributions whose versions a run records (when installed).
LIBRARIES = ("tiered-state", "diskcache", "redis", "hiredis", "psycopg2-binary", "boto3",
             "botocore", "orjson", "statsd", "moto")
_STARTED = time.time()
_LOAD_AT_START = os.getloadavg()[0]


def scaled(full: int, quick: int) -> int:
    """``full``, or ``quick`` in a ``BENCH_QUICK`` smoke run."""
    return quick if QUICK else full


def with_option(url: str, option: str) -> str:
    """``url`` with one more query option."""
    return url + ("&" if "?" in url else "?") + option


def unique(name: str) -> str:
    """A name of this run's own, for a Redis prefix, a table or an S3 prefix."""
    return f"{name}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def server_urls(name: str) -> Iterator[tuple[str, str] | None]:
    """``(hot, warm)`` URLs on the test Redis and PostgreSQL with a prefix and a
    table of this run's own, both removed afterwards; None without those servers."""
    if not (REDIS_URL and POSTGRES_URL):
        print(f"{name}: redis+postgres rows skipped: set TIERED_STATE_TEST_{{REDIS,POSTGRES}}_URL")
        yield None
        return
    tag = unique(name)
    hot = with_option(REDIS_URL, f"prefix={tag}:")
    try:
        yield hot, with_option(POSTGRES_URL, f"table={tag}")
    finally:
        drop_redis_prefix(REDIS_URL, f"{tag}:")
        drop_postgres_table(POSTGRES_URL, tag)


def drop_redis_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (this run's own) with redis-py."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def drop_postgres_table(url: str, table: str) -> None:
    """``DROP TABLE IF EXISTS`` a table this run created."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{table}"')
    finally:
        conn.close()


def measure(
    cases: dict[str, Callable[[], object]],
    *,
    ops: int = 1,
    rounds: int = 7,
    setup: Callable[[], object] | None = None,
    before: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, float]]:
    """Time each case ``rounds`` times, alternating cases within every round.

    :param cases: name -> callable doing ``ops`` operations per call.
    :param ops: operations per call (to report per-operation cost and rate).
    :param setup: run before every timed call (not timed).
    :param before: name -> run before every timed call of that case only (not
        timed), for cases that need fresh state each round (a store to sweep,
        an empty store to restore into).
    :returns: name -> {"median_s", "best_s", "per_op_us", "ops_per_s"}.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            if setup is not None:
                setup()
            if before is not None and name in before:
                before[name]()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    out: dict[str, dict[str, float]] = {}
    for name, times in samples.items():
        median = statistics.median(times)
        out[name] = {
            "median_s": median,
            "best_s": min(times),
            "per_op_us": median / ops * 1e6,
            "ops_per_s": ops / median if median else float("inf"),
        }
    return out


def ratio(results: dict[str, dict[str, float]], ours: str, other: str) -> float:
    """Our median time divided by the other case's (lower is better, 1.0 = equal)."""
    return results[ours]["median_s"] / results[other]["median_s"]


# ---------------------------------------------------------------- rows
@dataclass(frozen=True)
class Target:
    """A limit on a time ratio (ours / other), with the text the tables show."""

    limit: float
    text: str


def at_most(limit: float) -> Target:
    """Our time at most ``limit`` times the other side's."""
    return Target(limit, f"<= {limit:g}")


def throughput_at_least(times: float) -> Target:
    """Our throughput at least ``times`` the other side's, as a limit on the time ratio."""
    if times == 1:
        return at_most(1)
    return Target(1 / times, f"<= {1 / times:.2f} (>= {times:g}x throughput)")


def compare(results: dict[str, dict[str, float]], ours: str, other: str, *, measurement: str,
            vs: str, level: str = "API", target: Target | None = None, readme: bool = True
            ) -> dict[str, Any]:
    """A row for a timed pair: per-operation medians and their ratio."""
    r = ratio(results, ours, other)
    return {
        "measurement": measurement, "vs": vs, "level": level, "unit": "s/op",
        "ours": results[ours]["per_op_us"] / 1e6, "other": results[other]["per_op_us"] / 1e6,
        "ratio": r, "target": target.text if target else "",
        "met": (r <= target.limit) if target else None, "readme": readme,
        "cases": [ours, other],
    }


def peer_rows(results: dict[str, dict[str, float]], store: str,
              pairs: Iterable[tuple[str, str, str]], batch: int) -> list[dict[str, Any]]:
    """API rows for a one-backend store against a peer: ``(our case, their case,
    vs)`` for our cases named after the call (``set``, ``get_many``...)."""
    return [compare(results, ours, theirs, vs=vs,
                    measurement=f"{store} ``{ours}``" + (f" ({batch:,})" if "_many" in ours else ""))
            for ours, theirs, vs in pairs]


def fact(measurement: str, vs: str, *, ours: float, other: float | None, unit: str,
         level: str = "API", target: str = "", met: bool | None = None, readme: bool = True,
         show_ratio: bool = True) -> dict[str, Any]:
    """A row for a measured quantity (a memory peak, a count, a time) next to another."""
    r = ours / other if (show_ratio and other) else None
    return {"measurement": measurement, "vs": vs, "level": level, "unit": unit, "ours": ours,
            "other": other, "ratio": r, "target": target, "met": met, "readme": readme}


def format_value(value: float | None, unit: str) -> str:
    """A row's ``ours`` / ``other`` as the tables show it."""
    if value is None:
        return ""
    if unit in ("s/op", "s"):
        if value >= 1:
            return f"{value:.2f} s"
        if value >= 1e-3:
            return f"{_sig3(value * 1e3)} ms"
        return f"{_sig3(value * 1e6)} µs"
    if unit == "KiB":
        return f"{value:,.0f} KiB"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:g} {unit}"


def _sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept (2.00, 18.6, 222)."""
    return f"{value:#.3g}".rstrip(".")


def format_ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def format_met(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "MISSED")


def table_cells(rows: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """The text cells of rows, in the column order of :data:`COLUMNS`."""
    return [[str(row["measurement"]), str(row["vs"]), str(row["level"]),
             format_value(row["ours"], row["unit"]), format_value(row["other"], row["unit"]),
             format_ratio(row["ratio"]), str(row["target"]), format_met(row["met"])]
            for row in rows]


COLUMNS = ["measurement", "vs", "level", "ours", "other", "ratio", "target", "met?"]


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    """Print standard rows (see the module docstring) as an aligned text table."""
    print_table(title, [dict(zip(COLUMNS, cells)) for cells in table_cells(rows)])


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows (dicts with the same keys) as an aligned text table."""
    if not rows:
        return
    columns = list(rows[0])
    text = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


# ---------------------------------------------------------------- the run's description
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _proc_field(path: str, field: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine() -> dict[str, Any]:
    """CPU, memory, OS and Python of this machine."""
    memory = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(int(memory.split()[0]) / 2**20, 1) if memory else None,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def libraries() -> dict[str, str]:
    """Installed versions of tiered-state and the peers it is compared with."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return f"Redis {client.info('server')['redis_version']}"
    finally:
        client.close()


def _postgres_version(url: str) -> str:
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            row = cur.fetchone()
        return f"PostgreSQL {row[0].split()[0] if row else '?'}"
    finally:
        conn.close()


def _s3_description(url: str) -> str:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    endpoint = query.get("endpoint_url", ["AWS"])[-1]
    server = ""
    if endpoint.startswith("http"):
        try:
            with urllib.request.urlopen(endpoint, timeout=5) as reply:
                server = reply.headers.get("Server", "")
        except OSError as exc:  # an S3 endpoint answers a bare GET with an error status
            headers = getattr(exc, "headers", None)
            server = headers.get("Server", "") if headers else ""
    host = urllib.parse.urlsplit(endpoint).netloc or endpoint
    return f"S3 at {host}" + (f" ({server})" if server else "")


def servers(names: Iterable[str]) -> dict[str, str]:
    """Versions of the servers a run used (``redis``, ``postgres``, ``s3``)."""
    probes: dict[str, tuple[str, Callable[[str], str]]] = {
        "redis": (REDIS_URL or "redis://127.0.0.1:6379/0", _redis_version),
        "postgres": (POSTGRES_URL or "postgresql://postgres@127.0.0.1:5432/test", _postgres_version),
        "s3": (S3_URL, _s3_description),
    }
    out = {}
    for name in names:
        url, probe = probes[name]
        if not url:
            continue
        try:
            out[name] = probe(url)
        except Exception as exc:  # a description, never a reason to lose the results
            out[name] = f"unknown ({type(exc).__name__})"
    return out


def run_description(name: str, used_servers: Iterable[str] = ()) -> dict[str, Any]:
    """What reproduces this run: command, commit, machine, versions, duration."""
    used = list(used_servers)
    knobs = [f"{k}={os.environ[k]}" for k in KNOBS if os.environ.get(k, "").strip()]
    commit = _git("rev-parse", "--short", "HEAD")
    # Changed code, not the results earlier scripts of the same run wrote.
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results", ":(exclude)README.rst"))
    finished = time.time()
    return {
        "command": " ".join([*knobs, "python", "-m", f"benchmarks.bench_{name}"]),
        "quick": QUICK,
        "commit": commit,
        "dirty": dirty,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_STARTED)),
        "duration_s": round(finished - _STARTED, 1),
        "load_average": [round(_LOAD_AT_START, 2), round(os.getloadavg()[0], 2)],
        "machine": machine(),
        "libraries": libraries(),
        "servers": servers(used),
        "server_variables": [f"TIERED_STATE_TEST_{name.upper()}_URL" for name in used
                             if os.environ.get(f"TIERED_STATE_TEST_{name.upper()}_URL", "").strip()],
    }


def write_json(name: str, rows: list[dict[str, Any]], data: Mapping[str, Any], *,
               used_servers: Iterable[str] = ()) -> Path:
    """Write ``results/<name>.json``: the rows, the raw results and the run's description."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "run": run_description(name, used_servers), "rows": rows,
               **data}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)} ({payload['run']['duration_s']:.0f} s)")
    return path
