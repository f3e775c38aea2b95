"""URL -> repository: the backend registry, driver imports and environment config.

Each backend registers its URL schemes in :data:`_REGISTRY` as a
``"module:Class"`` string, imported on first use, so ``import tiered_state``
imports no driver. A backend gets its driver through :func:`require`, whose
error names the extra to install.

Third-party backends join the registry in one of two ways:

* :func:`register_backend` (``tiered_state.register_backend("dynamo",
  "ts_dynamo:DynamoStateRepository", extra="tiered-state-dynamo")``), at run
  time;
* an entry point in the group ``tiered_state.backends`` of their
  distribution (name: the scheme, value: ``"module:Class"``). Entry points
  are read through :mod:`importlib.metadata` only when a URL names a scheme
  the registry does not know -- never at import, never for a known scheme --
  and the scheme found is then registered like any other.

Options ride in the URL's query string (``redis://host/0?prefix=app:``); each
backend's ``from_url`` documents its own. :func:`redact` hides passwords
wherever a URL is shown.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

from .errors import ConfigurationError, MissingDependencyError

if TYPE_CHECKING:
    from .repositories.base import StateRepository

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_COLD",
    "ENV_HOT",
    "ENV_PATH",
    "ENV_STATSD",
    "ENV_WARM",
    "backend_class",
    "encode_userinfo",
    "open_repository",
    "query_options",
    "redact",
    "register_backend",
    "registry",
    "require",
    "unknown_options",
]

ENV_HOT = "TIERED_STATE_HOT"
ENV_WARM = "TIERED_STATE_WARM"
ENV_COLD = "TIERED_STATE_COLD"
ENV_PATH = "TIERED_STATE_PATH"
ENV_STATSD = "TIERED_STATE_STATSD"

_PKG = "tiered_state.repositories."

# scheme -> "module:Class". One line per scheme; adding a backend adds a line.
_REGISTRY: dict[str, str] = {
    "memory": _PKG + "memory_repository:MemoryStateRepository",
    "redis": _PKG + "redis_repository:RedisStateRepository",
    "rediss": _PKG + "redis_repository:RedisStateRepository",
    "unix": _PKG + "redis_repository:RedisStateRepository",
    "sqlite": _PKG + "sqlite_repository:SQLiteStateRepository",
    "postgresql": _PKG + "postgres_repository:PostgresStateRepository",
    "postgres": _PKG + "postgres_repository:PostgresStateRepository",
    "file": _PKG + "filesystem_repository:FileSystemStateRepository",
    "s3": _PKG + "s3_repository:S3StateRepository",
}

#: Read-only view of the registry: scheme -> "module:Class".
registry: Mapping[str, str] = MappingProxyType(_REGISTRY)

#: The entry-point group in which a distribution declares backends: each
#: entry point's name is a URL scheme, its value ``"module:Class"``.
ENTRY_POINT_GROUP = "tiered_state.backends"

# scheme -> what to install when the backend's module cannot be imported
# (register_backend's ``extra``, else the distribution of its entry point).
_INSTALL: dict[str, str] = {}
# scheme -> the distribution whose entry point registered it, for messages.
_DISTRIBUTION: dict[str, str] = {}
# Registration and the entry-point lookup may run in several threads (two
# tiers opened at once); the lock keeps each check-then-set whole.
_REGISTRY_LOCK = threading.Lock()

# RFC 3986 scheme characters, lower-case (schemes are case-insensitive and
# scheme_of lower-cases them), without "+": what follows a "+" is the
# backend's own variant (postgresql+psycopg2://, redis+cluster://) and is
# never looked up.
_SCHEME = re.compile(r"[a-z][a-z0-9.-]*\Z")
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_TARGET = re.compile(rf"{_NAME}:{_NAME}\Z")


def register_backend(
    scheme: str, target: str, extra: str | None = None, *, replace: bool = False
) -> None:
    """Make ``scheme://`` URLs open the repository class ``target``.

    ``target`` is a ``"module:Class"`` string, imported when a URL with this
    scheme is first opened (not now), so registering costs nothing and a
    backend's driver is imported only by those who use it. The class must
    subclass :class:`~tiered_state.repositories.base.StateRepository` and
    implement ``from_url``; :mod:`tiered_state.testing` holds the behaviour
    it must show.

    Registering a scheme again with the same target is allowed (and updates
    ``extra``); with another target it is refused unless ``replace=True``, so
    two packages cannot silently take each other's scheme -- built-in
    schemes included. A distribution can instead declare the scheme as an
    entry point in the group ``tiered_state.backends``; it is looked up only
    when a URL names a scheme nothing registered, so a registered scheme
    always wins over an entry point.

    >>> import tiered_state
    >>> from tiered_state.config import open_repository
    >>> tiered_state.register_backend(
    ...     "lru", "tiered_state.repositories.memory_repository:MemoryStateRepository")
    >>> with open_repository("lru://?max_items=100") as repo:
    ...     (repo.backend, repo.max_items)
    ('memory', 100)

    :param scheme: the URL scheme, without ``://``: a letter, then letters,
        digits, ``.`` or ``-``; case-insensitive.
    :param target: ``"module:Class"`` (``"ts_dynamo:DynamoStateRepository"``).
    :param extra: what to ``pip install`` when the module cannot be imported
        (``"tiered-state-dynamo"``, ``"tiered-state[s3]"``); the error then
        names it.
    :param replace: replace a scheme already registered to another target.
    :raises ConfigurationError: a malformed scheme, target or extra, or a
        scheme already registered to another target (without ``replace``).
    """
    name = _check_scheme(scheme)
    if not isinstance(target, str) or not _TARGET.match(target.strip()):
        raise ConfigurationError(
            f"a backend target is a 'module:Class' string such as "
            f"'my_package.backend:MyStateRepository', not {target!r}"
        )
    target = target.strip()
    if extra is not None and (not isinstance(extra, str) or not extra.strip()
                              or any(c.isspace() for c in extra.strip())):
        raise ConfigurationError(
            f"extra is the requirement to pip install (such as 'tiered-state-dynamo'), "
            f"not {extra!r}"
        )
    with _REGISTRY_LOCK:
        current = _REGISTRY.get(name)
        if current is not None and current != target and not replace:
            raise ConfigurationError(
                f"the URL scheme {name!r} is already registered to {current!r}; "
                "pass replace=True to register another backend for it"
            )
        if current != target:
            _DISTRIBUTION.pop(name, None)
            _INSTALL.pop(name, None)
        _REGISTRY[name] = target
        if extra is not None:
            _INSTALL[name] = extra.strip()


def _check_scheme(scheme: object) -> str:
    """``scheme`` lower-cased, or a :class:`ConfigurationError` saying what a scheme is."""
    name = scheme.strip().lower() if isinstance(scheme, str) else None
    if name is None or not _SCHEME.match(name):
        hint = (" ('+' is left to a backend's own variants, as in postgresql+psycopg2://)"
                if isinstance(scheme, str) and "+" in scheme else "")
        raise ConfigurationError(
            "a URL scheme is a letter followed by letters, digits, '.' or '-' "
            f"(no '://'), not {scheme!r}{hint}"
        )
    return name


def require(module: str, extra: str) -> ModuleType:
    """Import a driver, or raise :class:`MissingDependencyError` naming the extra.

    :param module: the import name (``"redis"``, ``"psycopg2"``, ``"boto3"``).
    :param extra: the tiered-state extra that installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra) from exc


