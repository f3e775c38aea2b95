"""S3StateRepository against a real S3-compatible server over HTTP.

The server is TIERED_STATE_TEST_S3_URL (SeaweedFS in CI) or, without it,
moto's server mode in a subprocess on a free port (see ``conftest.s3_url``).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from tiered_state import codec
from tiered_state.config import open_repository
from tiered_state.errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    ConfigurationError,
)
from tiered_state.keys import matches
from tiered_state.record import make_stub, make_tombstone
from tiered_state.repositories.s3_repository import (
    S3StateRepository,
    decode_name,
    encode_name,
)
from tiered_state.testing import AWKWARD_KEYS, RepositoryContract, make, with_password

from .support import TCPProxy, free_port, require_module


@pytest.fixture
def repository(s3_url: str) -> Iterator[S3StateRepository]:
    with S3StateRepository.from_url(s3_url) as repo:
        yield repo


class TestS3Conformance(RepositoryContract):
    # The module-level ``repository`` fixture serves the suite.

    @pytest.fixture
    def repository_url(self, s3_url: str) -> str:
        return s3_url

    @pytest.fixture
    def secret_url(self, s3_url: str) -> str:
        """The secret in the endpoint's user info (an s3:// URL carrying
        credentials is refused; the endpoint's own is passed on)."""
        base, _, query = s3_url.partition("?")
        options = [f"endpoint_url={with_password(o.partition('=')[2])}"
                   if o.startswith("endpoint_url=") else o for o in query.split("&")]
        assert any(o.startswith("endpoint_url=") for o in options)
        return base + "?" + "&".join(options)

    @contextlib.contextmanager
    def break_key(self, repository: S3StateRepository, key: str) -> Iterator[None]:  # type: ignore[override]
        """The server answers AccessDenied to every request on ``key``'s
        objects (its data and its expiry marker) -- as a bucket policy would."""
        import botocore.exceptions

        real, name = repository._client, repository._name(key)

        def denied(operation: str) -> Exception:
            return botocore.exceptions.ClientError(
                {"Error": {"Code": "AccessDenied", "Message": "denied"},
                 "ResponseMetadata": {"HTTPStatusCode": 403}}, operation)

        class Denying:
            def __getattr__(self, attribute: str) -> Any:
                method = getattr(real, attribute)
                if not callable(method) or attribute in ("get_paginator", "can_paginate"):
                    return method

                def call(**kwargs: Any) -> Any:
                    if str(kwargs.get("Key", "")).endswith(name):
                        raise denied(attribute)
                    objects = kwargs.get("Delete", {}).get("Objects")
                    if objects:
                        refused = [o for o in objects if o["Key"].endswith(name)]
                        kwargs["Delete"]["Objects"] = [o for o in objects if o not in refused]
                        reply = method(**kwargs) if kwargs["Delete"]["Objects"] else {}
                        reply.setdefault("Errors", []).extend(
                            {"Key": o["Key"], "Code": "AccessDenied"} for o in refused)
                        return reply
                    return method(**kwargs)

                return call

        repository._client = Denying()
        try:
            yield
        finally:
            repository._client = real


def raw_object(repo: S3StateRepository, key: str) -> dict[str, Any]:
    """The object behind ``key``, read with plain boto3 calls."""
    name = repo._base + repo._name(key)
    return repo._client.get_object(Bucket=repo.bucket, Key=name)  # type: ignore[no-any-return]


def endpoint_of(repo: S3StateRepository) -> str:
    assert repo.endpoint_url is not None
    return repo.endpoint_url


# ---------------------------------------------------------------- key encoding
@pytest.mark.parametrize("key", [*AWKWARD_KEYS, "..", ".", "!bang", "~tilde", "a\u00a0b", "z\u200b"])
def test_names_are_reversible_and_flat(key: str) -> None:
    name = encode_name(key)
    assert decode_name(name) == key
    assert "/" not in name and name not in (".", "..") and not name.startswith("!")
    for cut in range(1, len(key)):  # the listing narrows by the name of a key's prefix
        assert name.startswith(encode_name(key[:cut]))


def test_foreign_names_are_not_keys() -> None:
    assert decode_name("%2") is None  # not an encoding we produce
    assert decode_name("a b") is None
    assert decode_name("%FF") is None


