"""JSON from the network, bounded in size and nesting before it is parsed.

Python's parser recurses once per nesting level: a few kilobytes of ``[[[[…`` raise
``RecursionError`` (not ``ValueError``) deep inside whatever called it. Every JSON document the
portal or an agent receives therefore goes through :func:`loads`, which refuses a document
larger than ``max_bytes`` or nested deeper than ``max_depth`` with :class:`JSONLimitError`, a
``ValueError`` naming the limit, before the parser sees it. Nothing here imports Django: the
portal (``fedportal.api``, the WebSocket consumers) and the agent share it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Deeper than any document of ours (a job spec, a metrics batch: under ten levels).
MAX_DEPTH = 32

# A JSON string, escapes included: what the nesting count must skip (brackets inside strings
# do not nest anything). Linear: the two alternatives never match the same character, and the
# possessive quantifiers (Python 3.11) never give back what they took, so a string that does
# not end fails at once. A run of plain characters is taken whole, not one alternation a
# character: a model update's 330 kB of base64 on an agent's socket took 35 ms that way, 3 ms
# this way.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


class JSONLimitError(ValueError):
    """A JSON document over a size or nesting limit (a ``ValueError``, as a syntax error is)."""


def check_depth(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Refuse ``data`` if its arrays and objects nest deeper than ``max_depth``.

    Each pass removes every innermost ``[]``/``{}`` pair, so a well-formed document is empty
    after as many passes as it is deep. Anything left after ``max_depth`` passes is too deep
    (or not well-formed, which the parser reports instead).
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    if brackets:
        raise JSONLimitError(f"JSON nested deeper than {max_depth} levels")


def loads(
    data: str | bytes,
    *,
    max_depth: int = MAX_DEPTH,
    max_bytes: int | None = None,
    allow_nan: bool = False,
) -> Any:
    """``json.loads`` for untrusted input: ``JSONLimitError`` past the limits, ``ValueError``
    for anything else that is not JSON. NaN and Infinity (not JSON) are refused unless
    ``allow_nan``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if max_bytes is not None and len(raw) > max_bytes:
        raise JSONLimitError(f"JSON document of {len(raw)} bytes; at most {max_bytes}")
    try:
        check_depth(raw, max_depth)
    except JSONLimitError:
        _raise_syntax_error_first(raw)
        raise
    return json.loads(data, parse_constant=None if allow_nan else _refuse_constant)


def _raise_syntax_error_first(raw: bytes) -> None:
    """A malformed document may look deep to :func:`check_depth`; say what is wrong with it."""
    try:
        json.loads(raw)
    except RecursionError:
        return
    except ValueError:
        raise


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