# Where a URL inside text ends.
_URL_END = re.compile(r"[\s'\"<>]")
# Where a URL's host part (the authority) ends at the latest; a URL given as
# another URL's query value also ends at the next option.
_HEAD_END = re.compile(r"[?#]")
_NESTED_HEAD_END = re.compile(r"[?#&]")
_OPTION_MARK = re.compile(r"[=&]")
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
# Schemes whose "//" starts a path, never user info.
_NO_USERINFO = frozenset({"file", "sqlite", "memory"})
# An option name and its "=" (URL query or libpq key=value). Only whole names:
# the lookbehind keeps every attempt at the start of a run of name characters,
# so long text (a value printed by the CLI) is scanned in linear time.
_OPTION_NAME = re.compile(r"(?<![\w.-])[\w.-]+=")
# A name holding one of these marks a secret value: password, sslpassword,
# aws_secret_access_key, aws_session_token, secret, token, api_key...
_SECRET_NAME = re.compile(
    r"passw(?:or)?d|pwd|passphrase|secret|token|api_?key|credential", re.IGNORECASE
).search
# An option value runs to the next separator, or is quoted (libpq key=value
# style) and runs to the closing quote.
_VALUE_END = re.compile(r"[&\s\"<>]")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?")
# What a driver would not read as part of a password: the delimiters, and a
# "%" that starts no escape (drivers decode "%XX" and refuse a lone "%").
_USERINFO_RAW = re.compile(r"[/?#@]|%(?![0-9A-Fa-f]{2})")
# host[:port], comma-separated (libpq lists several); IPv6 in brackets.
_HOSTS = re.compile(r"(?:\[[0-9A-Fa-f:.]*\]|[^:@/\[\]]*)(?::[0-9]*)?"
                    r"(?:,(?:\[[0-9A-Fa-f:.]*\]|[^:@/\[\]]*)(?::[0-9]*)?)*\Z")