# ---------------------------------------------------------------- storage format
def test_plain_boto3_reads_what_the_library_wrote(repository: S3StateRepository) -> None:
    payload, metadata = make({"qty": 1.5, "note": "ünï"}, version=42)
    repository.store("position:BTC", payload, metadata)
    obj = raw_object(repository, "position:BTC")
    body = obj["Body"].read()
    assert body.decode("utf-8") == payload
    meta = obj["Metadata"]
    assert meta["checksum"] == hashlib.sha256(body).hexdigest() == metadata["checksum"]
    assert int(meta["version"]) == 42 and meta["encoding"] == "json"
    assert "expires-at" not in meta
    assert obj["ContentType"] == "application/json"
    head = repository._client.head_object(
        Bucket=repository.bucket, Key=repository._base + "position%3ABTC"
    )
    assert head.get("StorageClass", "STANDARD") == "STANDARD"


def test_compression_round_trip(s3_url: str) -> None:
    value = {"rows": ["the same line again"] * 2000}
    with S3StateRepository.from_url(s3_url) as repo:
        payload, metadata = make(value)
        repo.store("big", payload, metadata)
        obj = raw_object(repo, "big")
        body = obj["Body"].read()
        assert obj["Metadata"]["encoding"] == "json+zlib"
        assert len(body) < metadata["size_bytes"] // 10
        assert zlib.decompress(body).decode("utf-8") == payload
        entry = repo.fetch_record("big")
        assert entry is not None and entry.valid() and entry.metadata["encoding"] == "json"
        assert repo.fetch("big") == value
        # small payloads stay plain
        repo.store("small", *make({"a": 1}))
        assert raw_object(repo, "small")["Metadata"]["encoding"] == "json"
    with S3StateRepository.from_url(s3_url, compression=False) as repo:
        repo.store("big2", *make(value))
        obj = raw_object(repo, "big2")
        assert obj["Metadata"]["encoding"] == "json"
        assert codec.decode(obj["Body"].read().decode("utf-8")) == value
        assert repo.fetch("big") == value  # reads compressed objects all the same


def test_listing_2500_keys_returns_all(repository: S3StateRepository) -> None:
    keys = {f"item:{i:05d}" for i in range(2500)}
    assert repository.store_many({k: make(k) for k in keys}) == keys
    assert sorted(repository.keys()) == sorted(keys)
    assert len(repository.keys("item:01*")) == 1000
    assert repository.stats()["key_count"] == 2500


def test_long_keys_are_hashed_and_listed_exactly(repository: S3StateRepository) -> None:
    long_keys = ["k" * 1024, "é" * 512, "ab/" + "x" * 300, "ab" + "%" * 200]
    for i, key in enumerate(long_keys):
        repository.store(key, *make(i))
    for i, key in enumerate(long_keys):
        assert repository._name(key).startswith("!h")
        assert repository.fetch(key) == i
    assert sorted(repository.keys()) == sorted(long_keys)
    assert sorted(repository.keys("ab*")) == sorted(k for k in long_keys if matches("ab*", k))
    assert repository.keys("k" * 1024) == ["k" * 1024]
    assert repository.delete_many(long_keys) == len(long_keys)
    assert repository.keys() == []


def test_prefix_is_a_namespace(s3_url: str) -> None:
    base = s3_url.split("?")[0]
    query = s3_url.split("?", 1)[1]
    outer = S3StateRepository.from_url(f"{base}/x?{query}")
    inner = S3StateRepository.from_url(f"{base}/x/x?{query}")
    outer.store("x/y", *make("outer"))  # the prefix text inside the key: sliced, not replaced
    inner.store("k", *make("inner"))
    assert outer.keys() == ["x/y"] and inner.keys() == ["k"]
    assert outer.clear() == 1
    assert inner.fetch("k") == "inner"


# ---------------------------------------------------------------- options and errors
def test_storage_class_rejected_by_server_is_dropped(s3_url: str) -> None:
    with S3StateRepository.from_url(s3_url, storage_class="NO_SUCH_CLASS") as repo:
        repo.store("a", *make(1))
        assert repo.storage_class is None  # remembered: no second failed PUT
        repo.store("b", *make(2))
        assert repo.fetch("a") == 1 and repo.fetch("b") == 2


