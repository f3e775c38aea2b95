from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import require_module, server_url, skip_forbidden


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Tests never see the developer's TIERED_STATE_* configuration or ./.tiered_state."""
    for name in list(os.environ):
        if name.startswith("TIERED_STATE_") and not name.startswith("TIERED_STATE_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Base URL of the real Redis (TIERED_STATE_TEST_REDIS_URL); needs the redis driver."""
    require_module("redis")
    return server_url("redis")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the real PostgreSQL (TIERED_STATE_TEST_POSTGRES_URL); needs psycopg2."""
    require_module("psycopg2")
    return server_url("postgres")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A private Redis Cluster (3 primaries + 3 replicas) for the session's tests
    that only read and write; tests that kill nodes start their own."""
    require_module("redis")
    from .servers import PrivateRedisCluster

    with PrivateRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[Any]:
    """A private primary + replica + three Sentinels, shared like redis_cluster."""
    require_module("redis")
    from .servers import PrivateSentinel

    with PrivateSentinel() as sentinel:
        yield sentinel


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def _forbid_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under TIERED_STATE_TEST_REQUIRE_ALL=1 (set by .ci/run) a skip is a failure.

    ``support.skip`` already fails instead of skipping; this catches every
    other skip (a plain ``pytest.skip``, a helper in ``servers.py``), by the
    same rule.
    """
    forbidden = skip_forbidden()
    if report.skipped and forbidden and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but {forbidden}: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    _forbid_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    # A module skipped as a whole (at import) never reaches runtest_makereport.
    outcome = yield
    _forbid_skip(outcome.get_result())


@pytest.fixture(scope="session")
def _s3_endpoint() -> Iterator[str]:
    """Base s3:// URL: TIERED_STATE_TEST_S3_URL, else moto's server mode on a free port.

    moto runs as a separate process and is spoken to over HTTP like any S3
    server; it is never an in-process mock. Without boto3 (or, with no URL,
    without moto) the S3 tests skip.
    """
    require_module("boto3")
    url = os.environ.get("TIERED_STATE_TEST_S3_URL", "").strip()
    if url:
        yield url
        return
    # moto.server, not moto: the server mode needs moto[server]'s flask too.
    require_module("moto.server")
    import subprocess

    from .support import free_port, wait_for_port

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield f"s3://tiered-state-test?endpoint_url=http://127.0.0.1:{port}&region=us-east-1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_url(_s3_endpoint: str) -> Iterator[str]:
    """An s3:// URL with a prefix of its own (bucket created if needed); emptied afterwards."""
    from urllib.parse import urlsplit, urlunsplit

    from .support import unique_name

    parts = urlsplit(_s3_endpoint)
    prefix = "/".join(p for p in (parts.path.strip("/"), unique_name("t")) if p)
    query = "&".join(q for q in (parts.query, "create_bucket=true") if q)
    yield urlunsplit(parts._replace(path="/" + prefix, query=query))
    from tiered_state.repositories.s3_repository import S3StateRepository

    with S3StateRepository.from_url(_s3_endpoint, create_bucket=True) as repo:
        repo._ready()  # creates the bucket if the test never touched it
        client, bucket = repo._client, repo.bucket
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