def _userinfo_end(text: str, start: int, end: int, nested: bool) -> int:
    """Index of the ``@`` that ends the user info of the URL whose part after
    ``scheme://`` is ``text[start:end]``; -1 if it has none.

    It is the *last* ``@`` before the query: a password may hold a raw ``/``
    or ``@`` (``redis://:pa/ss@word@host``), which a strict parser would take
    for the start of the path or the end of the user info, showing the rest
    of the password as a host or a path. A ``?`` or ``#`` followed by an ``@``
    before any option (``redis://:pa?ss@host``) is the password's too.
    """
    pattern = _NESTED_HEAD_END if nested else _HEAD_END
    head = start
    while True:  # ends: head moves forward on every turn
        stop = pattern.search(text, head, end)
        if stop is None:
            return text.rfind("@", start, end)
        option = _OPTION_MARK.search(text, stop.end(), end)
        at = text.rfind("@", stop.end(), option.start() if option else end)
        if at < 0:
            return text.rfind("@", start, stop.start())
        head = at + 1


def _scheme_start(text: str, colon: int, floor: int) -> int:
    """Where the scheme ending at ``text[colon]`` (its ``://``) starts, not below ``floor``."""
    begin = colon
    while begin > floor and text[begin - 1] in _SCHEME_CHARS:
        begin -= 1
    return begin


def _password_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each URL password in ``text``.

    Each URL is examined up to where the next one starts at the latest, so
    every character is looked at a bounded number of times.
    """
    found = text.find("://")
    begin = _scheme_start(text, found, 0)
    while found >= 0:
        start = found + 3
        following = text.find("://", start)
        limit = len(text) if following < 0 else _scheme_start(text, following, start)
        scheme = text[begin:found].split("+", 1)[0].lower()
        if scheme not in _NO_USERINFO:
            stop = _URL_END.search(text, start, limit)
            end = stop.start() if stop else limit
            nested = begin > 0 and text[begin - 1] == "="
            at = _userinfo_end(text, start, end, nested)
            colon = text.find(":", start, at) if at >= 0 else -1
            if colon >= 0:  # a user name alone is no secret
                yield colon + 1, at
        found, begin = following, limit


def _secret_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each secret option value in ``text``.

    Linear in ``len(text)``: the next separator and ``%`` are found once for
    all the names before them, and names inside a value already dealt with
    are skipped.
    """
    done = 0  # names before this lie in a value already dealt with
    separator = percent = -1
    for match in _OPTION_NAME.finditer(text):
        at = match.end()
        if match.start() < done:
            continue
        if separator < at:
            found = _VALUE_END.search(text, at)
            separator = found.start() if found else len(text)
        if _SECRET_NAME(match.group()):
            quoted = _QUOTED.match(text, at)
            done = quoted.end() if quoted else separator
            if done > at:
                yield at, done
            continue
        if percent < at:
            percent = text.find("%", at)
            percent = len(text) if percent < 0 else percent
        if percent < separator:
            # Percent-encoded, the value may hide a URL or options of its own
            # (?endpoint_url=http%3A%2F%2Fuser%3Apw%40host): hidden whole if so.
            value = text[at:separator]
            decoded = unquote_plus(value)
            if decoded != value and redact(decoded) != decoded:  # shorter: recursion ends
                yield at, separator
            done = separator


def redact(url: str) -> str:
    """``url`` (or any text holding URLs or ``key=value`` options) with every
    password and secret option value replaced by ``***``.

    User info runs to the last ``@`` before the query, so a password holding
    a raw ``/`` or ``@`` is hidden whole; option values are hidden whatever
    their spelling (``password=``, ``sslpassword=``, ``aws_secret_access_key=``,
    ``token=``...); a percent-encoded option value that hides one (a URL in
    another URL's query) is hidden whole.
    """
    spans: list[tuple[int, int]] = []
    if "://" in url:
        spans.extend(_password_spans(url))
    if "=" in url:
        spans.extend(_secret_spans(url))
    if not spans:
        return url
    parts = []
    done = 0
    for start, end in sorted(spans):
        if end <= done:  # inside a span already hidden
            continue
        start = max(start, done)
        parts.append(url[done:start])
        parts.append("***")
        done = end
    parts.append(url[done:])
    return "".join(parts)