def sent_storage_classes(repo: S3StateRepository) -> dict[str, str | None]:
    """Object name -> the StorageClass each PutObject of ``repo`` sends from now on."""
    sent: dict[str, str | None] = {}

    def record(params: dict, **_: object) -> None:
        sent[params["Key"]] = params.get("StorageClass")

    repo._client.meta.events.register("provide-client-params.s3.PutObject", record)
    return sent


@pytest.mark.parametrize("storage_class", ["STANDARD_IA", "ONEZONE_IA", "GLACIER_IR"])
def test_small_objects_are_never_billed_as_128_kib(s3_url: str, storage_class: str) -> None:
    # SeaweedFS ignores the class; what the library asks for is what AWS bills.
    with S3StateRepository.from_url(s3_url, storage_class=storage_class, compression=False) as repo:
        sent = sent_storage_classes(repo)
        small, large = {"n": "x" * 1000}, {"n": "x" * (128 << 10)}
        repo.store("small", *make(small))
        repo.store("large", *make(large))
        assert sent == {repo._base + "small": None, repo._base + "large": storage_class}
        assert repo.fetch("small") == small and repo.fetch("large") == large
    forced = s3_url + f"&storage_class={storage_class}&force_storage_class=true"
    with open_repository(forced) as repo:
        sent = sent_storage_classes(repo)
        repo.store("small", *make(small, version=2))
        assert sent == {repo._base + "small": storage_class}


def test_default_storage_class_is_standard(s3_url: str) -> None:
    with S3StateRepository.from_url(s3_url) as repo:
        sent = sent_storage_classes(repo)
        repo.store("k", *make({"n": "x" * (200 << 10)}))
        assert list(sent.values()) == ["STANDARD"]


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
def test_classes_that_need_a_restore_are_refused(s3_url: str, storage_class: str) -> None:
    with pytest.raises(ConfigurationError, match="restored before they can be read"):
        open_repository(s3_url + f"&storage_class={storage_class}")


def test_missing_bucket_is_a_configuration_error(s3_url: str) -> None:
    endpoint = s3_url.split("endpoint_url=")[1].split("&")[0]
    url = f"s3://no-such-bucket-{time.time_ns()}/p?endpoint_url={endpoint}&region=us-east-1"
    repo = S3StateRepository.from_url(url)
    with pytest.raises(ConfigurationError, match="does not exist"):
        repo.store("k", *make(1))
    with pytest.raises(ConfigurationError):
        repo.keys()
    created = S3StateRepository.from_url(url, create_bucket=True)
    created.store("k", *make(1))
    assert created.fetch("k") == 1
    created.clear()
    created._client.delete_bucket(Bucket=created.bucket)


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    require_module("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")  # so the chain does not probe IMDS
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    port = free_port()  # nothing listens there
    repo = S3StateRepository("bucket", "p", endpoint_url=f"http://127.0.0.1:{port}",
                             region="us-east-1")
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        repo.fetch("k")
    assert time.monotonic() - start < 5
    assert info.value.__cause__ is not None


def test_lost_server_is_unavailable_and_comes_back(s3_url: str) -> None:
    endpoint = s3_url.split("endpoint_url=")[1].split("&")[0]
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    proxy = TCPProxy(host, int(port))
    try:
        url = s3_url.replace(endpoint, f"http://{proxy.address}")
        with S3StateRepository.from_url(url, read_timeout=0.2, retries=1) as repo:
            repo.store("k", *make(1))
            proxy.blackhole()
            start = time.monotonic()
            for call in (lambda: repo.fetch("k"), lambda: repo.keys(),
                         lambda: repo.store("k", *make(2)), lambda: repo.delete_many(["k"]),
                         lambda: repo.fetch_many(["k", "j"]), lambda: repo.store_many(
                             {"a": make(1), "b": make(2)})):
                with pytest.raises(BackendUnavailableError):
                    call()
            assert time.monotonic() - start < 15
            proxy.restore()
            assert repo.fetch("k") == 1
    finally:
        proxy.close()


def test_url_options_and_secrets(s3_url: str) -> None:
    repo = open_repository(s3_url + "&storage_class=STANDARD&compression=off&max_workers=4")
    assert isinstance(repo, S3StateRepository)
    assert (repo.storage_class, repo.compression, repo.max_workers) == ("STANDARD", False, 4)
    assert repo._client.meta.config.max_pool_connections >= 4
    with pytest.raises(ConfigurationError):
        open_repository(s3_url + "&bogus=1")
    with pytest.raises(ConfigurationError) as info:
        open_repository("s3://AKIDEXAMPLE:hunter2secret@bucket/p")
    assert "hunter2" not in str(info.value)
    assert "secret" not in repr(repo).lower()


