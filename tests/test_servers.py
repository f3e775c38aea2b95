"""The private Redis topologies of tests/servers.py work as fault tests need them to.

Each topology starts on free ports, serves reads and writes through redis-py,
survives SIGKILL of its primary (failover within a bounded time, with every
write acknowledged by a replica -- WAIT 1 -- still readable), takes the
killed node back, and leaves no process or directory behind on close.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .servers import CLUSTER_BUS_OFFSET, PrivateRedisCluster, PrivateSentinel, topology_port
from .support import require_module

FAILOVER_BOUND = 15.0  # seconds; measured ~2.5 s with a 1 s node timeout / down-after
_T = TypeVar("_T")


def _eventually(call: Callable[[], _T], timeout: float = 10.0) -> _T:
    """``call()`` until it stops raising redis errors (a client finding the new topology)."""
    redis = require_module("redis")
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except redis.exceptions.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _gone(pids: list[int]) -> list[int]:
    """The pids among ``pids`` that still exist."""
    left = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        left.append(pid)
    return left


def test_topology_port_pairs_are_free_and_below_the_ephemeral_range() -> None:
    ports = {topology_port() for _ in range(20)}
    assert len(ports) == 20
    assert all(p + CLUSTER_BUS_OFFSET < 32768 for p in ports)


def test_cluster_serves_fails_over_rejoins_and_closes() -> None:
    cluster = PrivateRedisCluster()
    pids: list[int] = []
    root = cluster.root
    try:
        pids += cluster.pids
        assert len(pids) == 6
        primaries, replicas = cluster.primaries(), cluster.replicas()
        assert len(primaries) == 3 and len(replicas) == 3
        assert {n.role for n in primaries} == {"master"} and {n.role for n in replicas} == {"slave"}
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in primaries)
        assert cluster.url == f"redis+cluster://{hosts}/0"

        rc = cluster.client()
        try:
            for i in range(100):
                rc.set(f"k{i}", i)
            assert [rc.get(f"k{i}") for i in range(100)] == [str(i).encode() for i in range(100)]
            assert {cluster.primary_for(f"k{i}").port for i in range(100)} == {
                n.port for n in primaries}

            # Writes a replica acknowledged (WAIT on the connection that wrote them).
            doomed = cluster.primary_for("{tsfail}")
            with doomed.client() as direct:
                for i in range(50):
                    direct.set(f"{{tsfail}}:{i}", f"v{i}")
                assert direct.execute_command("WAIT", 1, 5000) == 1
            old_replicas = {e.id for e in cluster.view().values() if e.master_id == doomed.node_id}

            cluster.kill(doomed)
            seconds = cluster.wait_failover(doomed, timeout=FAILOVER_BOUND + 5)
            print(f"cluster failover: {seconds:.2f}s")
            assert seconds < FAILOVER_BOUND
            successor = cluster.primary_for("{tsfail}")
            assert successor is not doomed and successor.node_id in old_replicas

            # The client that knew the old topology finds the new one.
            values = _eventually(lambda: [rc.get(f"{{tsfail}}:{i}") for i in range(50)])
            assert values == [f"v{i}".encode() for i in range(50)]
            _eventually(lambda: rc.set("{tsfail}:after", "x"))
        finally:
            rc.close()

        cluster.restart(doomed)  # back as a replica of its successor, synced
        assert doomed.role == "slave" and doomed not in cluster.primaries()
        pids += cluster.pids
        with cluster.client() as fresh:
            assert fresh.get("{tsfail}:after") == b"x"
    finally:
        cluster.close()
    cluster.close()  # idempotent
    assert _gone(pids) == []
    assert not root.exists()


def test_sentinel_serves_fails_over_rejoins_and_closes() -> None:
    topo = PrivateSentinel()
    pids: list[int] = []
    root = topo.root
    try:
        pids += topo.pids
        assert len(pids) == 5
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in topo.sentinels)
        assert topo.url == f"redis+sentinel://{hosts}/tsmaster/0"
        first, second = topo.servers
        assert topo.primary() == first.address and second.role == "slave"

        sentinel = topo.sentinel_client()
        master: Any = sentinel.master_for("tsmaster", socket_timeout=2.0)
        try:
            with master.pipeline(transaction=False) as pipe:  # one connection: WAIT covers the SETs
                for i in range(50):
                    pipe.set(f"s{i}", f"v{i}")
                pipe.execute_command("WAIT", 1, 5000)
                assert pipe.execute()[-1] == 1

            old = topo.kill_primary()
            assert old == first.address
            seconds = topo.wait_failover(old, timeout=FAILOVER_BOUND + 5)
            print(f"sentinel failover: {seconds:.2f}s")
            assert seconds < FAILOVER_BOUND
            assert topo.primary() == second.address

            values = _eventually(lambda: [master.get(f"s{i}") for i in range(50)])
            assert values == [f"v{i}".encode() for i in range(50)]
            _eventually(lambda: master.set("after", "x"))
        finally:
            master.close()
            for client in sentinel.sentinels:
                client.close()

        topo.restart(first)  # comes back as a replica of the new primary
        assert first.role == "slave" and topo.primary() == second.address
        assert first.command("GET", "after") == "x"
        pids += topo.pids
    finally:
        topo.close()
    assert _gone(pids) == []
    assert not root.exists()
