"""Root conftest: the examples of the README, the tutorial and the docstrings run as doctests.

The README's and the tutorial's run in a scratch folder (they open stores in
the working directory). The examples in the docstrings of
:data:`DOCTEST_MODULES` -- the modules of the public API that carry them --
are collected here rather than with ``--doctest-modules``, which would also
import every helper module under ``tests/`` and every backend; these modules
import no optional driver. Each example gets ``tiered_state``, ``folder``
(an empty temporary folder, removed afterwards) and ``state``, a store
opened on ``folder / "state"`` and closed after the example.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.doctest import DoctestModule  # pytest exports no public name for it

ROOT = Path(__file__).resolve().parent
#: The modules whose docstring examples run with ``python -m pytest``.
DOCTEST_MODULES = frozenset(ROOT / "tiered_state" / name for name in (
    "cache.py",
    "codec.py",
    "config.py",
    "manager.py",
    "metrics.py",
    "operations.py",
    "policy.py",
    "record.py",
))

_ENV = ("TIERED_STATE_PATH", "TIERED_STATE_HOT", "TIERED_STATE_WARM", "TIERED_STATE_COLD",
        "TIERED_STATE_STATSD")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".py" and file_path.resolve() in DOCTEST_MODULES \
            and not parent.config.getoption("doctestmodules"):
        return DoctestModule.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _doctests_in_scratch_folder(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.__class__.__name__ != "DoctestItem":
        yield  # the other tests pay for no folder
        return
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(request.getfixturevalue("tmp_path"))
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    if request.node.path.suffix != ".py":  # README.rst, tutorial.rst: their own stores
        yield
        return
    import tiered_state

    namespace: dict[str, Any] = request.getfixturevalue("doctest_namespace")
    folder = Path(tempfile.mkdtemp(prefix="tiered-state-doctest-"))
    state = tiered_state.open(folder / "state")
    namespace.update(tiered_state=tiered_state, folder=folder, state=state)
    try:
        yield
    finally:
        for name in ("tiered_state", "folder", "state"):
            namespace.pop(name, None)
        state.close()
        shutil.rmtree(folder, ignore_errors=True)