def test_accepts_a_ready_client(s3_url: str, repository: S3StateRepository) -> None:
    repo = S3StateRepository(repository.bucket, repository.prefix, client=repository._client)
    repo.store("shared", *make("v"))
    assert repository.fetch("shared") == "v"


def test_delete_objects_errors_become_batch_error(repository: S3StateRepository) -> None:
    repository.store_many({"a": make(1), "b": make(2)})
    real = repository._client

    class FailingForB:
        """The real client, except DeleteObjects reports an error for key b."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def delete_objects(self, **kwargs: Any) -> dict[str, Any]:
            objects = kwargs["Delete"]["Objects"]
            bad = [o for o in objects if o["Key"].endswith("/b")]
            kwargs["Delete"]["Objects"] = [o for o in objects if o not in bad]
            response: dict[str, Any] = real.delete_objects(**kwargs)
            response["Errors"] = [{"Key": o["Key"], "Code": "AccessDenied"} for o in bad]
            return response

    repository._client = FailingForB()
    with pytest.raises(BatchError) as info:
        repository.delete_many(["a", "b", "absent"])
    assert set(info.value.failed) == {"b"}
    assert sorted(info.value.succeeded) == ["a", "absent"]
    repository._client = real
    assert repository.keys() == ["b"]


# ---------------------------------------------------------------- TTL
def test_expired_records_are_tombstones(repository: S3StateRepository) -> None:
    now = time.time()
    repository.store("gone", *make("old", 3, now=now - 100, ttl=10))
    repository.store("live", *make("x"))
    entry = repository.fetch_record("gone")
    assert entry is not None and entry.expired() and entry.version == 3
    assert repository.fetch("gone") is None
    assert repository.keys() == ["live"] and repository.keys("gone") == []
    assert sorted(repository.iter_all_keys()) == ["gone", "live"]
    assert [[e.key for e in b] for b in repository.scan(now=now)] == [["gone"]]
    tags = repository._client.get_object_tagging(
        Bucket=repository.bucket, Key=repository._base + "gone"
    )["TagSet"]
    assert {"Key": "tiered-state-ttl", "Value": "1"} in tags
    assert repository.delete("gone") is True
    names = [n for n, _ in repository._list("")]
    assert names == ["live"]  # the marker went with the record


def test_tombstone_object_and_its_marker(repository: S3StateRepository) -> None:
    repository.store("k", *make("v", 5))
    repository.store("live", *make("x"))
    tombstone = make_tombstone(6, now=time.time())
    assert repository.store_if_version("k", "", tombstone, expected=5) is True
    obj = raw_object(repository, "k")
    assert obj["Body"].read() == b""
    assert obj["Metadata"]["encoding"] == "tombstone"
    assert obj["Metadata"]["expires-at"] == "0.0"
    # Expired from birth, so marked: hidden from listings without a HEAD of
    # every object, and found by the expired-only scan, which reads markers.
    assert [n for n, _ in repository._list("!e")] == ["!ek"]
    assert repository.keys() == ["live"] and list(repository.iter_keys("k*")) == []
    assert repository.stats()["key_count"] == 1
    assert [[(e.key, e.kind) for e in b] for b in repository.scan()] == [[("k", "tombstone")]]
    assert sorted(repository.iter_all_keys()) == ["k", "live"]
    assert repository.delete_if_version("k", 6) is True
    assert [n for n, _ in repository._list("")] == ["live"]  # the marker went too


def test_compressed_stub_keeps_its_kind(s3_url: str) -> None:
    with S3StateRepository.from_url(s3_url, compress_min_bytes=10) as repo:
        payload, metadata = make({"x": 1}, 9)
        locator, stub = make_stub(metadata, '{"name":"' + "loc" * 100 + '"}')
        repo.store("k", locator, stub)
        assert raw_object(repo, "k")["Metadata"]["encoding"] == "stub+zlib"
        entry = repo.fetch_record("k")
        assert entry is not None and entry.kind == "stub" and entry.payload == locator
        assert repo.fetch("k") is None and repo.keys() == ["k"]
        # The conditions read the entry's kind from a HEAD, never "stub+zlib".
        assert repo.store_if_version("k", payload, metadata, expected=9) is True
        assert repo.fetch("k") == {"x": 1}


#: Payload names as the manager builds them: ``<key>@<16 hex digits of the version>``.
PAYLOAD_KEYS = [
    "p" * 1000 + "@0123456789abcdef",  # hashed: longer than max_name_bytes
    "%" * 100 + "@0123456789abcdef",  # hashed: percent-encoding triples it
    "user:42@0123456789abcdef",
    "é@ffffffffffffffff",
    "~" + "0" * 64 + "~0123456789abcdef",  # the catalog's name for a key too long for "@"
]


def test_payload_keys_round_trip(repository: S3StateRepository) -> None:
    assert [repository._name(k).startswith("!h") for k in PAYLOAD_KEYS] == [True, True, False, False, False]
    items = {k: make({"key": k}, 7) for k in PAYLOAD_KEYS}
    assert repository.store_many_if_newer(items) == set(PAYLOAD_KEYS)
    assert repository.store_many_if_newer(items) == set()  # written once
    assert repository.store_if_newer(PAYLOAD_KEYS[0], *items[PAYLOAD_KEYS[0]]) is False
    for key in PAYLOAD_KEYS:
        assert repository.fetch(key) == {"key": key}
    got = repository.fetch_many(PAYLOAD_KEYS)
    assert set(got) == set(PAYLOAD_KEYS) and all(e.valid() for e in got.values())
    assert sorted(repository.iter_all_keys()) == sorted(PAYLOAD_KEYS)
    assert sorted(repository.keys("*@0123456789abcdef")) == sorted(PAYLOAD_KEYS[:3])
    assert repository.keys(PAYLOAD_KEYS[0]) == [PAYLOAD_KEYS[0]]
    assert repository.delete_many_if_version(dict.fromkeys(PAYLOAD_KEYS[:2], 7)) == set(
        PAYLOAD_KEYS[:2])
    assert sorted(repository.iter_all_keys()) == sorted(PAYLOAD_KEYS[2:])


def test_iter_all_keys_pages_past_the_markers(repository: S3StateRepository) -> None:
    now = time.time()
    expired = {f"e{i:04d}": make(i, now=now - 100, ttl=10) for i in range(1100)}
    repository.store_many({**expired, "plain": make(0), "k" * 1024: make(1)})
    real = repository._client
    pages: list[tuple[dict[str, Any], list[str]]] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
            page: dict[str, Any] = real.list_objects_v2(**kwargs)
            pages.append((kwargs, [o["Key"] for o in page.get("Contents", ())]))
            return page

    repository._client = Recording()
    walk = repository.iter_all_keys()
    first = next(walk)
    assert len(pages) == 1  # streamed: one page so far
    keys = {first, *walk}
    assert keys == {*expired, "plain", "k" * 1024}
    whole = [names for kwargs, names in pages if kwargs["Prefix"] == repository._base]
    assert len(whole) == 2  # 1101 names, two pages, none of them a marker
    assert not any(n[len(repository._base):].startswith("!") for names in whole for n in names)


# ---------------------------------------------------------------- concurrency
def test_store_many_if_version_is_atomic_across_clients(s3_url: str) -> None:
    repos = [S3StateRepository.from_url(s3_url) for _ in range(4)]
    keys = [f"lock{i}" for i in range(10)]
    barrier = threading.Barrier(len(repos))
    wins: dict[int, set[str]] = {}

    def race(i: int) -> None:
        barrier.wait()
        wins[i] = repos[i].store_many_if_version(
            {k: make(i, 100 + i) for k in keys}, dict.fromkeys(keys, 0))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(repos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in keys:
        (winner,) = [i for i, won in wins.items() if key in won]  # exactly one per key
        assert repos[0].fetch(key) == winner
    for repo in repos:
        repo.close()


def test_batch_conditionals_tell_failed_from_refused(repository: S3StateRepository) -> None:
    repository.store("c", *make("c", 9))
    real = repository._client

    class FailingForB:
        """The real client, except every PUT of key b fails."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def put_object(self, **kwargs: Any) -> Any:
            if kwargs["Key"].endswith("/b"):
                import botocore.exceptions

                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "InternalError", "Message": "boom"},
                     "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")
            return real.put_object(**kwargs)

    repository._client = FailingForB()
    items = {"a": make("a", 5), "b": make("b", 5), "c": make("c", 5)}  # c: older, refused
    with pytest.raises(BatchError) as info:
        repository.store_many_if_newer(items)
    assert set(info.value.failed) == {"b"} and info.value.succeeded == ["a"]
    with pytest.raises(BatchError) as info:
        repository.store_many_if_version({"b": make("b", 6), "c": make("c", 10)}, {"b": 0, "c": 8})
    assert set(info.value.failed) == {"b"} and info.value.succeeded == []
    repository._client = real
    assert repository.fetch("a") == "a" and repository.fetch("b") is None
    assert repository.fetch_record("c").version == 9  # type: ignore[union-attr]


