"""A process of the compute-once and atomic-counter tests (tests/test_api.py).

Run as ``python -m tests.api_worker MODE CONFIG_JSON OUT_PATH``. CONFIG holds
the ``tiered_state.open`` arguments plus the test's parameters; every thread's
results go to OUT_PATH as JSON, and each factory call appends one line to the
shared ``calls`` file (appends of one short line are atomic), so the test can
count how often a value was computed across every process.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import tiered_state
from tiered_state import operations


def main() -> None:
    mode, config_text, out_path = sys.argv[1:4]
    config: dict[str, Any] = json.loads(config_text)
    params = config.pop("params")
    if "lease" in params:
        operations.LEASE_SECONDS = params["lease"]
    state = tiered_state.open(**config)
    threads = params["threads"]
    results: list[list[Any]] = [[] for _ in range(threads)]
    errors: list[str] = []

    def factory_for(round_: int, thread: int) -> Any:
        def factory() -> Any:
            with open(params["calls"], "a") as f:
                f.write(f"{round_} {os.getpid()} {thread}\n")
            time.sleep(params.get("compute", 0.05))
            if params.get("fail_first") and round_ == 0:
                try:  # the first call of round 0, in whichever process, fails
                    os.close(os.open(params["failed"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    raise RuntimeError("the factory failed")
            return {"round": round_, "by": f"{os.getpid()}:{thread}"}
        return factory

    def work(thread: int) -> None:
        try:
            if mode == "incr":
                for _ in range(params["increments"]):
                    results[thread].append(state.incr("counter"))
                return
            if mode == "hold":  # take a lease and never finish (the test kills us)
                state.get_or_set("held", lambda: time.sleep(3600))
                return
            memoized = state.memoize(name="tests.compute")(
                lambda r, t=thread: factory_for(r, t)())
            for round_ in range(params["rounds"]):
                # Every process starts round r at the same moment.
                delay = params["start"] + round_ * params["round_seconds"] - time.time()
                if delay > 0:
                    time.sleep(delay)
                for attempt in range(3):
                    try:
                        if mode == "get_or_set":
                            value = state.get_or_set(f"k{round_}", factory_for(round_, thread))
                        else:
                            value = memoized(round_)
                        break
                    except RuntimeError:  # the injected factory failure: try again
                        if attempt == 2:
                            raise
                results[thread].append(value)
        except Exception as exc:  # reported to the test
            errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    state.close()
    with open(out_path, "w") as f:
        json.dump({"results": results, "errors": errors}, f)


if __name__ == "__main__":
    main()
