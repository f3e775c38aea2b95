"""The behaviour every repository must show, as a pytest suite a backend's tests subclass.

**For tests only.** This module imports :mod:`pytest`, which tiered-state does
not depend on; nothing in tiered-state imports it. A backend -- one of the
project's or a third party's -- subclasses :class:`RepositoryContract` in its
test module and provides two fixtures:

``repository``
    a fresh, empty repository (its own namespace, table, prefix or folder),
    cleaned up afterwards;
``repository_url``
    the URL that opens the store ``repository`` uses, namespace included
    (what :func:`tiered_state.config.open_repository` is given).

::

    import pytest
    from tiered_state.testing import RepositoryContract

    class TestDynamoContract(RepositoryContract):
        @pytest.fixture
        def repository(self, table):
            with DynamoStateRepository(table) as repo:
                yield repo

        @pytest.fixture
        def repository_url(self, table):
            return f"dynamo://{table}"

Optional hooks, each documented where it is defined: :attr:`~RepositoryContract.ttl_seconds`,
:attr:`~RepositoryContract.takes_no_secret` or the ``secret_url`` fixture, and
:meth:`~RepositoryContract.break_key` or :attr:`~RepositoryContract.cannot_break_keys`.

The contract itself is documented in :mod:`tiered_state.repositories.base`.
Tests marked ``[instrumented]`` run twice: on the repository and through the
metrics proxy (:class:`~tiered_state.metrics.InstrumentedRepository`), which
must not change what any call does; together they call every method of the
contract.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from . import codec
from .config import open_repository
from .errors import BackendError, BatchError, IntegrityError, InvalidKeyError, TieredStateError
from .keys import matches
from .metrics import InMemoryMetrics, InstrumentedRepository
from .record import Entry, Metadata, make_metadata, make_stub, make_tombstone
from .repositories.base import StateRepository

__all__ = [
    "AWKWARD_KEYS",
    "INVALID_KEYS",
    "PATTERNS",
    "SECRET",
    "RepositoryContract",
    "make",
    "same_metadata",
    "with_password",
]

#: Keys that break naive backends: SQL LIKE and glob metacharacters, path
#: tricks, whitespace, non-ASCII and the longest key allowed.
AWKWARD_KEYS = [
    "plain",
    "with space",
    "a/b/c",
    "/leading-slash",
    "..",
    "../escape",
    "a/../../b",
    ".hidden",
    "100%",
    "a_b",
    "a%b_c",
    "back\\slash",
    "star*key",
    "what?",
    "[bracket]",
    "caret^",
    "dollar$",
    "quote'\"",
    "colon:semi;",
    "CaseSensitive",
    "casesensitive",
    "ünïcödé-κλειδί-键",
    "emoji-🔑",
    "trailing.",
    "trailing ",
    "x" * 1024,
    "é" * 512,
]

#: Keys a repository must refuse before any I/O.
INVALID_KEYS: list[Any] = [
    "",
    "nul\x00byte",
    "new\nline",
    "tab\tkey",
    "del\x7f",
    "c1\x85",
    "x" * 1025,
    "é" * 513,
    "lone\ud800surrogate",
    None,
    42,
    b"bytes",
]

#: Globs whose matches among AWKWARD_KEYS-like sets are checked against the
#: reference matcher (:func:`tiered_state.keys.matches`) rather than spelled out.
PATTERNS = [
    "*",
    "a*",
    "a/*",
    "*%",
    "100%",
    "a_b",
    "a?b",
    "a%b*",
    "*\\*key",
    "what\\?",
    "\\[bracket]",
    "[ab]*",
    "[!a]*",
    "[^a-c]*",
    "*/*",
    "ünï*",
    "*🔑",
    "back\\\\slash",
    "[[]bracket]",
    "*e",
    "Case*",
    "?",
]

#: The made-up password the secret test configures; it must show nowhere.
SECRET = "Qv7-made-up-S3cret-Zk4"  # noqa: S105 - made up, to be looked for

#: A backend's name names metrics and log lines: lower-case, no separators.
_BACKEND_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

#: The tests that also run through the metrics proxy (see the module docstring).
_instrumented = pytest.mark.parametrize("subject", ["plain", "instrumented"], indirect=True)


def make(
    value: Any, version: int = 1, *, ttl: float | None = None, now: float | None = None
) -> tuple[str, Metadata]:
    """A ``(payload, metadata)`` pair as the manager would store it."""
    payload = codec.encode(value)
    return payload, make_metadata(payload, version, now=time.time() if now is None else now, ttl=ttl)


def run_threads(work: Callable[[int], None], count: int = 4, timeout: float = 60.0) -> None:
    """Run ``work(0)`` .. ``work(count - 1)`` on threads at once; fail the test
    on the first exception any of them raised, or if one is still running
    after ``timeout`` seconds (a hung backend must not hang the suite)."""
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # noqa: BLE001 - reported by the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {timeout} s"
    if errors:
        raise errors[0]


def same_metadata(got: Metadata, want: Metadata) -> bool:
    """Metadata equal, allowing timestamps the store keeps to the microsecond."""
    for field in ("checksum", "size_bytes", "version", "encoding"):
        if got[field] != want[field]:  # type: ignore[literal-required]
            return False
    for field in ("created_at", "updated_at", "expires_at"):
        a, b = got[field], want[field]  # type: ignore[literal-required]
        if (a is None) != (b is None):
            return False
        if a is not None and abs(a - b) > 0.002:
            return False
    return True


def with_password(url: str, password: str = SECRET) -> str:
    """``url`` with ``password`` (percent-encoded) as the password of its user info,
    the user name kept."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hosts}"))