def test_store_if_version_is_atomic_across_clients(s3_url: str) -> None:
    repos = [S3StateRepository.from_url(s3_url) for _ in range(6)]
    barrier = threading.Barrier(len(repos))
    wins: list[int] = []

    def race(i: int) -> None:
        barrier.wait()
        if repos[i].store_if_version("lock", *make(i, 100 + i), expected=0):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(repos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert repos[0].fetch("lock") == wins[0]


def test_conditional_off_uses_read_compare_write(s3_url: str) -> None:
    with S3StateRepository.from_url(s3_url, conditional="off") as repo:
        assert repo.store_if_version("k", *make("a", 5), expected=0)
        assert not repo.store_if_version("k", *make("b", 6), expected=4)
        assert repo.store_if_newer("k", *make("c", 7))
        assert not repo.delete_if_version("k", 5)
        assert repo.delete_if_version("k", 7)


def test_delete_many_if_version(repository: S3StateRepository) -> None:
    repository.store_many({f"k{i}": make(i, 10) for i in range(20)})
    versions = {f"k{i}": (10 if i % 2 else 9) for i in range(20)}
    deleted = repository.delete_many_if_version(versions)
    assert deleted == {f"k{i}" for i in range(1, 20, 2)}
    assert len(repository.keys()) == 10


def test_errors_never_leak_raw_botocore(repository: S3StateRepository) -> None:
    real = repository._client

    class Broken:
        def __getattr__(self, name: str) -> Any:
            attr = getattr(real, name)
            if name in ("meta", "exceptions"):
                return attr

            def fail(**kwargs: Any) -> Any:
                import botocore.exceptions

                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "InternalError", "Message": "boom"},
                     "ResponseMetadata": {"HTTPStatusCode": 500}}, name)

            return fail

    repository._client = Broken()
    for call in (lambda: repository.fetch("k"), lambda: repository.store("k", *make(1)),
                 lambda: repository.keys(), lambda: repository.delete("k"),
                 lambda: repository.store_if_version("k", *make(1), expected=0)):
        with pytest.raises(BackendError) as info:
            call()
        assert "InternalError" in str(info.value)
        assert not isinstance(info.value, BackendUnavailableError)


# ---------------------------------------------------------------- damaged metadata
def test_object_metadata_carries_a_checksum_that_reads_check(repository: S3StateRepository) -> None:
    from tiered_state.errors import IntegrityError
    from tiered_state.record import metadata_checksum

    payload, metadata = make({"a": 1}, 3)
    repository.store("k", payload, metadata)
    repository.store("other", *make("fine", 4))
    stored = raw_object(repository, "k")
    meta = dict(stored["Metadata"])
    assert meta["metadata-checksum"] == metadata_checksum("k", metadata, "json")
    name = repository._base + repository._name("k")
    damaged = {**meta, "version": "2"}
    repository._client.put_object(Bucket=repository.bucket, Key=name,
                                  Body=stored["Body"].read(), Metadata=damaged)
    with pytest.raises(IntegrityError) as info:
        repository.fetch_record("k")
    assert info.value.key == "k"
    with pytest.raises(BatchError) as batch:
        repository.fetch_many(["k", "other"])
    assert isinstance(batch.value.failed["k"], IntegrityError)
    assert batch.value.succeeded == ["other"]
    assert sorted(repository.keys()) == ["k", "other"]  # listings never read metadata here
    # A conditional write finds no version it can trust to keep.
    assert not repository.delete_if_version("k", 2)
