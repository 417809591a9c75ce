"""The agent's WebSocket messages and their bounds: one home that both ends import.

The portal (``jobs.consumers``, ``jobs.services.sites``, ``jobs.models``) imports this module;
the agent never imports the portal. Standard library only.

Bounds, and why these numbers:

- :data:`MAX_MESSAGE_BYTES`: one message from an agent, as sent (compact JSON, ASCII). Half of
  Daphne's own cap (1 MiB, ``websocket_max_message_size``), so that a larger message still
  reaches the consumer, which refuses it with an acknowledgement naming the fault. A message
  over Daphne's cap is not refused but fails the connection (close code 1009); an agent that
  sent it again after every reconnect would loop for ever.
- :data:`MAX_LINE_CHARS`: one output line; the agent cuts a longer line to its start and a
  marker saying how long it was (:func:`cut_line`), and so does the portal for a sender that
  did not. The agent reads no more of a line than it keeps, however long the line.
- :data:`MAX_LINES_PER_REPORT`: output lines in one report.
"""

from __future__ import annotations

import json
from typing import Any

MAX_MESSAGE_BYTES = 512 * 1024
MAX_LINE_CHARS = 2000
MAX_LINES_PER_REPORT = 1000
# The longest a line's UTF-8 can be before it is cut: 4 bytes a character at most.
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS

# Error codes in an acknowledgement ``{"type": "ack", "id", "error": {"code", "message"}}``.
ERROR_TOO_LARGE = "too_large"  # over MAX_MESSAGE_BYTES: dropped by the agent, never resent
ERROR_SLOW_DOWN = "slow_down"  # over the site's rate: sent again after ``retry_after`` seconds
# WebSocket close code of a server that met a message over its own cap (RFC 6455).
CLOSE_MESSAGE_TOO_BIG = 1009


def encode(message: Any) -> str:
    """A message as sent: compact JSON, ASCII only, so its length is its size in bytes."""
    return json.dumps(message, separators=(",", ":"))


def cut_line(text: str, total_bytes: int | None = None) -> str:
    """``text`` if it fits in :data:`MAX_LINE_CHARS`; otherwise its start and a marker that
    says how long the whole line was (``total_bytes``, when the sender read only its start)."""
    if total_bytes is None and len(text) <= MAX_LINE_CHARS:
        return text
    if total_bytes is None:
        total_bytes = len(text.encode("utf-8", "replace"))
    marker = f" … [line cut: {total_bytes} bytes in all]"
    return text[: MAX_LINE_CHARS - len(marker)] + marker
