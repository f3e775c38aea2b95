"""Root conftest: the README's examples run as doctests in a scratch folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _readme_in_scratch_folder(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.__class__.__name__ == "DoctestItem":
        monkeypatch.chdir(tmp_path)
        for name in ("TIERED_STATE_PATH", "TIERED_STATE_HOT", "TIERED_STATE_WARM",
                     "TIERED_STATE_COLD", "TIERED_STATE_STATSD"):
            monkeypatch.delenv(name, raising=False)
    yield
