"""Run every benchmark script, one after another, then regenerate the README's table.

Run::

    python -m benchmarks                    # all of them (about ten minutes), then the table
    python -m benchmarks embedded redis     # some of them, then the table
    python -m benchmarks --no-readme        # leave README.rst alone

Each script runs in a child process of its own (a fresh interpreter: no
script's imports, heap or threads weigh on the next one's timings) and
writes ``benchmarks/results/<name>.json``; ``benchmarks.report`` then
rewrites the table in README.rst from those files.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from . import report
from .harness import ROOT


def main() -> int:
    names = [name for name, _ in report.SCRIPTS]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("scripts", nargs="*", choices=[[], *names], metavar="SCRIPT",
                        help=f"scripts to run (default: all): {', '.join(names)}")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.rst")
    args = parser.parse_args()
    chosen = args.scripts or names
    started = time.perf_counter()
    failed = []
    for name in chosen:
        print(f"\n=== python -m benchmarks.bench_{name}", flush=True)
        t = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.bench_{name}"], cwd=ROOT)
        print(f"=== bench_{name}: exit {code}, {time.perf_counter() - t:.0f} s", flush=True)
        if code:
            failed.append(name)
    print(f"\nall done in {time.perf_counter() - started:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if not args.no_readme:
        report.main([])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
