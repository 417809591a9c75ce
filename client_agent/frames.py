"""JSON frames over a stream socket: how a client script and its runtime talk.

A frame is a 4-byte big-endian length, then a UTF-8 JSON object with a string ``type``.
Standard library only: the agent side never needs torch to pass messages; a script's scalar
tensors and numpy numbers (``flare.log`` values) become plain numbers when encoded.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

MAX_FRAME_BYTES = 16 * 1024 * 1024
_FRAME_LEN = struct.Struct(">I")


class WireFormatError(ValueError):
    """Bytes that are not a valid FedPortal message or model file."""


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    # torch tensors and numpy arrays/scalars of one element, without importing either.
    numel = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", 0)
    if numel == 1 and callable(getattr(value, "item", None)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(obj: Any) -> str:
    """Compact JSON; one-element tensors and numpy values become numbers."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"))


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """A 4-byte big-endian length, then the message as UTF-8 JSON."""
    if not isinstance(message, Mapping) or not isinstance(message.get("type"), str):
        raise WireFormatError("a frame must be a JSON object with a string 'type'")
    body = dumps(message).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise WireFormatError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _FRAME_LEN.pack(len(body)) + body


def decode_frame_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireFormatError("frame is not UTF-8 JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireFormatError("frame must be a JSON object with a string 'type'")
    return message


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(encode_frame(message))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Block for one frame. Raises ``ConnectionError`` on EOF, WireFormatError on garbage."""
    (length,) = _FRAME_LEN.unpack(_recv_exact(sock, _FRAME_LEN.size))
    if length > MAX_FRAME_BYTES:
        raise WireFormatError(f"frame length {length} exceeds {MAX_FRAME_BYTES}; not our protocol")
    return decode_frame_body(_recv_exact(sock, length))
