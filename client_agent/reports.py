"""What the agent reports, shaped to fit the protocol's bounds (``client_agent.protocol``):
a script's output lines read from its log, each cut to size, and items packed into messages
under the byte budget."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from client_agent.protocol import MAX_LINE_BYTES, cut_line, encode

READ_BYTES = 1 << 20  # of a log, at most, on each read


class OutputTail:
    """Complete lines appended to a file since the last read.

    Each line comes with its byte offset in the file (its id: a line read again after a
    restart is stored once) and is cut to the protocol's length: of a line longer than that,
    only the start is kept in memory, however long it grows before its newline arrives.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0  # read up to here
        self.start = 0  # where the line being read starts
        self.head = b""  # its first bytes, at most MAX_LINE_BYTES
        self.length = 0  # its length so far, in bytes

    def read(self, final: bool = False) -> list[tuple[int, str]]:
        """The lines completed by the next :data:`READ_BYTES` of the file at most. ``final``:
        the writer is gone, so a last line without its newline counts too, once the file is
        read to its end."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(READ_BYTES)
        except OSError:
            return []
        self.offset += len(data)
        ends_open = not data.endswith(b"\n") if data else self.length > 0
        if final and len(data) < READ_BYTES and ends_open:
            data += b"\n"  # the end of the file ends its last line
        lines: list[tuple[int, str]] = []
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            piece = data[pos : len(data) if end == -1 else end]
            if len(self.head) < MAX_LINE_BYTES:
                self.head += piece[: MAX_LINE_BYTES - len(self.head)]
            self.length += len(piece)
            if end == -1:
                break
            text = self.head.decode("utf-8", "replace").rstrip("\r")
            cut = self.length > len(self.head)
            lines.append((self.start, cut_line(text, self.length if cut else None)))
            self.start += self.length + 1
            self.head, self.length = b"", 0
            pos = end + 1
        return lines


def pack(
    items: Iterable[Any], *, envelope: dict[str, Any], key: str, most: int, budget: int
) -> tuple[list[list[Any]], list[Any]]:
    """Split ``items`` into batches, in order, each of at most ``most`` items and each small
    enough that ``envelope`` holding it under ``key`` (with an ``id``) encodes to at most
    ``budget`` bytes. Returns the batches, and the items that fit in no message at all."""
    overhead = len(encode({**envelope, "id": "x" * 64, key: []}))
    room = budget - overhead
    batches: list[list[Any]] = []
    too_large: list[Any] = []
    batch: list[Any] = []
    size = 0
    for item in items:
        n = len(encode(item)) + 1  # and its comma
        if n > room:
            too_large.append(item)
            continue
        if batch and (len(batch) >= most or size + n > room):
            batches.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        batches.append(batch)
    return batches, too_large