def encode_userinfo(url: str) -> str:
    """``url`` with a raw ``/``, ``?``, ``#``, ``@`` or lone ``%`` in its user info
    percent-encoded.

    Drivers split ``scheme://user:pa/ss@word@host/db`` at the first ``/`` or
    ``@`` and then connect to a "host" that is part of the password (and name
    it in their errors). Here the user info runs to the last ``@`` before the
    query, as in :func:`redact`, so what is hidden is exactly what is sent as
    the password. A URL whose authority (up to the first ``/``) is already
    a plain ``host[:port]`` list is returned as it is: an ``@`` further on is
    then part of its path.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() in _NO_USERINFO or "@" not in rest:
        return url
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" not in authority and _HOSTS.match(authority):
        return url
    at = _userinfo_end(rest, 0, len(rest), False)
    if at < 0:
        return url
    userinfo = rest[:at]
    encoded = _USERINFO_RAW.sub(lambda m: f"%{ord(m.group()):02X}", userinfo)
    return url if encoded == userinfo else f"{scheme}://{encoded}{rest[at:]}"


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased (``postgresql+psycopg2`` -> ``postgresql``)."""
    if "://" not in url:
        # Not echoed: without a scheme nothing tells a password from a path.
        raise ConfigurationError("not a URL (no scheme://)")
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def query_options(url: str) -> tuple[str, dict[str, str]]:
    """Split ``url`` into the URL without its query and the query as a dict."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(query="")), options


def backend_class(scheme: str) -> type[StateRepository]:
    """The repository class registered for ``scheme`` (imports its module).

    A scheme nothing registered is looked up among the entry points of the
    group ``tiered_state.backends`` (see :func:`register_backend`).

    :raises ConfigurationError: unknown scheme, or a registration that does
        not name a repository class.
    :raises MissingDependencyError: the backend's module cannot be imported.
    """
    target = _REGISTRY.get(scheme)
    if target is None:
        target = _from_entry_points(scheme)
    if target is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigurationError(
            f"unknown URL scheme {scheme!r}; known: {known} (a third-party backend is "
            f"added with tiered_state.register_backend or an entry point in the group "
            f"{ENTRY_POINT_GROUP!r})"
        )
    return _load(scheme, target)


def _from_entry_points(scheme: str) -> str | None:
    """Register ``scheme`` from the entry point declaring it, if one does;
    return its target (None: no distribution declares it)."""
    # Imported here: only a URL with an unknown scheme pays for reading the
    # metadata of every installed distribution.
    from importlib import metadata

    try:
        found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.name.strip().lower() == scheme]
    except Exception as exc:  # a broken installed distribution: say so, no traceback
        raise ConfigurationError(
            f"reading the entry points of the group {ENTRY_POINT_GROUP!r} failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not found:
        return None
    claims = sorted({(_distribution(ep), ep.value.strip()) for ep in found})
    if len({value for _, value in claims}) > 1:
        listed = "; ".join(f"{dist!r} -> {value!r}" for dist, value in claims)
        raise ConfigurationError(
            f"the URL scheme {scheme!r} is declared by several entry points of the group "
            f"{ENTRY_POINT_GROUP!r} ({listed}); uninstall one, or choose with "
            "tiered_state.register_backend"
        )
    dist, value = claims[0]
    # An entry point may name extras ("module:Class [fast]"); they are pip's business.
    target = value.split("[", 1)[0].strip()
    if not _TARGET.match(target):
        raise ConfigurationError(
            f"the entry point {found[0].name!r} of the distribution {dist!r} (group "
            f"{ENTRY_POINT_GROUP!r}) is {value!r}, not a 'module:Class' string"
        )
    with _REGISTRY_LOCK:
        if scheme not in _REGISTRY:  # another thread may have registered it meanwhile
            _REGISTRY[scheme] = target
            _DISTRIBUTION[scheme] = dist
            _INSTALL.setdefault(scheme, dist)
        return _REGISTRY[scheme]


def _distribution(entry_point: Any) -> str:
    """The name of the distribution that declares ``entry_point``."""
    dist = getattr(entry_point, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return str(name) if name else "an unknown distribution"


def _load(scheme: str, target: str) -> type[StateRepository]:
    """Import ``target`` ("module:Class") for ``scheme``, every failure a clear error."""
    from .repositories.base import StateRepository

    module_name, _, attribute = target.partition(":")
    dist = _DISTRIBUTION.get(scheme)
    origin = f" (from the distribution {dist!r})" if dist else ""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or module_name
        install = _INSTALL.get(scheme)
        error = MissingDependencyError(missing.split(".")[0], install or "")
        # Not the tiered-state extra the stock message names: a third-party
        # backend is installed by its own distribution.
        error.args = (
            f"the {scheme}:// backend{origin} cannot be imported: no module named "
            f"{missing!r}" + (f"; pip install {install!r}" if install else ""),
        )
        raise error from exc
    except Exception as exc:
        raise ConfigurationError(
            f"the {scheme}:// backend{origin} failed to import: module {module_name!r} "
            f"raised {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    found: Any = module
    try:
        for part in attribute.split("."):
            found = getattr(found, part)
    except AttributeError:
        raise ConfigurationError(
            f"the {scheme}:// backend{origin} names {target!r}, but module "
            f"{module_name!r} has no {attribute!r}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, StateRepository)):
        raise ConfigurationError(
            f"the {scheme}:// backend{origin} names {target!r}, which is not a "
            "StateRepository subclass"
        )
    return found


def open_repository(url: str, **options: Any) -> StateRepository:
    """Open the repository a URL names; ``options`` override query options.

    :raises ConfigurationError: unknown scheme or bad option.
    :raises MissingDependencyError: the backend's driver is not installed.
    """
    scheme = scheme_of(url)
    cls = backend_class(scheme)
    try:
        return cls.from_url(encode_userinfo(url), **options)
    except TypeError as exc:
        error = keyword_error(exc, scheme, given_options(url, options), cls)
        if error is None:
            raise
        raise error from exc


def unknown_options(
    scheme: str, unknown: Iterable[str], valid: Iterable[str], *, more: str = ""
) -> ConfigurationError:
    """The error for options a backend does not take: it names each one, says
    which valid option it looks like, and lists the valid ones.

    :param scheme: the URL scheme (``"sqlite"``), shown as ``sqlite://``.
    :param unknown: the option names given that the backend does not take.
    :param valid: every option the backend takes.
    :param more: appended to the list (``"or any libpq parameter"``).
    :returns: the error, for the caller to raise.
    """
    choices = sorted(set(valid))
    names = []
    for name in sorted(set(unknown)):
        shown = repr(name if len(name) <= 64 else name[:61] + "...")
        close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.6)
        names.append(f"{shown} (did you mean {close[0]!r}?)" if close else shown)
    plural = "s" if len(names) > 1 else ""
    listed = ", ".join(choices) if choices else "none"
    return ConfigurationError(
        f"{scheme}:// does not take the option{plural} {', '.join(names)}; "
        f"valid options: {listed}{' ' + more if more else ''}"
    )


#: The name in Python's TypeError for an unexpected keyword argument.
_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '([^']+)'")


def given_options(url: str, options: Mapping[str, Any] | None = None) -> set[str]:
    """The option names a URL's query and ``options`` give."""
    query = url.split("?", 1)[1] if "?" in url else ""
    names = {unquote_plus(part.split("=", 1)[0]) for part in query.split("#", 1)[0].split("&")}
    return (names | set(options or ())) - {""}