def _signature_problems(cls: type[StateRepository], name: str) -> list[str]:
    """Why ``cls.name`` cannot be called the way the contract calls it (empty: it can).

    Every call the base signature allows must be one the override accepts:
    each base parameter, at the same position and under the same name,
    optional where the base's is, and any parameter the override adds optional.
    """
    try:
        want = inspect.signature(getattr(StateRepository, name))
        have = inspect.signature(getattr(cls, name))
    except (TypeError, ValueError):  # a C-level callable: nothing to compare
        return []
    where = f"{cls.__name__}.{name}{have} (the contract: {name}{want})"
    params = list(have.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    by_name = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems = []
    matched: set[str] = set()
    index = 0
    for base in want.parameters.values():
        if base.kind is base.VAR_POSITIONAL:
            if not var_positional:
                problems.append(f"{where}: takes no *{base.name}")
            continue
        if base.kind is base.VAR_KEYWORD:
            if not var_keyword:
                problems.append(f"{where}: takes no **{base.name}")
            continue
        found: inspect.Parameter | None = None
        if base.kind in (base.POSITIONAL_ONLY, base.POSITIONAL_OR_KEYWORD):
            if index < len(positional):
                found = positional[index]
                if base.kind is base.POSITIONAL_OR_KEYWORD and found.name != base.name:
                    problems.append(f"{where}: parameter {index + 1} is {found.name!r}, "
                                    f"not {base.name!r}")
            elif not var_positional:
                problems.append(f"{where}: does not take {base.name!r} by position")
            index += 1
        else:
            found = by_name.get(base.name)
            if found is None and not var_keyword:
                problems.append(f"{where}: does not take the keyword {base.name!r}")
        if found is not None:
            matched.add(found.name)
            if base.default is not base.empty and found.default is found.empty:
                problems.append(f"{where}: {base.name!r} must be optional")
    for extra in params:
        if (extra.name not in matched and extra.default is extra.empty
                and extra.kind not in (extra.VAR_POSITIONAL, extra.VAR_KEYWORD)):
            problems.append(f"{where}: the added parameter {extra.name!r} must be optional")
    return problems


def _contract_methods() -> list[str]:
    """The public methods of the contract (from_url included)."""
    return sorted(name for name, member in vars(StateRepository).items()
                  if not name.startswith("_") and callable(getattr(StateRepository, name))
                  and (inspect.isfunction(member) or isinstance(member, classmethod)))


def _texts(exc: BaseException) -> list[str]:
    """What a user may see of ``exc``: its message and repr, and those of its
    causes and, for a batch, of each key's error."""
    out: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        out += [str(item), repr(item)]
        pending += [item.__cause__, item.__context__]
        if isinstance(item, BatchError):
            pending += list(item.failed.values())
    return out


class RepositoryContract:
    """Subclass and provide the fixtures ``repository`` (a fresh, empty
    repository) and ``repository_url`` (the URL of its store); see the module
    docstring."""

    #: Seconds a short TTL test waits; stores with coarse expiry may raise it.
    ttl_seconds: ClassVar[float] = 1.0

    #: For a backend whose URL and options can hold no secret (no password,
    #: key or token: ``memory://``, a file path), the reason, in words; the
    #: secret test then only checks that one is given. Otherwise leave None
    #: and make ``secret_url`` hold :data:`SECRET`.
    takes_no_secret: ClassVar[str | None] = None

    #: For a backend that cannot make the store refuse one key while it
    #: serves the others (see :meth:`break_key`), the reason, in words.
    cannot_break_keys: ClassVar[str | None] = None

    # ------------------------------------------------------------ hooks
    @pytest.fixture
    def repository_url(self) -> str:
        """The URL that opens the store the ``repository`` fixture uses. Override."""
        pytest.fail(f"{type(self).__name__} must provide a 'repository_url' fixture: "
                    "the URL of the store its 'repository' fixture uses")

    @pytest.fixture
    def secret_url(self, repository_url: str) -> str:
        """A URL of the same store configured with :data:`SECRET` as its password
        (or secret key, or token). The default puts it in the URL's user info;
        a server that accepts any password (PostgreSQL's trust authentication)
        then serves the calls, one that refuses it makes them fail, and either
        way nothing may show it. Override where the secret goes elsewhere."""
        return with_password(repository_url)

    def break_key(
        self, repository: StateRepository, key: str
    ) -> contextlib.AbstractContextManager[object] | None:
        """A context manager inside which the *store* (not tiered-state) refuses
        writes and deletes of ``key`` -- a trigger, a permission, a value of
        the wrong type -- while it serves every other key. Leaving it lifts
        the refusal (it may lose what ``key`` held). None: the backend cannot
        (say why in :attr:`cannot_break_keys`). Override."""
        return None

    @pytest.fixture
    def subject(self, repository: StateRepository, request: pytest.FixtureRequest
                ) -> StateRepository:
        """What a contract test calls: ``repository``, or, for the ``[instrumented]``
        run of a test, ``repository`` behind the metrics proxy."""
        if getattr(request, "param", "plain") == "instrumented":
            return InstrumentedRepository(repository, InMemoryMetrics())
        return repository

    # ------------------------------------------------------------ the interface
    @_instrumented
    def test_implements_the_contract(self, subject: StateRepository,
                                     repository: StateRepository) -> None:
        """Checks what the type system cannot: each method takes every call the
        contract makes, the base's defaults are only inherited where they are
        correct, and the metrics proxy forwards whatever the backend overrides."""
        cls = type(repository)
        problems: list[str] = []
        backend = cls.backend
        if not (isinstance(backend, str) and _BACKEND_NAME.match(backend)) or backend == "base":
            problems.append(f"{cls.__name__}.backend is {backend!r}: give the backend a name "
                            "(lower-case letters, digits, '_'; it names metrics and log lines)")
        if cls.from_url.__func__ is StateRepository.from_url.__func__:  # type: ignore[attr-defined]
            problems.append(f"{cls.__name__} has no from_url: URLs cannot open it")
        if not cls.volatile and cls.iter_all_keys is StateRepository.iter_all_keys:
            problems.append(f"{cls.__name__} is durable but inherits iter_all_keys, which lists "
                            "live keys only: scan and clear would miss its expired entries and "
                            "tombstones")
        for name in _contract_methods():
            problems += _signature_problems(cls, name)
        if subject is not repository:  # the proxy: it must hide none of the backend's own
            proxy = type(subject)
            for name in _contract_methods():
                if name == "from_url":
                    continue
                own = getattr(cls, name) is not getattr(StateRepository, name)
                if own and getattr(proxy, name) is getattr(StateRepository, name):
                    problems.append(f"{proxy.__name__} does not forward {name}: the backend's "
                                    f"own {cls.__name__}.{name} would be replaced by the default")
            if hasattr(repository, "fetch_payload") != hasattr(subject, "fetch_payload"):
                problems.append(f"{proxy.__name__} changes whether fetch_payload exists")
        assert not problems, "\n".join(problems)

    # ------------------------------------------------------------ basics
    @_instrumented
    def test_round_trip(self, subject: StateRepository) -> None:
        value = {"qty": 1.5, "side": "buy", "fills": [1, 2, 3], "note": "ünï", "none": None}
        payload, metadata = make(value, version=7)
        assert subject.store("position:BTC", payload, metadata) is True
        assert subject.fetch("position:BTC") == value
        entry = subject.fetch_record("position:BTC")
        assert isinstance(entry, Entry)
        assert entry.key == "position:BTC"
        assert codec.decode(entry.payload) == value
        assert entry.valid()
        assert same_metadata(entry.metadata, metadata)

    @pytest.mark.parametrize(
        "value", [0, -1, 2**70, 1.25, 1e300, "", "text", True, False, None, [], {}, [[{"a": [None]}]]]
    )
    def test_json_values(self, subject: StateRepository, value: Any) -> None:
        subject.store("v", *make(value))
        entry = subject.fetch_record("v")
        assert entry is not None and entry.valid()
        got = subject.fetch("v")
        assert got == value and type(got) is type(value)

    @_instrumented
    def test_overwrite(self, subject: StateRepository) -> None:
        subject.store("k", *make("one", 1))
        subject.store("k", *make("two", 2))
        assert subject.fetch("k") == "two"
        entry = subject.fetch_record("k")
        assert entry is not None and entry.version == 2
        assert subject.keys("*") == ["k"]

    @_instrumented
    def test_corrupt_payload_is_never_returned(self, subject: StateRepository) -> None:
        _, metadata = make({"a": 1})
        subject.store("k", codec.encode({"a": 2}), metadata)  # checksum of another payload
        with pytest.raises(IntegrityError):
            subject.fetch("k")
        entry = subject.fetch_record("k")
        assert entry is not None and not entry.valid()

    @_instrumented
    def test_absent_key(self, subject: StateRepository) -> None:
        assert subject.fetch("missing") is None
        assert subject.fetch_record("missing") is None
        assert subject.delete("missing") is False
        assert subject.fetch_many(["missing"]) == {}

    @_instrumented
    def test_delete_is_idempotent(self, subject: StateRepository) -> None:
        subject.store("k", *make(1))
        assert subject.delete("k") is True
        assert subject.delete("k") is False
        assert subject.fetch("k") is None
        assert subject.keys() == []

    def test_large_value(self, subject: StateRepository) -> None:
        value = {"blob": "x" * 300_000, "items": list(range(5000))}
        subject.store("big", *make(value))
        assert subject.fetch("big") == value

    # ------------------------------------------------------------ keys
    def test_awkward_keys_round_trip(self, subject: StateRepository) -> None:
        for i, key in enumerate(AWKWARD_KEYS):
            subject.store(key, *make({"i": i, "key": key}))
        for i, key in enumerate(AWKWARD_KEYS):
            assert subject.fetch(key) == {"i": i, "key": key}, key
        assert sorted(subject.keys("*")) == sorted(AWKWARD_KEYS)
        assert subject.delete_many(AWKWARD_KEYS) == len(AWKWARD_KEYS)
        assert subject.keys("*") == []

    @pytest.mark.parametrize("pattern", PATTERNS)
    def test_glob_matches_reference(self, subject: StateRepository, pattern: str) -> None:
        keys = [k for k in AWKWARD_KEYS if len(k) < 100] + [
            "a", "ab", "b", "abc", "a/x", "bb/cc", "100", "1000%", "aXb", "a%bzz", "e",
        ]
        subject.store_many({k: make(k) for k in keys})
        want = sorted(k for k in keys if matches(pattern, k))
        assert sorted(subject.keys(pattern)) == want
        assert sorted(subject.iter_keys(pattern)) == want

    @pytest.mark.parametrize("key", INVALID_KEYS, ids=repr)
    def test_invalid_keys_rejected_before_io(self, subject: StateRepository, key: Any) -> None:
        payload, metadata = make(1)
        with pytest.raises(InvalidKeyError):
            subject.store(key, payload, metadata)
        with pytest.raises(InvalidKeyError):
            subject.fetch(key)
        with pytest.raises(InvalidKeyError):
            subject.fetch_record(key)
        with pytest.raises(InvalidKeyError):
            subject.delete(key)
        with pytest.raises(InvalidKeyError):
            subject.store_many({"good": (payload, metadata), key: (payload, metadata)})
        with pytest.raises(InvalidKeyError):
            subject.delete_many(["good", key])
        with pytest.raises(InvalidKeyError):
            subject.fetch_many(["good", key])
        # nothing at all was written by the refused batch
        assert subject.fetch("good") is None
        assert subject.keys() == []

    @_instrumented
    def test_invalid_key_in_conditional_batches(self, subject: StateRepository) -> None:
        payload, metadata = make(1, 3)
        bad = "new\nline"
        with pytest.raises(InvalidKeyError):
            subject.store_many_if_newer({"good": (payload, metadata), bad: (payload, metadata)})
        with pytest.raises(InvalidKeyError):
            subject.store_many_if_version({"good": (payload, metadata), bad: (payload, metadata)},
                                          {"good": 0, bad: 0})
        subject.store("good", payload, metadata)
        with pytest.raises(InvalidKeyError):
            subject.delete_many_if_version({"good": 3, bad: 3})
        assert subject.keys() == ["good"] and subject.fetch("good") == 1

    # ------------------------------------------------------------ TTL
    def test_ttl_expiry(self, subject: StateRepository) -> None:
        subject.store("short", *make("s", ttl=self.ttl_seconds))
        subject.store("forever", *make("f"))
        assert subject.fetch("short") == "s"
        time.sleep(self.ttl_seconds + 0.3)
        assert subject.fetch("short") is None
        assert subject.fetch("forever") == "f"
        assert subject.keys("*") == ["forever"]
        assert subject.stats()["key_count"] == 1
        entry = subject.fetch_record("short")
        assert entry is None or entry.expired()

    @_instrumented
    def test_already_expired_record_is_never_shown(self, subject: StateRepository) -> None:
        payload, metadata = make("old", now=time.time() - 10, ttl=5)
        subject.store("gone", payload, metadata)
        subject.store_many({"gone2": (payload, metadata), "live": make("x")})
        assert subject.fetch("gone") is None
        assert subject.fetch("gone2") is None
        assert subject.keys() == ["live"]

    @_instrumented
    def test_expiry_kept_in_metadata(self, subject: StateRepository) -> None:
        payload, metadata = make("v", ttl=3600)
        subject.store("k", payload, metadata)
        entry = subject.fetch_record("k")
        assert entry is not None and entry.expires_at is not None
        assert abs(entry.expires_at - metadata["expires_at"]) < 0.002  # type: ignore[operator]

    # ------------------------------------------------------------ batches
    @_instrumented
    def test_store_many_empty(self, subject: StateRepository) -> None:
        assert subject.store_many({}) == set()
        assert subject.delete_many([]) == 0
        assert subject.fetch_many([]) == {}
        assert subject.delete_many_if_version({}) == set()

    def test_store_many_and_fetch_many(self, subject: StateRepository) -> None:
        items = {f"k{i:05d}": make({"i": i}) for i in range(1500)}
        assert subject.store_many(items) == set(items)
        got = subject.fetch_many([*items, "absent"])
        assert set(got) == set(items)
        assert all(codec.decode(e.payload) == {"i": int(k[1:])} for k, e in got.items())
        assert all(e.valid() for e in got.values())
        assert len(subject.keys("k*")) == 1500
        assert subject.stats()["key_count"] == 1500

    @_instrumented
    def test_store_many_overwrites(self, subject: StateRepository) -> None:
        subject.store_many({"a": make(1, 1), "b": make(1, 1)})
        subject.store_many({"a": make(2, 2), "c": make(2, 2)})
        assert subject.fetch("a") == 2 and subject.fetch("b") == 1
        assert subject.fetch("c") == 2

    def test_store_many_mixed_ttls(self, subject: StateRepository) -> None:
        subject.store_many({
            "short": make("s", ttl=self.ttl_seconds),
            "long": make("l", ttl=3600),
            "none": make("n"),
        })
        time.sleep(self.ttl_seconds + 0.3)
        assert sorted(subject.keys()) == ["long", "none"]

    def test_delete_many_mixed(self, subject: StateRepository) -> None:
        subject.store_many({f"d{i}": make(i) for i in range(1200)})
        keys = [f"d{i}" for i in range(0, 1200, 2)] + ["absent1", "absent2"]
        assert subject.delete_many(keys) == 600
        assert len(subject.keys("d*")) == 600
        assert subject.fetch("d0") is None and subject.fetch("d1") == 1

    @_instrumented
    def test_delete_many_duplicates_count_once(self, subject: StateRepository) -> None:
        subject.store("a", *make(1))
        assert subject.delete_many(["a", "a"]) == 1
        assert subject.delete_many(iter(["a", "b"])) == 0  # any iterable, once

    @_instrumented
    def test_batch_failure_is_reported_per_key(self, subject: StateRepository,
                                               repository: StateRepository) -> None:
        """The store refuses one key of each batch (:meth:`break_key`): the
        batch raises BatchError naming that key and, as succeeded, exactly the
        keys it changed -- or, for a store that runs the batch as one
        transaction, a BackendError and nothing changed. A batch the refusal
        did not stop did everything and says so. Never a silent gap."""
        if self.break_key(repository, "bad") is None:
            reason = self.cannot_break_keys
            assert isinstance(reason, str) and reason.strip(), (
                f"{type(self).__name__}: override break_key, or say in cannot_break_keys why "
                "the store cannot refuse one key")
            return
        keys = ["good1", "bad", "good2"]
        others = set(keys) - {"bad"}

        def version_is(version: int) -> Callable[[Entry | None], bool]:
            return lambda entry: entry is not None and entry.version == version

        def gone(entry: Entry | None) -> bool:
            return entry is None

        batches: list[tuple[str, int, Callable[[], object], Callable[[Entry | None], bool], object]] = [
            ("store_many", 1, lambda: subject.store_many({k: make(k, 2) for k in keys}),
             version_is(2), set(keys)),
            ("store_many_if_newer", 2, lambda: subject.store_many_if_newer(
                {k: make(k, 3) for k in keys}), version_is(3), set(keys)),
            ("store_many_if_version", 3, lambda: subject.store_many_if_version(
                {k: make(k, 4) for k in keys}, dict.fromkeys(keys, 3)), version_is(4), set(keys)),
            ("delete_many_if_version", 4, lambda: subject.delete_many_if_version(
                dict.fromkeys(keys, 4)), gone, set(keys)),
            ("delete_many", 5, lambda: subject.delete_many(keys), gone, len(keys)),
        ]
        refused = []
        for name, before, call, changed, everything in batches:
            repository.store_many({k: make(k, before) for k in keys})
            outcome: object
            with self.break_key(repository, "bad") or contextlib.nullcontext():
                try:
                    outcome = call()
                except BackendError as exc:
                    outcome = exc
            after = {k: repository.fetch_record(k) for k in keys}
            if isinstance(outcome, BatchError):
                refused.append(name)
                failed, succeeded = set(outcome.failed), set(outcome.succeeded)
                assert outcome.backend == repository.backend, name
                assert "bad" in failed and not failed & succeeded, (name, failed, succeeded)
                # Nothing refused by a condition here: every key is accounted for.
                assert failed | succeeded == set(keys), (name, failed, succeeded)
                assert all(isinstance(e, BaseException) for e in outcome.failed.values())
                assert all(changed(after[k]) for k in succeeded), (name, succeeded, after)
            elif isinstance(outcome, BackendError):
                refused.append(name)
                assert outcome.backend == repository.backend, name
                assert not any(changed(after[k]) for k in others), (
                    f"{name} raised {type(outcome).__name__}, not BatchError, but changed "
                    f"some keys: {after}")
            else:
                assert outcome == everything, (name, outcome)
                assert all(changed(after[k]) for k in keys), (name, after)
        assert refused, "break_key made none of the batch operations fail"

    # ------------------------------------------------------------ conditional
    @_instrumented
    def test_store_if_version(self, subject: StateRepository) -> None:
        assert subject.store_if_version("k", *make("v1", 10), expected=0) is True
        assert subject.store_if_version("k", *make("x", 11), expected=0) is False
        assert subject.store_if_version("k", *make("x", 11), expected=9) is False
        assert subject.fetch("k") == "v1"
        assert subject.store_if_version("k", *make("v2", 11), expected=10) is True
        assert subject.fetch("k") == "v2"

    @_instrumented
    def test_store_if_version_treats_expired_as_absent(self, subject: StateRepository) -> None:
        payload, metadata = make("old", 5, now=time.time() - 10, ttl=1)
        subject.store("k", payload, metadata)
        assert subject.store_if_version("k", *make("new", 6), expected=0) is True
        assert subject.fetch("k") == "new"

    @_instrumented
    def test_store_if_newer(self, subject: StateRepository) -> None:
        assert subject.store_if_newer("k", *make("v5", 5)) is True
        assert subject.store_if_newer("k", *make("v3", 3)) is False
        assert subject.store_if_newer("k", *make("v5b", 5)) is False
        assert subject.fetch("k") == "v5"
        assert subject.store_if_newer("k", *make("v9", 9)) is True
        assert subject.fetch("k") == "v9"

    @_instrumented
    def test_delete_if_version(self, subject: StateRepository) -> None:
        subject.store("k", *make("v", 4))
        assert subject.delete_if_version("k", 3) is False
        assert subject.fetch("k") == "v"
        assert subject.delete_if_version("k", 4) is True
        assert subject.fetch("k") is None
        assert subject.delete_if_version("k", 4) is False

    @_instrumented
    def test_delete_many_if_version(self, subject: StateRepository) -> None:
        now = time.time()
        subject.store_many({"a": make("a", 5), "b": make("b", 5), "c": make("c", 7),
                            "s": make_stub(make("s", 6)[1], "elsewhere"),
                            "x": make("x", 8, now=now - 10, ttl=1)})
        subject.store("t", "", make_tombstone(9, now=now))
        # Durable stores keep expired entries and tombstones (and their versions).
        kept = subject.fetch_record("t") is not None
        deleted = subject.delete_many_if_version(
            {"a": 5, "b": 4, "c": 8, "s": 6, "x": 8, "t": 9, "absent": 1})
        assert deleted == ({"a", "s", "x", "t"} if kept else {"a", "s"}), deleted
        assert subject.fetch_record("a") is None and subject.fetch_record("s") is None
        assert subject.fetch("b") == "b" and subject.fetch("c") == "c"
        assert sorted(subject.keys()) == ["b", "c"]
        assert subject.delete_many_if_version({"b": 5, "c": 7}) == {"b", "c"}
        assert subject.keys() == []
        assert subject.delete_many_if_version({"b": 5}) == set()
        # Versions above 2**53 compare exactly here too.
        big = (1 << 60) + 1
        subject.store("big", *make("v", big))
        assert subject.delete_many_if_version({"big": big - 1}) == set()
        assert subject.delete_many_if_version({"big": big + 1}) == set()
        assert subject.delete_many_if_version({"big": big}) == {"big"}

    @_instrumented
    def test_version_above_2_53_compares_exactly(self, subject: StateRepository) -> None:
        base = 1 << 60  # versions are microseconds << 10: far above a double's 53 bits
        assert subject.store_if_newer("k", *make("a", base + 2)) is True
        assert subject.store_if_newer("k", *make("b", base + 1)) is False
        assert subject.store_if_newer("k", *make("c", base + 3)) is True
        assert subject.store_if_version("k", *make("d", base + 5), expected=base + 2) is False
        assert subject.store_if_version("k", *make("d", base + 5), expected=base + 3) is True
        assert subject.delete_if_version("k", base + 4) is False
        assert subject.delete_if_version("k", base + 6) is False
        assert subject.fetch_record("k").version == base + 5  # type: ignore[union-attr]
        assert subject.delete_if_version("k", base + 5) is True

    # ------------------------------------------------------------ entry kinds
    @_instrumented
    def test_stub_is_live_but_holds_no_value(self, subject: StateRepository) -> None:
        _, metadata = make({"a": 1}, 7)
        locator, stub = make_stub(metadata, '{"name":"elsewhere"}')
        subject.store("k", locator, stub)
        entry = subject.fetch_record("k")
        assert entry is not None and entry.kind == "stub" and entry.live() and entry.valid()
        assert entry.payload == locator and entry.version == 7
        assert entry.metadata["checksum"] == metadata["checksum"]
        assert subject.fetch("k") is None
        assert subject.keys() == ["k"] and list(subject.iter_keys("k*")) == ["k"]
        assert subject.stats()["key_count"] == 1
        placeholder = make_stub(metadata)  # empty payload: a HOT placeholder
        subject.store("p", *placeholder)
        assert subject.fetch_record("p").payload == ""  # type: ignore[union-attr]
        assert subject.fetch("p") is None

    @_instrumented
    def test_tombstone_is_never_live(self, subject: StateRepository) -> None:
        subject.store("k", *make("v", 5))
        assert subject.store_if_version("k", "", make_tombstone(6, now=time.time()),
                                        expected=5) is True
        assert subject.fetch("k") is None
        assert subject.keys() == [] and subject.stats()["key_count"] == 0
        entry = subject.fetch_record("k")
        if entry is not None:  # durable stores keep it; volatile ones drop it at once
            assert entry.kind == "tombstone" and not entry.live() and entry.version == 6
            assert "k" in list(subject.iter_all_keys())
            # A tombstone is "absent" to a create, but orders it after the delete.
            assert subject.store_if_version("k", *make("old", 4), expected=0) is False
            assert subject.store_if_newer("k", *make("old", 6)) is False
        assert subject.store_if_version("k", *make("new", 8), expected=0) is True
        assert subject.fetch("k") == "new"

    @_instrumented
    def test_tombstones_only_in_the_expired_scan(self, subject: StateRepository) -> None:
        now = time.time()
        subject.store("dead", "", make_tombstone(3, now=now - 100))
        subject.store("old", *make("o", now=now - 100))
        subject.store("moved", *make_stub(make("m", now=now - 100)[1], "loc"))
        seen = sorted(e.key for b in subject.scan(now=now, idle_before=now - 50) for e in b)
        if subject.volatile:
            assert seen == ["old"]
        else:
            assert seen == ["dead", "old"]
            assert sorted(subject.iter_all_keys()) == ["dead", "moved", "old"]

    @_instrumented
    def test_same_version_replace_is_a_migration(self, subject: StateRepository) -> None:
        payload, metadata = make({"x": 1}, 9)
        subject.store("k", payload, metadata)
        locator, stub = make_stub(metadata, "there")
        assert subject.store_if_version("k", locator, stub, expected=8) is False
        assert subject.store_if_version("k", locator, stub, expected=9) is True
        assert subject.fetch_record("k").kind == "stub"  # type: ignore[union-attr]
        # ... and back: a stub replaced by the value of the same version.
        assert subject.store_if_version("k", payload, metadata, expected=9) is True
        assert subject.fetch("k") == {"x": 1}
        # A newer entry is never replaced by an older one, even if "expected" matches.
        assert subject.store_if_version("k", *make("older", 3), expected=9) is False

    @_instrumented
    def test_optional_fetch_payload(self, subject: StateRepository) -> None:
        """Where a backend has the optional fast read, it tells the three cases apart."""
        read = getattr(subject, "fetch_payload", None)
        if read is None:
            return  # optional: the manager falls back to fetch_record
        payload, metadata = make({"a": 1}, 4)
        subject.store("v", payload, metadata)
        subject.store("s", *make_stub(metadata, "elsewhere"))
        subject.store("x", *make("gone", 5, now=time.time() - 10, ttl=1))
        assert read("v") == payload
        assert read("s") == ""
        assert read("x") in ("", None)  # volatile stores may have dropped it already
        assert read("absent") is None
        subject.store("bad", codec.encode({"a": 2}), metadata)
        with pytest.raises(IntegrityError):
            read("bad")

    # ------------------------------------------------------------ batch conditionals
    @_instrumented
    def test_store_many_if_newer(self, subject: StateRepository) -> None:
        subject.store_many({"a": make("a5", 5), "b": make("b5", 5), "t": make("t", 2)})
        subject.store_if_version("t", "", make_tombstone(9, now=time.time()), expected=2)
        tomb_kept = subject.fetch_record("t") is not None  # durable stores keep tombstones
        stored = subject.store_many_if_newer({
            "a": make("a6", 6), "b": make("b4", 4), "c": make("c1", 1), "t": make("t8", 8),
        })
        assert stored == ({"a", "c"} if tomb_kept else {"a", "c", "t"})
        assert subject.fetch("a") == "a6" and subject.fetch("b") == "b5"
        assert subject.fetch("c") == "c1"
        assert subject.store_many_if_newer({}) == set()

    @_instrumented
    def test_store_many_if_version(self, subject: StateRepository) -> None:
        subject.store_many({"a": make("a5", 5), "b": make("b5", 5)})
        stored = subject.store_many_if_version(
            {"a": make("a7", 7), "b": make("b7", 7), "c": make("c7", 7), "d": make("d7", 7)},
            {"a": 5, "b": 4, "c": 0, "d": 3},
        )
        assert stored == {"a", "c"}
        assert subject.fetch("a") == "a7" and subject.fetch("b") == "b5"
        assert subject.fetch("c") == "c7" and subject.fetch("d") is None
        assert subject.store_many_if_version({}, {}) == set()

    def test_batch_conditionals_over_many_keys(self, subject: StateRepository) -> None:
        n = 1200
        subject.store_many({f"k{i:04d}": make(i, 10) for i in range(n)})
        newer = subject.store_many_if_newer(
            {f"k{i:04d}": make(-i, 11 if i % 2 else 9) for i in range(n)})
        assert newer == {f"k{i:04d}" for i in range(1, n, 2)}
        swapped = subject.store_many_if_version(
            {f"k{i:04d}": make(i * 10, 12) for i in range(n)},
            {f"k{i:04d}": (10 if i % 3 == 0 else 11) for i in range(n)},
        )
        assert swapped == {f"k{i:04d}" for i in range(n) if (i % 3 == 0) == (i % 2 == 0)}
        deleted = subject.delete_many_if_version({f"k{i:04d}": 12 for i in range(n)})
        assert deleted == swapped

    def test_conditional_writes_race(self, subject: StateRepository) -> None:
        """Threads race store_if_newer / store_if_version on one key: the
        greatest version wins and every successful CAS saw the version it replaced."""
        subject.store("race", *make(0, 1))
        wins: list[tuple[int, int]] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for i in range(25):
                current = subject.fetch_record("race")
                assert current is not None
                new = current.version + 1 + t  # distinct threads may pick the same
                if subject.store_if_version("race", *make([t, i], new), expected=current.version):
                    with lock:
                        wins.append((current.version, new))
                subject.store_many_if_newer({"newest": make([t, i], 1000 * t + i + 1)})

        run_threads(work)
        # The successful swaps form one chain: each replaced the previous winner.
        chain = sorted(wins)
        assert [old for old, _ in chain][1:] == [new for _, new in chain][:-1]
        assert subject.fetch_record("race").version == chain[-1][1]  # type: ignore[union-attr]
        assert subject.fetch_record("newest").version == 1000 * 3 + 25  # type: ignore[union-attr]

    # ------------------------------------------------------------ sweep support
    def test_scan_finds_expired_and_idle(self, subject: StateRepository) -> None:
        now = time.time()
        subject.store("expired", *make("e", now=now - 100, ttl=10))
        subject.store("idle", *make("i", now=now - 100))
        subject.store("fresh", *make("f", now=now))
        for i in range(30):
            subject.store(f"idle{i}", *make(i, now=now - 100))
        seen: list[str] = []
        for batch in subject.scan(batch_size=7, now=now, idle_before=now - 50):
            assert 0 < len(batch) <= 7
            seen.extend(e.key for e in batch)
        if subject.volatile:  # expired records may already be gone natively
            seen = [k for k in seen if k != "expired"]
            assert sorted(seen) == sorted(["idle"] + [f"idle{i}" for i in range(30)])
        else:
            assert sorted(seen) == sorted(["expired", "idle"] + [f"idle{i}" for i in range(30)])
        only_expired = [e.key for b in subject.scan(batch_size=100, now=now) for e in b]
        if subject.volatile:
            assert only_expired in ([], ["expired"])
        else:
            assert only_expired == ["expired"]

    def test_scan_allows_deleting_while_iterating(self, subject: StateRepository) -> None:
        now = time.time()
        subject.store_many({f"s{i:04d}": make(i, now=now - 100) for i in range(250)})
        moved = 0
        for batch in subject.scan(batch_size=40, now=now, idle_before=now - 50):
            moved += subject.delete_many([e.key for e in batch])
        assert moved == 250
        assert subject.keys() == []

    @_instrumented
    def test_touch_many_marks_records_as_read(self, subject: StateRepository,
                                              repository: StateRepository) -> None:
        now = time.time()
        subject.store_many({"read": make(1, now=now - 100), "unread": make(2, now=now - 100)})
        subject.touch_many(["read", "absent"], at=now)
        idle = [e.key for b in subject.scan(now=now, idle_before=now - 50) for e in b]
        assert "unread" in idle
        if type(repository).touch_many is not StateRepository.touch_many:
            assert "read" not in idle  # a backend that tracks reads must honour them
        assert subject.fetch("read") == 1

    # ------------------------------------------------------------ other writers
    @_instrumented
    def test_changed_by_others(self, subject: StateRepository, repository: StateRepository,
                               repository_url: str) -> None:
        """A backend with a change signal (an override) says True after another
        connection wrote; one without answers False, always."""
        signal = type(repository).changed_by_others is not StateRepository.changed_by_others
        assert isinstance(subject.changed_by_others(), bool)
        subject.store("mine", *make(1))
        subject.changed_by_others()  # whatever it says, it has now seen this process's write
        if not signal:
            assert subject.changed_by_others() is False
        if not repository.shared:
            return  # nobody else can write to it
        with open_repository(repository_url) as other:
            other.store("theirs", *make(2))
        if signal:
            assert subject.changed_by_others() is True, "another connection wrote"
        else:
            assert subject.changed_by_others() is False
        assert subject.fetch("theirs") == 2

    def test_from_url_round_trip(self, repository: StateRepository, repository_url: str) -> None:
        """The fixture's URL opens the same backend, through the registry and
        through the class, and (for a shared store) the same data both ways."""
        with open_repository(repository_url) as other:
            assert type(other) is type(repository), (type(other), type(repository))
            if repository.shared:
                repository.store("from-fixture", *make("a", 3))
                other.store("from-url", *make("b", 4))
                assert other.fetch("from-fixture") == "a"
                assert repository.fetch("from-url") == "b"
                assert repository.fetch_record("from-url").version == 4  # type: ignore[union-attr]
                assert sorted(other.keys()) == sorted(repository.keys()) == ["from-fixture",
                                                                           "from-url"]
                assert other.delete_many_if_version({"from-fixture": 3}) == {"from-fixture"}
                assert repository.fetch("from-fixture") is None
        with type(repository).from_url(repository_url) as again:
            assert type(again) is type(repository)
            if repository.shared:
                assert again.keys() == ["from-url"]

    # ------------------------------------------------------------ stats, lifecycle
    @_instrumented
    def test_stats(self, subject: StateRepository) -> None:
        subject.store_many({"a": make(1), "b": make(2)})
        stats = subject.stats()
        assert stats["backend"] == subject.backend
        assert "tier" in stats
        assert stats["key_count"] == 2

    @_instrumented
    def test_clear(self, subject: StateRepository) -> None:
        subject.store_many({f"c{i}": make(i) for i in range(20)})
        assert subject.clear() == 20
        assert subject.keys() == []

    @_instrumented
    def test_close_twice(self, subject: StateRepository) -> None:
        subject.close()
        subject.close()

    @_instrumented
    def test_ping(self, subject: StateRepository) -> None:
        assert subject.ping() >= 0.0

    def test_secret_is_never_shown(self, repository: StateRepository,
                                   request: pytest.FixtureRequest,
                                   caplog: pytest.LogCaptureFixture) -> None:
        """Opened with :data:`SECRET` as its password (``secret_url``), the
        repository never shows it: not in its repr, its stats, any error it
        raises (nor their causes), nor a log line -- whether the server
        accepts the password or refuses it. (``repository`` is asked for so
        that its fixture cleans up what this test writes to the same store.)"""
        if self.takes_no_secret is not None:
            assert self.takes_no_secret.strip(), "say why the backend takes no secret"
            return
        url: str = request.getfixturevalue("secret_url")
        caplog.set_level(logging.DEBUG, logger="tiered_state")
        shown: list[str] = []
        try:
            repo = open_repository(url)
        except TieredStateError as exc:
            shown += _texts(exc)
        else:
            with repo:
                shown += [repr(repo), str(repo), repr(InstrumentedRepository(repo, InMemoryMetrics()))]
                calls: list[Callable[[], object]] = [
                    repo.ping, lambda: repo.store("k", *make(1)), lambda: repo.fetch("k"),
                    lambda: repo.store_many({"k2": make(2)}), lambda: repo.fetch_many(["k", "k2"]),
                    repo.keys, repo.stats, lambda: repo.delete_many(["k", "k2"]),
                ]
                for call in calls:
                    try:
                        shown.append(repr(call()))
                    except TieredStateError as exc:
                        shown += _texts(exc)
        shown.append(caplog.text)
        spellings = {SECRET, quote(SECRET, safe="")}
        leaks = [text for text in shown if any(s in text for s in spellings)]
        assert not leaks, f"the secret shows in: {leaks}"

    def test_concurrent_writers(self, subject: StateRepository) -> None:
        def work(t: int) -> None:
            for i in range(50):
                subject.store(f"t{t}-{i}", *make([t, i]))
                assert subject.fetch(f"t{t}-{i}") == [t, i]

        run_threads(work)
        assert len(subject.keys("t*")) == 200
