"""What COLD costs: bytes per record, sweep throughput and a cold read, with
segments (this tree) against one file or object per record (the code before
segments, commit ``BASELINE``), side by side in the same run.

Both sides run the same function through the public API -- ``tiered_state.open``,
``set_many`` to WARM, ``sweep()`` with ``cold_after=0``, ``get(key, promote=False)``
-- each in a child process of its own, the baseline's from a temporary
``git worktree`` of ``BASELINE`` put first on ``PYTHONPATH``. They alternate,
baseline first, so a drift of the machine weighs on both.

Records are about 500 bytes of JSON (a position with some text), the size the
issue names. Figures:

* bytes per record in the file COLD tier: what the files allocate on disk
  (``st_blocks``), over the payload bytes they hold;
* objects and bytes in S3 (SeaweedFS) per record;
* sweep throughput (records moved per second) to files and to S3;
* one cold ``get``, files and S3 (the record stays in COLD: ``promote=False``);
* the embedded WARM file after the sweep.

Run::

    python -m benchmarks.bench_cold            # 100k records to files, 5k to S3; ~5 minutes
    BENCH_QUICK=1 python -m benchmarks.bench_cold

S3 rows need ``TIERED_STATE_TEST_S3_URL`` (skipped without it).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .harness import ROOT, at_most, fact, print_rows, scaled, throughput_at_least, unique, write_json

#: The last commit that wrote one file or object per COLD record.
BASELINE = "740cfbd"
#: One side's run, a script of its own (see there).
CHILD = Path(__file__).with_name("cold_child.py")
FILE_RECORDS = scaled(100_000, 10_000)
S3_RECORDS = scaled(5_000, 1_000)
GETS = scaled(2_000, 300)
ROUNDS = scaled(3, 1)


# ---------------------------------------------------------------- the parent
def _run_side(tree: Path, target: str, count: int, s3_url: str | None) -> dict[str, Any]:
    """Run the child script with ``tree``'s tiered_state: first on the path, from
    a folder holding none (so neither the working directory nor the installed
    package can stand in for it)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    args = [sys.executable, str(CHILD), target, str(count), str(GETS), s3_url or ""]
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{target} side failed:\n{done.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(out["module"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the {tree} side imported {out['module']}")
    return out


def _median_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[0])
    for field in ("sweep_s", "get_s"):
        out[field] = statistics.median(r[field] for r in runs)
    return out


def main() -> None:
    s3_base = os.environ.get("TIERED_STATE_TEST_S3_URL", "").strip()
    work = Path(tempfile.mkdtemp(prefix="bench-cold-baseline-"))
    baseline = work / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), BASELINE], cwd=ROOT,
                   check=True)
    raw: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        targets = [("file", FILE_RECORDS)] + ([("s3", S3_RECORDS)] if s3_base else [])
        for target, count in targets:
            sides: dict[str, list[dict[str, Any]]] = {"today": [], "segments": []}
            for _ in range(ROUNDS):
                for side, tree in (("today", baseline), ("segments", ROOT)):
                    url = None
                    if target == "s3":  # a prefix of its own in the test bucket
                        base, _, query = s3_base.partition("?")
                        url = f"{base.rstrip('/')}/{unique('cold')}" + (f"?{query}" if query else "")
                    sides[side].append(_run_side(tree, target, count, url))
                    print(f"{target} {side}: {sides[side][-1]}", flush=True)
            today, new = _median_side(sides["today"]), _median_side(sides["segments"])
            raw[target] = {"today": sides["today"], "segments": sides["segments"]}
            rows.extend(_rows(target, today, new))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print_rows("COLD with segments against one file or object per record (the code at "
               f"{BASELINE}); ratio = ours / today's", rows)
    write_json("cold", rows, {"baseline": BASELINE, "results": raw},
               used_servers=("s3",) if s3_base else ())


def _rows(target: str, today: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    n = new["records"]
    where = "files" if target == "file" else "S3 (SeaweedFS)"
    rows = []
    if target == "file":
        rows.append(fact(f"file COLD: bytes allocated per record ({n:,} records of "
                         f"{new['payload_bytes'] / n:.0f} bytes)",
                         "one file per record, same records", unit="bytes",
                         ours=new["allocated_bytes"] / n, other=today["allocated_bytes"] / n))
        rows.append(fact("file COLD: bytes allocated over payload bytes",
                         "target", unit="x", ours=new["allocated_bytes"] / new["payload_bytes"],
                         other=today["allocated_bytes"] / today["payload_bytes"], target="<= 1.3",
                         met=new["allocated_bytes"] <= 1.3 * new["payload_bytes"]))
        rows.append(fact("embedded WARM file after the sweep", "before segments", unit="bytes",
                         ours=new["warm_file_bytes"], other=today["warm_file_bytes"]))
    else:
        batches = -(-n // 500)
        rows.append(fact(f"S3 objects after sweeping {n:,} records", "one object per record",
                         unit="objects", ours=new["objects"], other=today["objects"],
                         target=f"<= {batches} (one per batch)", met=new["objects"] <= batches))
        rows.append(fact("S3 bytes stored per record", "one object per record", unit="bytes",
                         ours=new["stored_bytes"] / n, other=today["stored_bytes"] / n))
    sweep_target = throughput_at_least(3 if target == "file" else 10)
    r = new["sweep_s"] / today["sweep_s"]
    rows.append({"measurement": f"sweep of {n:,} records to {where}, records/s", "vs": "today",
                 "level": "API", "unit": "records/s", "ours": n / new["sweep_s"],
                 "other": n / today["sweep_s"], "ratio": r, "target": sweep_target.text,
                 "met": r <= sweep_target.limit, "readme": True})
    get_target = at_most(1.2)
    g = new["get_s"] / today["get_s"]
    rows.append({"measurement": f"one cold ``get`` from {where}", "vs": "today (one object read)",
                 "level": "API", "unit": "s/op", "ours": new["get_s"], "other": today["get_s"],
                 "ratio": g, "target": get_target.text, "met": g <= get_target.limit,
                 "readme": True})
    return rows


if __name__ == "__main__":
    main()
