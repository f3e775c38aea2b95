"""Redis outages: a private redis-server on a free port behind a cuttable proxy.

Repository level: a cut or silent network fails fast with
BackendUnavailableError and the next call after the repair works; a server
restart needs nothing from the caller. Manager level (Redis HOT over SQLite
WARM): while HOT is unreachable reads come from WARM and writes still
succeed, and when HOT comes back it never serves a value older than a
successful ``set`` -- in this process or a new one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tiered_state
from tiered_state.errors import BackendUnavailableError
from tiered_state.record import Tier
from tiered_state.testing import make

from .servers import PrivateRedis as RedisServer
from .support import TCPProxy, require_module

redis = require_module("redis")

from tiered_state.repositories.redis_repository import (  # noqa: E402
    RedisStateRepository,
    unpack_record,
)

#: Timeouts the repositories under test are configured with, and the slack a
#: loaded CI machine gets on top of them.
SOCKET_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.25
SLACK = 0.5
TIMEOUTS = f"socket_timeout={SOCKET_TIMEOUT}&socket_connect_timeout={CONNECT_TIMEOUT}"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[TCPProxy]:
    prx = TCPProxy("127.0.0.1", server.port)
    yield prx
    prx.close()


@pytest.fixture
def repo(proxy: TCPProxy) -> Iterator[RedisStateRepository]:
    with RedisStateRepository.from_url(f"redis://{proxy.address}/0?{TIMEOUTS}") as r:
        yield r


def stored_payload(server: RedisServer, name: str) -> bytes | None:
    """The payload of the record Redis holds under ``name`` (raw GET, around
    the proxy), without its header; None if there is none."""
    data = server.raw_get(name)
    found = None if data is None else unpack_record(data)
    return None if found is None else found[0].encode()


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


# ---------------------------------------------------------------- repository level
@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_outage_fails_fast_and_heals(repo: RedisStateRepository, proxy: TCPProxy,
                                     fault: str) -> None:
    repo.store("k", *make("before"))
    getattr(proxy, fault)()
    bound = CONNECT_TIMEOUT + SOCKET_TIMEOUT + SLACK
    for call in (lambda: repo.fetch("k"), lambda: repo.store("k", *make("x")),
                 lambda: repo.fetch_many(["k"]), lambda: repo.keys()):
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            call()
        assert time.monotonic() - start < bound, fault
        assert isinstance(info.value.__cause__, redis.exceptions.RedisError)
    proxy.restore()
    assert repo.fetch("k") == "before"  # the very next call works
    repo.store("k", *make("after"))
    assert repo.fetch("k") == "after"


def test_server_restart_needs_nothing_from_the_caller(server: RedisServer,
                                                      repo: RedisStateRepository) -> None:
    repo.store("k", *make(1))
    repo.store("t", *make(1, ttl=60))  # loads the TTL Lua script on the server
    server.restart()  # no persistence: data and scripts are gone, pooled sockets dead
    assert repo.fetch("k") is None
    repo.store("k", *make(2))
    repo.store("t", *make(2, ttl=60))  # NOSCRIPT handled: script reloaded
    assert repo.fetch("k") == 2 and repo.fetch("t") == 2
    assert repo.store_if_newer("k", *make(3, version=5)) is True
    assert repo.stats()["key_count"] == 2


def test_server_down_then_back(server: RedisServer, repo: RedisStateRepository) -> None:
    repo.store("k", *make(1))
    server.stop()
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        repo.fetch("k")
    assert time.monotonic() - start < CONNECT_TIMEOUT + SOCKET_TIMEOUT + SLACK
    server.start()
    repo.store("k", *make(2))
    assert repo.fetch("k") == 2


# ---------------------------------------------------------------- manager level
@pytest.fixture
def urls(proxy: TCPProxy, tmp_path: Path) -> dict[str, str]:
    return {
        "hot": f"redis://{proxy.address}/0?{TIMEOUTS}&prefix=faults:",
        "warm": f"sqlite:///{tmp_path / 'warm.db'}",
        "cold": "none",
    }


@pytest.fixture
def state(urls: dict[str, str]) -> Iterator[tiered_state.StateManager]:
    with tiered_state.open(**urls) as manager:
        yield manager


def _hot(state: tiered_state.StateManager) -> RedisStateRepository:
    repo = state.repositories[Tier.HOT]
    inner = getattr(repo, "inner", repo)
    assert isinstance(inner, RedisStateRepository)
    return inner


def _reads_after_restore(state: tiered_state.StateManager, key: str, seconds: float = 2.5) -> set:
    """Every value ``get`` returns for a while after the repair (HOT retried meanwhile)."""
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(repr(state.get(key, default="<absent>")))
        time.sleep(0.05)
    return seen


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_manager_serves_from_warm_and_never_stale_after_outage(
    state: tiered_state.StateManager, proxy: TCPProxy, server: RedisServer, fault: str
) -> None:
    hot = _hot(state)
    state.set("position:BTC", {"qty": 1})
    state.set("other", "kept")
    assert hot.fetch("position:BTC") == {"qty": 1}  # HOT holds a copy
    getattr(proxy, fault)()
    bound = CONNECT_TIMEOUT + SOCKET_TIMEOUT + SLACK
    value, elapsed = timed(lambda: state.get("position:BTC"))
    assert value == {"qty": 1} and elapsed < bound
    version, elapsed = timed(lambda: state.set("position:BTC", {"qty": 2}))
    assert isinstance(version, int) and elapsed < bound
    assert state.get("position:BTC") == {"qty": 2}
    assert stored_payload(server, "faults:position:BTC") == b'{"qty":1}'  # the stale copy is there
    proxy.restore()
    # Redis still holds {"qty": 1}; no read may ever return it.
    assert _reads_after_restore(state, "position:BTC") == {repr({"qty": 2})}
    assert state.get("other") == "kept"
    # HOT is in use again and holds nothing stale.
    copy = hot.fetch("position:BTC")
    assert copy in (None, {"qty": 2})
    state.set("position:BTC", {"qty": 3})
    assert hot.fetch("position:BTC") == {"qty": 3}


def test_manager_delete_during_outage_is_not_undone(state: tiered_state.StateManager,
                                                    proxy: TCPProxy, server: RedisServer) -> None:
    state.set("gone", "value")
    proxy.cut()
    assert state.delete("gone") is True
    assert state.get("gone") is None
    assert stored_payload(server, "faults:gone") == b'"value"'
    proxy.restore()
    assert _reads_after_restore(state, "gone") == {repr("<absent>")}


def test_manager_new_process_after_outage_gets_no_stale_value(
    urls: dict[str, str], proxy: TCPProxy, server: RedisServer
) -> None:
    with tiered_state.open(**urls) as first:
        for _ in range(20):  # on a loaded machine a HOT write may time out: then again
            first.set("k", "old")
            first.set("d", "old")
            if stored_payload(server, "faults:k") == stored_payload(server, "faults:d") == b'"old"':
                break
            time.sleep(1.1)  # past the retry interval of a HOT marked down
        proxy.cut()
        first.set("k", "new")
        first.delete("d")
    assert stored_payload(server, "faults:k") == stored_payload(server, "faults:d") == b'"old"'
    proxy.restore()
    # Redis still holds k="old" and d="old"; a fresh process must see neither.
    script = (
        "import json, sys, tiered_state\n"
        "with tiered_state.open(hot=sys.argv[1], warm=sys.argv[2], cold='none') as s:\n"
        "    print(json.dumps([s.get('k'), s.get('d')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, urls["hot"], urls["warm"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '["new", null]'
    with tiered_state.open(**urls) as second:  # and a new manager in this process
        assert second.get("k") == "new" and second.get("d") is None


def test_manager_survives_redis_restart(state: tiered_state.StateManager,
                                        server: RedisServer) -> None:
    state.set("k", 1)
    server.restart()
    assert state.get("k") == 1  # from WARM; nothing for the caller to do
    state.set("k", 2)
    assert state.get("k") == 2
    assert _hot(state).fetch("k") == 2  # HOT was used again at once


def test_a_server_back_with_the_two_key_layout_serves_nothing_of_it(
    state: tiered_state.StateManager, server: RedisServer
) -> None:
    """Redis restarts from a snapshot taken before the upgrade to one key per
    record (tiered-state 0.1's layout, here with a stale copy of ``k`` whose
    version beats everything): the manager must read the catalog, and the
    old keys must go."""
    state.set("k", "new")
    state.set("gone", "x")
    state.delete("gone")
    server.restart()
    with server.client() as c:
        for key, payload in (("k", b'"old"'), ("gone", b'"stale"')):
            _, md = make(payload.decode(), version=2**63 - 1)
            c.set(f"faults:{key}", payload)
            c.set(f"faults:\x1fmeta:{key}", json.dumps(dict(md)))
    assert _reads_after_restore(state, "k", seconds=1.0) == {repr("new")}
    assert state.get("gone") is None and state.get_many(["k", "gone"]) == {"k": "new"}
    with server.client() as c:
        left = set(c.scan_iter(match="faults:*"))
    assert not any(b"\x1fmeta:" in name for name in left), left
    state.set("k", "newer")
    assert state.get("k") == "newer" and _hot(state).fetch("k") == "newer"
