"""``tiered-state export``: flat memory and speed, next to a raw sqlite3 dump.

Run: ``python -m benchmarks.bench_cli_export`` (about a minute). Two embedded
stores are seeded with 10,000 and 100,000 records in WARM (SQLite); each is
exported by the real command in a child process, which reports its own peak
RSS (``VmHWM`` from ``/proc/self/status`` at exit). Not ``getrusage``: on
Linux a child's ``ru_maxrss`` keeps the RSS its parent had at ``fork``, which
would hide the export's own footprint behind the benchmark's. Next to it, in the same rounds, a raw child
streams the same table with the stdlib (``sqlite3`` cursor + ``json``) into
the same JSON Lines shape, the same rows the export lists from the catalog
(live values, in key order, not the store's reserved format record; the
export also reads each value and checks its checksum, which the raw child
does not) -- the floor for time and memory -- and a child
that only starts the command (``--version``) gives the interpreter's own
footprint.

Target: export of 100k records with flat memory -- the 100k peak
RSS at most 5 MiB above the 10k one (it streams in chunks of ``cli.CHUNK``).
The time rows have no target: the raw child does less work.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tiered_state

from .harness import compare, fact, measure, print_rows, print_table, scaled, write_json

SIZES = (scaled(10_000, 2000), scaled(100_000, 20_000))
ROUNDS = 3
#: The most the peak RSS may grow from the small export to the large one.
FLAT_MIB = 5.0

#: Runs the real command (``python -m tiered_state ARGS``) and reports its peak RSS.
CLI = r"""
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write(
    [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]))
sys.argv = ["tiered-state", *sys.argv[1:]]
runpy.run_module("tiered_state", run_name="__main__")
"""

RAW = r"""
import json, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1])
out = open(sys.argv[2], "w", encoding="utf-8")
# What the export lists from the catalog: live values (no stubs, tombstones,
# expired rows), without the store's own reserved records.
cur = conn.execute("SELECT key, payload, version, checksum, created_at, updated_at, expires_at"
                   " FROM tiered_state WHERE encoding NOT IN ('stub', 'tombstone')"
                   " AND (expires_at IS NULL OR expires_at > ?)"
                   " AND substr(key, 1, 17) != '__tiered_state__:' ORDER BY key", (time.time(),))
while True:
    rows = cur.fetchmany(500)
    if not rows:
        break
    for key, payload, version, checksum, created, updated, expires in rows:
        out.write('{"key":%s,"value":%s,"version":%d,"checksum":"%s","created_at":%r,'
                  '"updated_at":%r,"expires_at":%s,"tier":"warm"}\n'
                  % (json.dumps(key), payload, version, checksum, created, updated,
                     json.dumps(expires)))
out.close()
sys.stderr.write([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def seed(root: Path, n: int) -> None:
    with tiered_state.open(root, hot="none", cold="none") as state:
        for start in range(0, n, 10_000):
            state.set_many(
                {f"order:{i:07d}": {"id": i, "side": "buy", "qty": 1.5 * i, "note": "x" * 64}
                 for i in range(start, min(start + 10_000, n))},
                tier="warm",
            )


def run_child(command: list[str]) -> tuple[float, int]:
    """Run ``command``; return (seconds, the peak RSS in KiB it reported)."""
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed ({proc.returncode}): {proc.stderr}")
    return elapsed, int(proc.stderr.rsplit("VmHWM:", 1)[1].split()[0])


def recorder(command: list[str], peaks: list[int]) -> Callable[[], None]:
    """A timed case running ``command`` and keeping each run's peak RSS."""
    return lambda: peaks.append(run_child(command)[1])


def main() -> None:
    rows: list[dict[str, Any]] = []
    standard: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cli-export-") as tmp:
        base = Path(tmp)
        stores = {}
        for n in SIZES:
            stores[n] = base / f"store{n}"
            seed(stores[n], n)
        _, startup_kib = run_child([sys.executable, "-c", CLI, "--version"])
        for n in SIZES:
            root, out = stores[n], base / f"out{n}.jsonl"
            peaks: dict[str, list[int]] = {"cli": [], "raw": []}
            ours = [sys.executable, "-c", CLI, "--quiet", "--path", str(root),
                    "--hot", "none", "export", str(out)]
            raw = [sys.executable, "-c", RAW, str(root / "warm.db"), str(base / "raw.jsonl")]

            results = measure({"cli export": recorder(ours, peaks["cli"]),
                               "raw sqlite3": recorder(raw, peaks["raw"])}, ops=n, rounds=ROUNDS)
            lines = sum(1 for _ in out.open())
            assert lines == n, (lines, n)
            cli_mib, raw_mib = max(peaks["cli"]) / 1024, max(peaks["raw"]) / 1024
            rows.append({
                "records": f"{n:,}",
                "cli s": results["cli export"]["median_s"],
                "raw s": results["raw sqlite3"]["median_s"],
                "time ratio": results["cli export"]["median_s"] / results["raw sqlite3"]["median_s"],
                "cli records/s": results["cli export"]["ops_per_s"],
                "cli peak RSS MiB": cli_mib,
                "raw peak RSS MiB": raw_mib,
                "file MiB": out.stat().st_size / 2**20,
            })
            standard.append(compare(
                results, "cli export", "raw sqlite3", level="CLI",
                measurement=f"``tiered-state export`` of {n:,} records, per record",
                vs="a stdlib child writing the same lines (no checksum check)"))
            data[str(n)] = {"results": results, "cli_peak_rss_kib": peaks["cli"],
                            "raw_peak_rss_kib": peaks["raw"], "file_bytes": out.stat().st_size}
    small, large = rows[0]["cli peak RSS MiB"], rows[-1]["cli peak RSS MiB"]
    growth = large - small
    standard.append(fact(
        f"``tiered-state export`` peak RSS, {SIZES[-1]:,} records", f"the same, {SIZES[0]:,} records",
        ours=large, other=small, unit="MiB", level="CLI", show_ratio=False,
        target=f"at most +{FLAT_MIB:g} MiB", met=growth <= FLAT_MIB))
    print_table(f"tiered-state export (child peak RSS; `--version` alone: "
                f"{startup_kib / 1024:.1f} MiB)", rows)
    print(f"\npeak RSS growth {SIZES[0]:,} -> {SIZES[-1]:,} records: {growth:+.1f} MiB "
          f"(target: at most +{FLAT_MIB:g} MiB)")
    print_rows("tiered-state export (ratio = our median time / the other side's)", standard)
    write_json("cli_export", standard, {"summary": rows, "startup_rss_kib": startup_kib,
                                        "growth_mib": growth, "results": data})


if __name__ == "__main__":
    main()