def keyword_error(
    exc: BaseException, scheme: str, given: Iterable[str], cls: type[Any]
) -> ConfigurationError | None:
    """A :class:`ConfigurationError` for a ``TypeError`` about an unexpected
    keyword argument that is one of the options the user gave, else None.

    A backend that hands its options on (to its constructor, or to its
    driver) fails that way on a misspelt one; a ``TypeError`` about anything
    else is a bug and is left alone. The valid options listed are the keyword
    parameters of the backend's constructor.
    """
    match = _UNEXPECTED_KEYWORD.search(str(exc)) if isinstance(exc, TypeError) else None
    if match is None or match.group(1) not in set(given):
        return None
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no signature to read: list none
        parameters = ()  # type: ignore[assignment]
    # Those with a default: the others (a path, a bucket) come from the URL itself.
    valid = [p.name for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
             and not p.name.startswith("_")]
    return unknown_options(scheme, [match.group(1)], valid)


def parse_bool(value: str | bool, name: str) -> bool:
    """Parse a URL option as a boolean (1/0, true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"option {name!r} must be a boolean, not {value!r}")


def parse_number(value: str | float | int | None, name: str, *, minimum: float = 0) -> float | None:
    """Parse a URL option as a non-negative number; empty or ``none`` is None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"option {name!r} must be a number, not {value!r}") from None
    if number < minimum or number != number:
        raise ConfigurationError(f"option {name!r} must be >= {minimum}, not {value!r}")
    return number


def environ(name: str, default: str | None = None) -> str | None:
    """A ``TIERED_STATE_*`` variable; blank counts as unset."""
    value = os.environ.get(name, "").strip()
    return value or default
