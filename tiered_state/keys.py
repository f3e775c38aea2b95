"""Key validation and the glob dialect every backend speaks.

A key is a ``str`` of 1..1024 UTF-8 bytes with no control character (Unicode
category ``Cc``: C0, DEL and C1). Lone surrogates are not valid UTF-8, so they
are rejected too.

Patterns are globs: ``*`` matches any run of characters (``/`` included), ``?``
exactly one character, ``[abc]`` / ``[a-z]`` one character of a class
(``[!x]`` or ``[^x]`` negates it) and ``\\`` makes the next character literal.
:func:`compile_pattern` is the reference matcher; each backend translates a
pattern into its own query language (:func:`to_like`, :func:`to_redis`,
:func:`literal_prefix`) and the tests check every translation against it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from .errors import InvalidKeyError

__all__ = [
    "MAX_KEY_BYTES",
    "compile_pattern",
    "has_class",
    "literal_prefix",
    "matches",
    "to_like",
    "to_redis",
    "validate_key",
    "validate_keys",
    "validate_pattern",
]

MAX_KEY_BYTES = 1024

# Control characters are rare, so one regex finds them far faster than a
# per-character unicodedata lookup; C0 (\x00-\x1f), DEL and C1 are exactly Cc.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid key, else raise :class:`InvalidKeyError`.

    :raises InvalidKeyError: not a ``str``, empty, over 1024 UTF-8 bytes,
        not encodable as UTF-8, or containing a control character.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a str, not {type(key).__name__}")
    if key.isascii():  # the common case: length in bytes is the length in chars
        size = len(key)
        if key.isprintable() and 0 < size <= MAX_KEY_BYTES:
            return key  # printable ASCII has no control character
    else:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidKeyError("key is not valid UTF-8 (lone surrogate)") from None
    if size > MAX_KEY_BYTES or not size:
        if not size:
            raise InvalidKeyError("key must not be empty")
        raise InvalidKeyError(f"key is {size} UTF-8 bytes; the limit is {MAX_KEY_BYTES}")
    found = _CONTROL.search(key)
    if found:
        char = found.group()
        raise InvalidKeyError(
            f"key contains control character U+{ord(char):04X} "
            f"({unicodedata.name(char, 'control')}) at index {found.start()}"
        )
    return key


def validate_keys(keys: Iterable[object]) -> list[str]:
    """Validate every key of ``keys`` (all before any I/O) and return them as a list."""
    if isinstance(keys, (str, bytes)):
        raise InvalidKeyError("expected a collection of keys, not a single string")
    return [validate_key(k) for k in keys]


def validate_pattern(pattern: object) -> str:
    """Check that ``pattern`` is a usable glob and return it.

    :raises InvalidKeyError: not a ``str``, over the key size, a control
        character, or a ``[`` class that is never closed.
    """
    if not isinstance(pattern, str):
        raise InvalidKeyError(f"pattern must be a str, not {type(pattern).__name__}")
    if pattern == "":
        raise InvalidKeyError("pattern must not be empty (use '*' for every key)")
    if len(pattern.encode("utf-8", "surrogatepass")) > 4 * MAX_KEY_BYTES:
        raise InvalidKeyError("pattern is too long")
    if _CONTROL.search(pattern):
        raise InvalidKeyError("pattern contains a control character")
    _tokens(pattern)  # raises on an unterminated class
    return pattern


# Tokens: ("lit", char) | ("any",) | ("one",) | ("class", negate, body)
_Token = tuple[str, ...]


@functools.lru_cache(maxsize=256)
def _tokens(pattern: str) -> tuple[_Token, ...]:
    out: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 < n:
                out.append(("lit", pattern[i + 1]))
                i += 2
            else:  # a trailing backslash can only mean itself
                out.append(("lit", "\\"))
                i += 1
        elif c == "*":
            if not out or out[-1] != ("any",):
                out.append(("any",))
            i += 1
        elif c == "?":
            out.append(("one",))
            i += 1
        elif c == "[":
            j = i + 1
            negate = "0"
            if j < n and pattern[j] in "!^":
                negate = "1"
                j += 1
            body: list[str] = []
            first = True
            while j < n and (pattern[j] != "]" or first):
                if pattern[j] == "\\" and j + 1 < n:
                    body.append("\\" + pattern[j + 1])
                    j += 2
                else:
                    body.append(pattern[j])
                    j += 1
                first = False
            if j >= n:
                raise InvalidKeyError(f"unterminated '[' in pattern {pattern!r}")
            out.append(("class", negate, "\x00".join(body)))
            i = j + 1
        else:
            out.append(("lit", c))
            i += 1
    return tuple(out)


def _class_regex(negate: str, body: str) -> str:
    items = body.split("\x00") if body else []
    parts: list[str] = []
    k = 0
    while k < len(items):
        item = items[k]
        char = item[1] if item.startswith("\\") and len(item) == 2 else item
        if k + 2 < len(items) and items[k + 1] == "-":
            end = items[k + 2]
            end = end[1] if end.startswith("\\") and len(end) == 2 else end
            if ord(end) >= ord(char):
                parts.append(re.escape(char) + "-" + re.escape(end))
            k += 3
            continue
        parts.append(re.escape(char))
        k += 1
    if not parts:
        return "[^\\s\\S]" if negate == "0" else "[\\s\\S]"
    return "[" + ("^" if negate == "1" else "") + "".join(parts) + "]"


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a glob into the reference regex (anchored, ``*`` crosses ``/``)."""
    regex: list[str] = []
    for token in _tokens(pattern):
        kind = token[0]
        if kind == "lit":
            regex.append(re.escape(token[1]))
        elif kind == "any":
            regex.append("[\\s\\S]*")
        elif kind == "one":
            regex.append("[\\s\\S]")
        else:
            regex.append(_class_regex(token[1], token[2]))
    return re.compile("".join(regex) + "\\Z", re.DOTALL)


def matches(pattern: str, key: str) -> bool:
    """The reference matcher: does ``key`` match the glob ``pattern``?"""
    return compile_pattern(pattern).match(key) is not None


def literal_prefix(pattern: str) -> str:
    """The literal text every match starts with (for prefix listing, e.g. S3)."""
    prefix: list[str] = []
    for token in _tokens(pattern):
        if token[0] != "lit":
            break
        prefix.append(token[1])
    return "".join(prefix)


def has_class(pattern: str) -> bool:
    """True if the pattern uses a ``[...]`` class (which LIKE cannot express)."""
    return any(t[0] == "class" for t in _tokens(pattern))


def is_literal(pattern: str) -> bool:
    """True if the pattern matches exactly one key (no wildcard at all)."""
    return all(t[0] == "lit" for t in _tokens(pattern))


def to_like(pattern: str, escape: str = "\\") -> str:
    """Translate to a SQL ``LIKE`` pattern (use with ``ESCAPE '\\'``).

    ``%``, ``_`` and the escape character in the glob's literal text are
    escaped so they match themselves. A ``[...]`` class cannot be expressed in
    LIKE: it becomes ``_`` (any one character), so the result over-matches and
    callers filter the rows with :func:`matches` when :func:`has_class` is true.
    """
    out: list[str] = []
    for token in _tokens(pattern):
        kind = token[0]
        if kind == "lit":
            char = token[1]
            out.append(escape + char if char in ("%", "_", escape) else char)
        elif kind == "any":
            out.append("%")
        else:  # "one" and "class"
            out.append("_")
    return "".join(out)


def to_redis(pattern: str) -> str:
    """Translate to a Redis ``MATCH`` glob (same dialect; ``[!x]`` -> ``[^x]``).

    Every literal character Redis treats specially is escaped. Redis globs
    match *bytes*, so ``?`` and ``[...]`` miss multi-byte characters: callers
    scan by the literal prefix (or this glob when it is ASCII-only) and always
    filter with :func:`matches`.
    """
    out: list[str] = []
    for token in _tokens(pattern):
        kind = token[0]
        if kind == "lit":
            char = token[1]
            out.append("\\" + char if char in "*?[]\\^" else char)
        elif kind == "any":
            out.append("*")
        elif kind == "one":
            out.append("?")
        else:
            items = token[2].split("\x00") if token[2] else []
            body = "".join(
                it if it.startswith("\\") or it == "-" else ("\\" + it if it in "]\\[^" else it)
                for it in items
            )
            out.append("[" + ("^" if token[1] == "1" else "") + body + "]")
    return "".join(out)
