"""``s3://`` -- objects in an S3 bucket under a prefix (the server COLD tier).

URL::

    s3://bucket/prefix?region=eu-west-1&endpoint_url=http://127.0.0.1:8333
        &storage_class=STANDARD&compression=true&create_bucket=false

Query options (all optional; keyword arguments to :meth:`~S3StateRepository.from_url`
override them): ``region``, ``endpoint_url``, ``profile``, ``storage_class``
(default ``STANDARD``; ``none`` sends none), ``force_storage_class`` (default
off), ``compression`` (default on),
``compress_min_bytes`` (default 1024), ``create_bucket`` (default off),
``max_workers`` (threads for the batch calls, default 16), ``connect_timeout``
(default 2 s), ``read_timeout`` (default 30 s), ``retries`` (attempts, default 3),
``max_name_bytes`` (default 255) and ``conditional`` (``auto``/``on``/``off``).
Credentials come from boto3's usual chain (environment, ``~/.aws``, instance
role); a URL carrying credentials is refused. A ready boto3 client may be
passed as ``client=``.

Errors: a misspelt option, a bad ``region``, ``endpoint_url`` or ``profile``,
no credentials at all, or a bucket that does not exist is a
``ConfigurationError``; so are refused credentials (``InvalidAccessKeyId``,
``SignatureDoesNotMatch``, ``AccessDenied``...) at :meth:`~S3StateRepository.ping`,
which is what ``open(check=True)`` runs. An endpoint that cannot be reached
is a ``BackendUnavailableError``.

Storage format
    One object per key: ``<prefix>/<name>``. The body is the JSON payload,
    zlib-compressed when compression is on, the payload is at least
    ``compress_min_bytes`` long and compression makes it smaller. The metadata
    rides in ``x-amz-meta-*`` headers: ``checksum``, ``size-bytes``,
    ``version``, ``created-at``, ``updated-at``, ``expires-at`` (absent when
    the entry does not expire) and ``encoding`` (the entry's: a value's
    codec -- ``json``, ``typed-json``... -- or ``stub`` or ``tombstone``,
    with ``+zlib`` appended when the body is compressed; entries are
    returned inflated, without it) and ``metadata-checksum``: the SHA-256
    of the key, all of these and how the body is packed (see
    :func:`tiered_state.record.metadata_checksum`). The payload's checksum
    covers the payload only; this one keeps damaged headers from passing a
    wrong version, expiry or key off as true -- a read of such an object
    raises ``IntegrityError``, and listings and conditional writes treat its
    metadata as unreadable. Objects written before it existed carry none and
    are read as they are. Values, stubs and tombstones are stored the same
    way, verbatim; a tombstone is an empty body. A compressed body is never
    inflated past the recorded ``size-bytes`` plus
    :data:`~tiered_state.record.INFLATE_MARGIN`: a decompression bomb is an
    ``IntegrityError``.

    ``<name>`` is the key with every character outside ``A-Za-z0-9-_.*'()``
    and printable non-ASCII percent-encoded (UTF-8, upper-case hex), plus a
    leading ``.``, so no name is ``.``/``..`` or contains ``/`` (file-backed
    servers such as SeaweedFS and MinIO treat ``/`` as a directory and
    collapse ``//``). The encoding maps a key's prefix to a name prefix, so a
    glob's literal prefix narrows the listing. A name that would pass
    ``max_name_bytes`` (255: the per-component limit of SeaweedFS and MinIO;
    up to 1024 on AWS) becomes ``!h<sha256 of the key>`` and the key is kept,
    base64url, in ``x-amz-meta-key``; listing such objects costs a HEAD each.

Expiry
    Listings carry no metadata, so an entry with an ``expires_at`` also gets
    an empty *marker* object ``!e<name>`` (written before the data). Listings
    HEAD only marked keys to hide expired ones, and :meth:`scan` finds expiry
    candidates from the markers alone. A tombstone (``expires_at`` 0.0) is
    expired from birth and is marked like any other: the marker is what hides
    it from ``keys()`` and what the sweep finds it by. Expired objects stay,
    and ``fetch_record`` returns them, until deleted. Objects with an
    ``expires_at`` and their markers carry the tag ``tiered-state-ttl=1`` for
    a lifecycle rule. Entries without one (payload objects, for instance)
    cost one object each and no HEAD when listed.

Conditional writes
    ``store_if_version``, ``store_if_newer`` and ``delete_if_version`` read
    the object's ETag and write with ``If-Match`` / ``If-None-Match``, which
    AWS S3, SeaweedFS, MinIO and moto honour: atomic across processes. Their
    batch forms run the same per-key operation concurrently on the thread
    pool (S3 has no multi-object conditional write); a key refused by its
    condition is left out of the result, a key that errored is reported in a
    ``BatchError``. With ``conditional=off`` (or a server answering 501) they
    fall back to read-compare-write under a process-local lock, atomic within
    this process only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

from ..config import parse_bool, parse_number, query_options, redact, require, unknown_options
from ..errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    IntegrityError,
    InvalidKeyError,
    TieredStateError,
)
from ..keys import compile_pattern, is_literal, literal_prefix, validate_key, validate_pattern
from ..record import TOMBSTONE, Entry, Metadata, inflate, live_value, metadata_checksum, stored_metadata
from ..segments import SegmentStore, is_segment_name
from .base import Items, StateRepository, chunked

__all__ = ["S3StateRepository"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: A conditional write's test, on the metadata of what is stored (None: nothing).
_Condition = Callable[[Metadata | None], bool]

#: S3's own limits: object keys and one DeleteObjects request.
_MAX_OBJECT_KEY_BYTES = 1024
_DELETE_CHUNK = 1000
#: How often a conditional write re-reads after a lost race before giving up.
_CAS_ATTEMPTS = 8

_HASHED = "!h"
_MARKER = "!e"
#: Segments live under this nested name (see _S3Segments).
_SEGMENTS = "!s/"
#: Sorts after every "!..." name (markers, hashed names) and before every
#: encoded name (they start at "%"): a listing of the whole namespace that
#: starts after it never pages through the markers.
_AFTER_SPECIAL = '"'
_TTL_TAG = "tiered-state-ttl=1"
_ZLIB_SUFFIX = "+zlib"
#: The object metadata field holding the metadata checksum.
_DIGEST = "metadata-checksum"
#: What ping reads when the bucket's HEAD is refused: a name no key has.
_PING_NAME = "!ping"
#: What a refusal at ping means, by S3 error code.
_REFUSED = {
    "InvalidAccessKeyId": "the server does not know the access key id "
    "(check AWS_ACCESS_KEY_ID or the profile)",
    "SignatureDoesNotMatch": "the secret key does not match the access key id "
    "(check AWS_SECRET_ACCESS_KEY or the profile)",
    "AccessDenied": "these credentials may not use the bucket "
    "(s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket are needed)",
    "InvalidToken": "the session token is not valid (check AWS_SESSION_TOKEN)",
    "ExpiredToken": "the session token has expired (renew the credentials)",
    "AuthorizationHeaderMalformed": "the region does not match the bucket's (option 'region')",
    "PermanentRedirect": "the bucket is in another region (option 'region')",
    "IllegalLocationConstraintException": "the bucket is in another region (option 'region')",
}

# Characters AWS lists as safe in object keys, minus "!" (our marker prefix).
_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.*'()")
_PLAIN = re.compile(r"[A-Za-z0-9\-_*'()][A-Za-z0-9\-_.*'()]*\Z")
#: Storage classes that bill every object as at least this many bytes.
_MIN_BILLED_BYTES = {"STANDARD_IA": 128 << 10, "ONEZONE_IA": 128 << 10, "GLACIER_IR": 128 << 10}
#: Storage classes whose objects a GET cannot read until they are restored.
_NEEDS_RESTORE = frozenset({"GLACIER", "DEEP_ARCHIVE"})

_OPTIONS = {
    "region", "endpoint_url", "profile", "storage_class", "force_storage_class",
    "compression", "compress_min_bytes",
    "create_bucket", "max_workers", "connect_timeout", "read_timeout", "retries",
    "max_name_bytes", "conditional", "client",
}


def _escape_char(char: str) -> str:
    if char in _SAFE_ASCII:
        return char
    # Printable non-ASCII stays as is (S3 keys are UTF-8); separators and
    # format/unassigned characters are escaped because XML listings and some
    # servers mangle them.
    if ord(char) > 0x7F and unicodedata.category(char)[0] not in "CZ":
        return char
    return "".join(f"%{b:02X}" for b in char.encode("utf-8"))


def encode_name(key: str) -> str:
    """The object name of ``key`` (before hashing): reversible, no ``/``, never ``.``/``..``.

    Per-character, so the name of a key's prefix is a prefix of the key's name
    (the listing narrows by a glob's literal prefix).
    """
    if _PLAIN.match(key):
        return key
    if not key:
        return key
    head = "%2E" if key[0] == "." else _escape_char(key[0])
    return head + "".join(_escape_char(c) for c in key[1:])


def decode_name(name: str) -> str | None:
    """The key an object name stands for, or None if the name is not one of ours."""
    try:
        key = unquote(name, errors="strict")
    except UnicodeDecodeError:
        return None
    return key if key and encode_name(key) == name else None


class _Head(NamedTuple):
    etag: str
    metadata: Metadata | None
    key: str | None  # from x-amz-meta-key (hashed names only)


class S3StateRepository(StateRepository):
    """Records as objects in ``bucket`` under ``prefix``.

    :param bucket: the bucket name.
    :param prefix: the namespace inside the bucket (``""``: the bucket's root).
    :param client: a ready boto3 S3 client to use instead of building one
        (its own connection pool should hold ``max_workers`` connections).
    :param region: AWS region (default: boto3's chain; ``us-east-1`` with an endpoint).
    :param endpoint_url: an S3-compatible server (path-style addressing is used).
    :param profile: a profile from ``~/.aws/config``.
    :param storage_class: sent with the PUT of each object; ``None`` sends
        none. If the server rejects it, it is dropped (once, with a warning)
        and remembered. ``STANDARD_IA``, ``ONEZONE_IA`` and ``GLACIER_IR``
        bill every object as at least 128 KiB, so a smaller object is stored
        ``STANDARD`` instead unless ``force_storage_class``. ``GLACIER`` and
        ``DEEP_ARCHIVE`` are refused: their objects cannot be read without a
        restore first, and a COLD read must be one GET.
    :param force_storage_class: send ``storage_class`` for small objects too.
    :param compression: zlib-compress payloads of at least ``compress_min_bytes``.
    :param create_bucket: create the bucket if it does not exist.
    :param max_workers: threads for ``store_many``/``fetch_many``/``delete_many``.
    :param connect_timeout: seconds to connect (short, so an unreachable
        endpoint fails fast).
    :param read_timeout: seconds to wait for a response.
    :param retries: total attempts per request (botocore "standard" retries).
    :param max_name_bytes: longest object name (after the prefix) stored as is;
        longer keys are hashed.
    :param conditional: ``"auto"``/``"on"`` use If-Match/If-None-Match for the
        conditional writes; ``"off"`` uses a process-local lock.
    """

    backend = "s3"
    volatile = False
    shared = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        storage_class: str | None = "STANDARD",
        force_storage_class: bool = False,
        compression: bool = True,
        compress_min_bytes: int = 1024,
        create_bucket: bool = False,
        max_workers: int = 16,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        retries: int = 3,
        max_name_bytes: int = 255,
        conditional: str = "auto",
    ) -> None:
        if not bucket or "/" in bucket:
            raise ConfigurationError(f"s3: invalid bucket name {bucket!r}")
        if storage_class in _NEEDS_RESTORE:
            raise ConfigurationError(
                f"s3: storage_class={storage_class} objects must be restored before they can "
                "be read, so a COLD read could not be one GET; use STANDARD_IA or GLACIER_IR")
        if max_workers < 1 or retries < 1 or compress_min_bytes < 0:
            raise ConfigurationError("s3: max_workers and retries must be >= 1")
        if conditional not in ("auto", "on", "off"):
            raise ConfigurationError(
                f"s3: conditional must be auto, on or off, not {conditional!r}"
            )
        prefix = prefix.strip("/")
        self._base = prefix + "/" if prefix else ""
        base_bytes = len(self._base.encode("utf-8"))
        if not 68 <= max_name_bytes <= _MAX_OBJECT_KEY_BYTES - base_bytes:
            raise ConfigurationError(
                f"s3: max_name_bytes must be 68..{_MAX_OBJECT_KEY_BYTES - base_bytes} "
                "for this prefix (hashed names are 66 bytes)"
            )
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.storage_class = storage_class or None
        self.force_storage_class = force_storage_class
        self.compression = compression
        self.compress_min_bytes = compress_min_bytes
        self.create_bucket = create_bucket
        self.max_workers = max_workers
        self.max_name_bytes = max_name_bytes
        self._conditional = conditional != "off"
        self._conditional_required = conditional == "on"
        self._botocore = require("botocore.exceptions", extra="s3")
        if client is None:
            client = self._make_client(
                region, endpoint_url, profile, max_workers, connect_timeout, read_timeout, retries
            )
        else:
            pool = getattr(getattr(client.meta, "config", None), "max_pool_connections", None)
            if isinstance(pool, int) and pool < max_workers:
                log.warning(
                    "s3: the client's max_pool_connections (%d) is below max_workers (%d); "
                    "batch calls will wait for connections", pool, max_workers,
                )
        self._client = client
        self._bucket_ready = False
        self._setup_lock = threading.Lock()
        # Only for conditional=off: read-compare-write is then atomic in-process.
        self._cas_lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @staticmethod
    def _make_client(
        region: str | None,
        endpoint_url: str | None,
        profile: str | None,
        max_workers: int,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
    ) -> Any:
        boto3 = require("boto3", extra="s3")
        config_module = require("botocore.config", extra="s3")
        config = config_module.Config(
            # One connection per worker thread, so a batch never queues for one.
            max_pool_connections=max(10, max_workers),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": retries},
            # Our own SHA-256 covers the payload; skipping the per-request
            # CRC also keeps older S3-compatible servers working.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        exceptions = require("botocore.exceptions", extra="s3")
        try:
            session = _session(boto3, profile)
            if region is None and endpoint_url is not None and session.region_name is None:
                region = "us-east-1"
            with _SESSIONS_LOCK:
                return session.client(
                    "s3", region_name=region, endpoint_url=endpoint_url, config=config
                )
        except exceptions.ProfileNotFound as exc:
            raise ConfigurationError(
                f"s3: option 'profile': no profile {profile!r} in the AWS config files "
                "(~/.aws/config, ~/.aws/credentials)"
            ) from exc
        except exceptions.InvalidRegionError as exc:
            raise ConfigurationError(
                f"s3: option 'region' is not a region name: {region!r}"
            ) from exc
        except exceptions.BotoCoreError as exc:  # the profile's settings, credentials...
            raise ConfigurationError(
                f"s3: the AWS configuration is not usable: {redact(str(exc))}"
            ) from exc
        except ValueError as exc:
            # botocore's only ValueError here is about the endpoint.
            raise ConfigurationError(
                "s3: option 'endpoint_url' must be an http:// or https:// URL, "
                f"not {redact(str(endpoint_url))!r}"
            ) from exc

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3StateRepository:
        base_url, query = query_options(url)
        query.update(options)
        unknown = set(query) - _OPTIONS
        if unknown:
            raise unknown_options("s3", unknown, _OPTIONS)
        parts = urlsplit(base_url)
        if parts.scheme.lower() != "s3":
            raise ConfigurationError(f"not an s3:// URL: {redact(url)!r}")
        if "@" in parts.netloc:
            raise ConfigurationError(
                "s3:// URLs do not carry credentials; use boto3's chain "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role) or profile="
            )
        kwargs: dict[str, Any] = {}
        for name in ("region", "endpoint_url", "profile", "client", "conditional"):
            if query.get(name) not in (None, ""):
                kwargs[name] = query[name]
        if "storage_class" in query:
            sc = query["storage_class"]
            kwargs["storage_class"] = None if str(sc or "").lower() in ("", "none") else sc
        for name in ("compression", "create_bucket", "force_storage_class"):
            if name in query:
                kwargs[name] = parse_bool(query[name], name)
        for name, minimum in (
            ("compress_min_bytes", 0), ("max_workers", 1), ("retries", 1), ("max_name_bytes", 1)
        ):
            value = parse_number(query.get(name), name, minimum=minimum)
            if value is not None:
                kwargs[name] = int(value)
        for name in ("connect_timeout", "read_timeout"):
            value = parse_number(query.get(name), name, minimum=0.001)
            if value is not None:
                kwargs[name] = value
        return cls(parts.netloc, unquote(parts.path), **kwargs)

    # ------------------------------------------------------------ errors
    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate botocore errors: the one place driver exceptions are mapped."""
        exc_mod = self._botocore
        try:
            yield
        except exc_mod.ClientError as exc:
            code, status = _error_code(exc)
            if code == "NoSuchBucket":
                self._bucket_ready = False
                raise ConfigurationError(
                    f"s3: bucket {self.bucket!r} does not exist "
                    "(create it, or open with create_bucket=true)"
                ) from exc
            message = f"{action} failed: {code or 'HTTP'} (HTTP {status})"
            if status == 503 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                raise BackendUnavailableError(message, self.backend) from exc
            raise BackendError(message, self.backend) from exc
        except (exc_mod.ConnectionError, exc_mod.HTTPClientError) as exc:
            # Connect failure, connect/read timeout, connection dropped.
            raise BackendUnavailableError(
                f"{action} failed: cannot reach the S3 endpoint"
                f"{' ' + redact(self.endpoint_url) if self.endpoint_url else ''} ({type(exc).__name__})",
                self.backend,
            ) from exc
        except exc_mod.NoCredentialsError as exc:
            raise ConfigurationError(
                "s3: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "name a profile of ~/.aws/credentials with option 'profile', or run with an "
                "instance role (boto3 looked in the environment, ~/.aws and the instance metadata)"
            ) from exc
        except exc_mod.BotoCoreError as exc:
            raise BackendError(f"{action} failed: {type(exc).__name__}", self.backend) from exc

    def _ready(self) -> None:
        """Check (once) that the bucket exists; create it if asked."""
        if self._bucket_ready:
            return
        with self._setup_lock:
            if self._bucket_ready:
                return
            exc_mod = self._botocore
            with self._errors("checking the bucket"):
                try:
                    self._client.head_bucket(Bucket=self.bucket)
                except exc_mod.ClientError as exc:
                    code, status = _error_code(exc)
                    if status != 404 and code not in ("404", "NoSuchBucket", "NotFound"):
                        if status != 403:
                            raise
                        # 403: the bucket exists but we may not list it; objects may
                        # still be allowed, so let the object calls decide.
                    elif self.create_bucket:
                        self._create_bucket()
                    else:
                        raise ConfigurationError(
                            f"s3: bucket {self.bucket!r} does not exist "
                            "(create it, or open with create_bucket=true)"
                        ) from exc
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("s3: created bucket %s", self.bucket)
        except self._botocore.ClientError as exc:
            if _error_code(exc)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    # ------------------------------------------------------------ names
    def _name(self, key: str) -> str:
        """The object name (after the prefix) for a validated key."""
        name = encode_name(key)
        if len(name.encode("utf-8")) > self.max_name_bytes:
            return _HASHED + hashlib.sha256(key.encode("utf-8")).hexdigest()
        return name

    def _object(self, name: str) -> str:
        return self._base + name

    def _list(self, name_prefix: str, start_after: str = "", *, nested: bool = False
              ) -> Iterator[tuple[str, int]]:
        """(name, size) of every object under ``base + name_prefix``, page by
        page (one page in memory at a time); names after ``start_after`` only;
        names with a ``/`` (a nested namespace, segments) only if ``nested``."""
        full = self._base + name_prefix
        if len(full.encode("utf-8")) > _MAX_OBJECT_KEY_BYTES:
            return
        start = len(self._base)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = self._base + start_after
            with self._errors("listing"):
                page = self._client.list_objects_v2(**kwargs)
            for obj in page.get("Contents", ()):
                # Slice, never str.replace: the prefix may occur inside a name.
                name = obj["Key"][start:]
                if nested or "/" not in name:  # deeper names belong to a nested namespace
                    yield name, int(obj.get("Size", 0))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # ------------------------------------------------------------ object I/O
    def _head(self, name: str) -> _Head | None:
        with self._errors("HEAD"):
            try:
                response = self._client.head_object(Bucket=self.bucket, Key=self._object(name))
            except self._botocore.ClientError as exc:
                if _error_code(exc)[1] == 404:
                    return None
                raise
        meta = response.get("Metadata", {})
        stored_key = _meta_key(meta)  # hashed names only
        key = stored_key if name.startswith(_HASHED) else decode_name(name)
        metadata = None
        if key is not None:
            try:
                metadata = _parse_metadata(meta, key)
            except IntegrityError:
                # Taken as metadata that is not ours: reading the object
                # raises, a conditional write finds nothing to keep.
                log.warning("s3: object %s has metadata that fails its checksum",
                            self._object(name))
                stored_key = None  # nor is its key to be trusted
        return _Head(response.get("ETag", ""), metadata, stored_key)

    def _get(self, key: str, name: str) -> Entry | None:
        with self._errors("GET"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._object(name))
                body: bytes = response["Body"].read()
            except self._botocore.ClientError as exc:
                code, status = _error_code(exc)
                if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                    return None
                raise
        meta = response.get("Metadata", {})
        if _DIGEST not in meta and name.startswith(_HASHED) and _meta_key(meta) not in (None, key):
            return None  # a different key with the same hash: not ours
        # With a metadata checksum, the object is this key's exactly if it
        # matches (it covers the key); a mismatch raises IntegrityError.
        metadata = _parse_metadata(meta, key)
        if metadata is None:
            # Not written by tiered-state (or metadata lost): an invalid copy.
            metadata = {"checksum": "", "size_bytes": len(body), "version": 0,
                        "created_at": 0.0, "updated_at": 0.0, "expires_at": None,
                        "encoding": "json"}
            return Entry(key, "", metadata)
        if meta.get("encoding", "json").endswith(_ZLIB_SUFFIX):
            payload = inflate(body, metadata["size_bytes"], key)
        else:
            try:
                payload = body.decode("utf-8")
            except UnicodeDecodeError:
                payload = ""  # fails its checksum: the manager treats it as corrupt
        return Entry(key, payload, metadata)

    def _put(self, key: str, name: str, payload: str, metadata: Metadata, **condition: str) -> None:
        """PUT one record (its TTL marker first); raises translated errors."""
        body = payload.encode("utf-8")
        encoding = metadata.get("encoding") or "json"
        packing = "json"
        if self.compression and len(body) >= self.compress_min_bytes:
            packed = zlib.compress(body, 6)
            if len(packed) < len(body):
                body, encoding, packing = packed, encoding + _ZLIB_SUFFIX, "json" + _ZLIB_SUFFIX
        meta = {
            "checksum": metadata["checksum"],
            "size-bytes": str(metadata["size_bytes"]),
            "version": str(metadata["version"]),
            "created-at": repr(float(metadata["created_at"])),
            "updated-at": repr(float(metadata["updated_at"])),
            "encoding": encoding,
            _DIGEST: metadata_checksum(key, metadata, packing),
        }
        expires_at = metadata.get("expires_at")
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._object(name),
            "Body": body,
            "Metadata": meta,
            "ContentType": "application/zlib" if encoding.endswith(_ZLIB_SUFFIX)
            else "application/json",
        }
        if name.startswith(_HASHED):
            meta["key"] = base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii")
        if expires_at is not None:
            # Tombstones too (expires_at 0.0): listings must hide them, and
            # the expired-only scan finds them by their marker.
            meta["expires-at"] = repr(float(expires_at))
            kwargs["Tagging"] = _TTL_TAG
            if not name.startswith(_HASHED):
                # Before the data, so an entry that expires is never unmarked.
                self._put_object(
                    {"Bucket": self.bucket, "Key": self._object(_MARKER + name), "Body": b"",
                     "Tagging": _TTL_TAG, "Metadata": {"expires-at": meta["expires-at"]}},
                    storage_class=False,
                )
        kwargs.update(condition)
        self._put_object(kwargs, storage_class=True)

    def _put_object(self, kwargs: dict[str, Any], *, storage_class: bool) -> None:
        sc = self._class_for(len(kwargs["Body"])) if storage_class else None
        with self._errors("PUT"):
            if sc is None:
                self._client.put_object(**kwargs)
                return
            try:
                self._client.put_object(StorageClass=sc, **kwargs)
            except self._botocore.ClientError as exc:
                if _error_code(exc)[0] not in ("InvalidStorageClass", "NotImplemented"):
                    raise
                log.warning("s3: the server rejects storage class %s; sending none from now on", sc)
                self.storage_class = None
                self._client.put_object(**kwargs)

    def _class_for(self, size: int) -> str | None:
        """The storage class to send for an object of ``size`` bytes (None: the bucket's default)."""
        sc = self.storage_class
        if sc is None or self.force_storage_class or size >= _MIN_BILLED_BYTES.get(sc, 0):
            return sc
        return None  # STANDARD: the class would bill it as _MIN_BILLED_BYTES

    def _delete_objects(self, names: list[str]) -> dict[str, BaseException]:
        """DeleteObjects for at most 1000 names; returns name -> error for the failures."""
        failed: dict[str, BaseException] = {}
        if not names:
            return failed
        with self._errors("DeleteObjects"):
            response = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._object(n)} for n in names], "Quiet": True},
            )
        start = len(self._base)
        for error in response.get("Errors", ()):
            code = error.get("Code", "")
            failed[error.get("Key", "")[start:]] = BackendError(
                f"DeleteObjects failed: {code}", self.backend
            )
        return failed

    # ------------------------------------------------------------ pool
    def _executor(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            with self._setup_lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = ThreadPoolExecutor(
                        self.max_workers, thread_name_prefix="tiered-state-s3"
                    )
        return pool

    def _map(
        self, fn: Callable[[str], _T], keys: list[str]
    ) -> tuple[dict[str, _T], dict[str, BaseException]]:
        """Run ``fn(key)`` for every key on the shared pool; (results, failures).

        A storage failure or an unreadable record is a failure of its key;
        any other exception is a bug and is raised.
        """
        results: dict[str, _T] = {}
        failures: dict[str, BaseException] = {}
        if len(keys) <= 1:  # not worth a thread hop
            for key in keys:
                try:
                    results[key] = fn(key)
                except (BackendError, IntegrityError) as exc:
                    failures[key] = exc
            return results, failures
        pool = self._executor()
        futures: dict[str, Future[_T]] = {key: pool.submit(fn, key) for key in keys}
        for key, future in futures.items():
            error = future.exception()
            if error is None:
                results[key] = future.result()
            elif isinstance(error, (BackendError, ConfigurationError, IntegrityError)):
                failures[key] = error  # an unreadable record fails for its key alone
            else:  # a bug, not a storage failure: do not hide it in a BatchError
                raise error
        return results, failures

    def _raise_batch(
        self, action: str, failures: Mapping[str, BaseException], succeeded: Iterable[str],
        tried: int,
    ) -> None:
        """Raise for a batch of ``tried`` keys of which ``failures`` failed."""
        succeeded = list(succeeded)
        errors = list(failures.values())
        # Counted from the failures, not from ``succeeded``: an absent key or a
        # refused condition is neither a success nor a failure.
        if len(failures) >= tried:
            # Every key failed for one reason: raise that reason, so the manager
            # can tell an unreachable tier (or a missing bucket) from a partial failure.
            for kind in (ConfigurationError, BackendUnavailableError):
                if all(isinstance(e, kind) for e in errors):
                    raise errors[0]
        raise self._batch_failed(action, failures, succeeded)

    # ------------------------------------------------------------ the contract
    def fetch_record(self, key: str) -> Entry | None:
        validate_key(key)
        self._ready()
        return self._get(key, self._name(key))

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = list(dict.fromkeys(validate_key(k) for k in keys))
        if not keys:
            return {}
        self._ready()
        results, failures = self._map(lambda k: self._get(k, self._name(k)), keys)
        found = {k: e for k, e in results.items() if e is not None}
        if failures:
            self._raise_batch("fetch_many", failures, found, len(keys))
        return found

    def fetch(self, key: str) -> Any | None:
        return live_value(self.fetch_record(key))

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        self._ready()
        self._put(key, self._name(key), value, metadata)
        return True

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        if not items:
            return set()
        self._ready()

        def put(key: str) -> None:
            payload, metadata = items[key]
            self._put(key, self._name(key), payload, metadata)

        results, failures = self._map(put, list(items))
        log.debug("s3: store_many of %d keys, %d failed", len(items), len(failures))
        if failures:
            self._raise_batch("store_many", failures, results, len(items))
        return set(results)

    def delete(self, key: str) -> bool:
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Iterable[str]) -> int:
        # Validate everything before any I/O.
        if isinstance(keys, str):
            raise InvalidKeyError("expected a collection of keys, not a single string")
        unique = list(dict.fromkeys(validate_key(k) for k in keys))
        if not unique:
            return 0
        self._ready()
        existed = 0
        failed: dict[str, BaseException] = {}
        done: list[str] = []
        # DeleteObjects answers "Deleted" for absent keys too, so existence is
        # counted from a HEAD per key made just before (concurrently). A key
        # created between the HEAD and the delete is deleted but not counted.
        # Each key costs two object names (data + TTL marker): 500 keys fill
        # one DeleteObjects request.
        for chunk in chunked(unique, _DELETE_CHUNK // 2):
            heads, head_failures = self._map(lambda k: self._head(self._name(k)), chunk)
            failed.update(head_failures)
            targets = [k for k in chunk if k not in head_failures]
            names: dict[str, str] = {}
            for key in targets:
                name = self._name(key)
                names[name] = key
                if not name.startswith(_HASHED):
                    names[_MARKER + name] = key
            try:
                errors = self._delete_objects(list(names))
            except BackendError as exc:
                failed.update(dict.fromkeys(targets, exc))
                continue
            bad = {names[n]: e for n, e in errors.items() if n in names}
            failed.update(bad)
            for key in targets:
                if key not in bad:
                    done.append(key)
                    existed += heads.get(key) is not None
        if failed:
            self._raise_batch("delete_many", failed, done, len(unique))
        return existed

    def keys(self, pattern: str = "*") -> list[str]:
        return list(self.iter_keys(pattern))

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        validate_pattern(pattern)
        self._ready()
        return self._iter_keys(pattern, live=True)

    def iter_all_keys(self) -> Iterator[str]:
        # Page by page (1000 names, or a pool's worth of HEADs for hashed
        # names, at a time): memory stays bounded however large the namespace.
        self._ready()
        return self._iter_keys("*", live=False)

    def _iter_keys(self, pattern: str, *, live: bool) -> Iterator[str]:
        now = time.time()
        if is_literal(pattern):
            key = literal_prefix(pattern)
            try:
                validate_key(key)
            except InvalidKeyError:
                return
            head = self._head(self._name(key))
            if head is not None and head.metadata is not None and not (
                live and not _live(head.metadata, now)
            ):
                yield key
            return
        match = compile_pattern(pattern).match
        prefix = encode_name(literal_prefix(pattern))
        # Keys written with a TTL: only these need a HEAD to hide expired ones.
        marked = (
            {name[len(_MARKER):] for name, _ in self._list(_MARKER + prefix)} if live else set()
        )
        for name, _ in self._list(prefix, "" if prefix else _AFTER_SPECIAL):
            if name.startswith("!"):
                continue
            found = decode_name(name)
            if found is None or not match(found):
                continue
            if name in marked:
                head = self._head(name)
                if head is None or (head.metadata is not None and not _live(head.metadata, now)):
                    continue
            yield found
        # Hashed (long) names cannot be narrowed by prefix; each costs a HEAD.
        for page in chunked((n for n, _ in self._list(_HASHED)), self.max_workers * 4):
            heads, failures = self._map(self._head, page)
            if failures:
                raise next(iter(failures.values()))
            for name in page:
                head = heads.get(name)
                if head is None or head.key is None or head.metadata is None:
                    continue
                if match(head.key) and not (live and not _live(head.metadata, now)):
                    yield head.key

    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        if idle_before is not None:
            yield from super().scan(batch_size, now=now, idle_before=idle_before)
            return
        # Only expired records are wanted: every record with a TTL has a
        # marker (or a hashed name), so the rest of the bucket is never read.
        self._ready()
        moment = time.time() if now is None else now

        def candidates() -> Iterator[str]:
            for name, _ in self._list(_MARKER):
                key = decode_name(name[len(_MARKER):])
                if key is not None:
                    yield key
            for page in chunked((n for n, _ in self._list(_HASHED)), self.max_workers * 4):
                heads, _ = self._map(self._head, page)
                for head in heads.values():
                    if head is not None and head.key is not None and head.metadata is not None \
                            and head.metadata["expires_at"] is not None:
                        yield head.key

        for chunk in chunked(candidates(), batch_size):
            batch = [e for e in self.fetch_many(chunk).values() if e.expired(moment)]
            if batch:
                yield batch

    def clear(self) -> int:
        self._ready()
        count = 0
        # Every object of this namespace, markers included; only records count.
        for chunk in chunked((n for n, _ in self._list("")), _DELETE_CHUNK):
            failed = self._delete_objects(chunk)
            if failed:
                raise self._batch_failed("clear", failed, [])
            count += sum(1 for n in chunk if not n.startswith(_MARKER))
        for chunk in chunked((n for n, _ in self._list(_SEGMENTS, nested=True)), _DELETE_CHUNK):
            failed = self._delete_objects(chunk)
            if failed:
                raise self._batch_failed("clear", failed, [])
        return count

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "tier": str(self.tier) if self.tier else None,
            "key_count": sum(1 for _ in self.iter_keys("*")),
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint_url": redact(self.endpoint_url) if self.endpoint_url else None,
            "storage_class": self.storage_class,
            "force_storage_class": self.force_storage_class,
            "compression": self.compression,
            "conditional_writes": self._conditional,
        }

    # ------------------------------------------------------------ conditional
    def _conditional_put(
        self,
        key: str,
        value: str,
        metadata: Metadata,
        allowed: _Condition,
    ) -> bool:
        """PUT if ``allowed(current metadata)``, atomically via If-Match/If-None-Match."""
        name = self._name(key)
        if not self._conditional:
            with self._cas_lock:
                head = self._head(name)
                if not allowed(None if head is None else head.metadata):
                    return False
                self._put(key, name, value, metadata)
                return True
        for _ in range(_CAS_ATTEMPTS):
            head = self._head(name)
            if not allowed(None if head is None else head.metadata):
                return False
            condition = {"IfNoneMatch": "*"} if head is None else {"IfMatch": head.etag}
            try:
                self._put(key, name, value, metadata, **condition)
                return True
            except BackendError as exc:
                if not self._lost_race(exc):
                    raise
            # Another writer got in between: re-read and decide again.
        return False

    def _lost_race(self, exc: BackendError) -> bool:
        """True if ``exc`` is a failed precondition; disables conditions a server lacks."""
        cause = exc.__cause__
        if not isinstance(cause, self._botocore.ClientError):
            return False
        code, status = _error_code(cause)
        # moto answers If-Match on a since-deleted object with NoSuchKey, not 412.
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                     "NoSuchKey"):
            return True
        if status == 501 and not self._conditional_required:
            log.warning("s3: the server does not support conditional writes; "
                        "using read-compare-write (atomic within this process only)")
            self._conditional = False
            return False
        return False

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        self._ready()
        allowed = _if_version(metadata["version"], expected)
        return self._retry_unconditional(self._conditional_put, key, value, metadata, allowed)

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        self._ready()
        allowed = _if_newer(metadata["version"])
        return self._retry_unconditional(self._conditional_put, key, value, metadata, allowed)

    def store_many_if_newer(self, items: Items) -> set[str]:
        conditions = {validate_key(k): _if_newer(m["version"]) for k, (_, m) in items.items()}
        return self._conditional_many("store_many_if_newer", items, conditions)

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        conditions = {
            validate_key(k): _if_version(m["version"], expected[k]) for k, (_, m) in items.items()
        }
        return self._conditional_many("store_many_if_version", items, conditions)

    def _conditional_many(
        self, action: str, items: Items, conditions: Mapping[str, _Condition]
    ) -> set[str]:
        """The single-key conditional PUT for every item, concurrently on the pool."""
        if not items:
            return set()
        self._ready()

        def put(key: str) -> bool:
            payload, metadata = items[key]
            return self._retry_unconditional(
                self._conditional_put, key, payload, metadata, conditions[key]
            )

        results, failures = self._map(put, list(items))
        stored = {k for k, ok in results.items() if ok}
        log.debug("s3: %s of %d keys, %d stored, %d failed",
                  action, len(items), len(stored), len(failures))
        if failures:
            self._raise_batch(action, failures, stored, len(items))
        return stored

    def _retry_unconditional(self, fn: Callable[..., bool], *args: Any) -> bool:
        """Call ``fn``; if it just found conditions unsupported, call it once more."""
        conditional = self._conditional
        try:
            return fn(*args)
        except BackendError:
            if conditional and not self._conditional:
                return fn(*args)
            raise

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)
        self._ready()
        return self._retry_unconditional(self._delete_if_version, key, version)

    def _delete_if_version(self, key: str, version: int) -> bool:
        name = self._name(key)
        if not self._conditional:
            with self._cas_lock:
                head = self._head(name)
                if head is None or head.metadata is None or head.metadata["version"] != version:
                    return False
                return self.delete(key)
        for _ in range(_CAS_ATTEMPTS):
            head = self._head(name)
            if head is None or head.metadata is None or head.metadata["version"] != version:
                return False
            try:
                with self._errors("DELETE"):
                    self._client.delete_object(
                        Bucket=self.bucket, Key=self._object(name), IfMatch=head.etag
                    )
            except BackendError as exc:
                if self._lost_race(exc):
                    continue
                raise
            if not name.startswith(_HASHED):
                # A stale marker only costs a HEAD when listing; drop it anyway.
                self._delete_objects([_MARKER + name])
            return True
        return False

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        for key in versions:
            validate_key(key)
        if not versions:
            return set()
        self._ready()
        results, failures = self._map(
            lambda k: self._retry_unconditional(self._delete_if_version, k, versions[k]),
            list(versions),
        )
        deleted = {k for k, ok in results.items() if ok}
        if failures:
            self._raise_batch("delete_many_if_version", failures, deleted, len(versions))
        return deleted

    # ------------------------------------------------------------ lifecycle
    def ping(self) -> float:
        """Reach the bucket; a missing bucket, refused credentials or access are
        a :class:`ConfigurationError` (with ``create_bucket`` a missing bucket
        is fine: the first write creates it).

        A refused HEAD carries no error code (the answer has no body), so it is
        asked again as a GET of an object that does not exist, whose answer
        says why: ``NoSuchKey`` means the object calls are allowed.
        """
        start = time.perf_counter()
        client_error = self._botocore.ClientError
        with self._errors("reaching the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except client_error as exc:
                code, status = _error_code(exc)
                if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                    if not self.create_bucket:
                        raise ConfigurationError(
                            f"s3: bucket {self.bucket!r} does not exist "
                            "(create it, or open with create_bucket=true)"
                        ) from exc
                elif status in (400, 401, 403):
                    try:
                        found = self._client.get_object(
                            Bucket=self.bucket, Key=self._object(_PING_NAME)
                        )
                    except client_error as again:
                        if _error_code(again)[0] != "NoSuchKey":
                            raise self._refused(again) from again
                    else:
                        found["Body"].close()
                else:
                    raise
        return (time.perf_counter() - start) * 1000.0

    def _refused(self, exc: Any) -> TieredStateError:
        """The error for a request the server refused at :meth:`ping`."""
        code, status = _error_code(exc)
        hint = _REFUSED.get(code)
        if hint is None:
            if status == 503 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                return BackendUnavailableError(f"the S3 endpoint is unavailable ({code})", self.backend)
            if status not in (400, 401, 403):
                return BackendError(f"reaching the bucket failed: {code or 'HTTP'} (HTTP {status})",
                                    self.backend)
            hint = "check the credentials, region and endpoint_url"
        return ConfigurationError(
            f"s3: bucket {self.bucket!r} refused the request ({code or status}): {hint}"
        )

    def segments(self) -> SegmentStore:
        return _S3Segments(self)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __repr__(self) -> str:
        endpoint = f" endpoint={redact(self.endpoint_url)}" if self.endpoint_url else ""
        return (
            f"<S3StateRepository bucket={self.bucket!r} prefix={self.prefix!r}{endpoint} "
            f"tier={self.tier}>"
        )


class _S3Segments:
    """Segments (:mod:`tiered_state.segments`) as objects ``<prefix>/!s/<name>``:
    nested under a name no key's object has, so never listed as keys.

    One PUT per segment, with the storage class its size allows; a record is
    one GET with ``Range``; reads of several spans share the repository's pool.
    """

    def __init__(self, repo: S3StateRepository) -> None:
        self._repo = repo

    def _object(self, name: str) -> str:
        if not is_segment_name(name):
            raise IntegrityError(f"not a segment name: {name!r}")
        return self._repo._object(_SEGMENTS + name)

    def put(self, name: str, data: bytes) -> None:
        repo = self._repo
        repo._ready()
        repo._put_object({"Bucket": repo.bucket, "Key": self._object(name), "Body": data,
                          "ContentType": "application/octet-stream"}, storage_class=True)

    def _get(self, name: str, byte_range: str) -> bytes | None:
        repo = self._repo
        with repo._errors("GET"):
            try:
                response = repo._client.get_object(Bucket=repo.bucket, Key=self._object(name),
                                                   Range=byte_range)
                body: bytes = response["Body"].read()
            except repo._botocore.ClientError as exc:
                code, status = _error_code(exc)
                if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                    return None
                if code == "InvalidRange" or status == 416:
                    return b""  # past the end: a short read, which the caller refuses
                raise
        return body

    def read(self, name: str, offset: int, length: int) -> bytes | None:
        return self._get(name, f"bytes={offset}-{offset + length - 1}")

    def read_many(self, spans: list[tuple[str, int, int]]) -> list[bytes | None]:
        if len(spans) <= 1:
            return [self.read(*span) for span in spans]
        pool = self._repo._executor()
        return [future.result() for future in [pool.submit(self.read, *span) for span in spans]]

    def read_tail(self, name: str, length: int) -> bytes | None:
        return self._get(name, f"bytes=-{length}")

    def delete(self, name: str) -> None:
        repo = self._repo
        with repo._errors("DELETE"):
            repo._client.delete_object(Bucket=repo.bucket, Key=self._object(name))

    def list(self) -> Iterator[tuple[str, int]]:
        repo = self._repo
        repo._ready()
        for name, size in repo._list(_SEGMENTS, nested=True):
            segment = name[len(_SEGMENTS):]
            if is_segment_name(segment):
                yield segment, size


# ---------------------------------------------------------------- helpers
_SESSIONS: dict[str | None, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(boto3: Any, profile: str | None) -> Any:
    """One boto3 session per profile: a new session reloads the service model
    (~0.2 s); clients made from a shared one take ~15 ms. Sessions are not
    thread-safe, so clients are made under the same lock."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(profile)
        if session is None:
            session = _SESSIONS[profile] = boto3.session.Session(profile_name=profile or None)
        return session


def _error_code(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _meta_key(meta: Mapping[str, str]) -> str | None:
    encoded = meta.get("key")
    if not encoded:
        return None
    try:
        return base64.urlsafe_b64decode(encoded.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        return None


def _parse_metadata(meta: Mapping[str, str], key: str) -> Metadata | None:
    """``key``'s object metadata -> :class:`Metadata` (the entry's encoding,
    without the body's ``+zlib``).

    The one place object metadata is trusted. An object with a metadata
    checksum must parse and match it; one without (written before it
    existed) is taken as it parses.

    :returns: None for metadata without a checksum that does not parse (not ours).
    :raises IntegrityError: metadata with a checksum that does not parse or
        does not match it.
    """
    digest = meta.get(_DIGEST)
    packed = meta.get("encoding", "json")
    packing = "json" + _ZLIB_SUFFIX if packed.endswith(_ZLIB_SUFFIX) else "json"
    try:
        expires = meta.get("expires-at")
        fields = {
            "checksum": meta["checksum"],
            "size_bytes": int(meta["size-bytes"]),
            "version": int(meta["version"]),
            "created_at": float(meta["created-at"]),
            "updated_at": float(meta["updated-at"]),
            "expires_at": float(expires) if expires else None,
            "encoding": packed.removesuffix(_ZLIB_SUFFIX),
        }
    except (KeyError, ValueError) as exc:
        if digest is None:
            return None
        raise IntegrityError(f"s3: unreadable metadata for {key!r}", key) from exc
    return stored_metadata(key, fields, digest, packing)


def _live(metadata: Metadata, now: float) -> bool:
    """True for an unexpired value or stub (see "Entries" in the contract)."""
    expires_at = metadata["expires_at"]
    return metadata["encoding"] != TOMBSTONE and (expires_at is None or expires_at > now)


def _if_newer(version: int) -> _Condition:
    """store_if_newer's test: the stored version is below ``version``."""
    return lambda current: current is None or current["version"] < version


def _if_version(version: int, expected: int) -> _Condition:
    """store_if_version's test: the live version is ``expected`` and the stored
    one is at most ``version``."""

    def condition(current: Metadata | None) -> bool:
        if current is None:
            return expected == 0
        live = current["version"] if _live(current, time.time()) else 0
        return live == expected and current["version"] <= version

    return condition
