"""What reading one agent message costs the portal, by its size: ``jsonlimits.loads``, which
every WebSocket message from an agent and every JSON body goes through (its nesting checked
before the parser sees it), for the messages an agent sends.

- an ``update`` message: a round's update in base64 (``client_agent.protocol.UpdateMessage``)
  of 200 bytes (the scale-out bench's tiny model), 64 KiB (``FEDPORTAL_SOCKET_UPDATE_MAX_BYTES``'s
  default) and 383 KiB (the most a message carries);
- a ``report`` of 200 output lines of 2,000 characters, with quotes and backslashes in them
  (about the protocol's 512 KiB bound per message).

For each: the nesting check alone and the whole ``loads`` (check and parse), in ms, best and
median of ``--rounds`` rounds of ``--repeat`` calls; and ``json.loads`` alone for comparison.

    .venv/bin/python bench/socket_messages.py [--rounds 5] [--repeat 20]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable

import benchlib
from benchlib import md_table, median

from client_agent import jsonlimits
from client_agent.protocol import SOCKET_UPDATE_MOST_BYTES, Report, UpdateMessage, encode


def update_message(size: int) -> bytes:
    data = os.urandom(size)
    message = UpdateMessage(
        job="0b6d7f52-4d1c-4a8e-9a63-6f1f1f2f5e10",
        round=3,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        id="update-0123abcd-0123456789ab",
    )
    return encode(message.to_json()).encode()


def report_message() -> bytes:
    text = 'epoch 3: loss 0.25 "quoted" \\ path C:\\data\\x ' * 50
    lines = [
        {"id": f"o{i}", "stream": "script", "text": text[:2000], "round": 3} for i in range(200)
    ]
    return encode(Report(job="0b6d7f52", lines=lines, id="report:ab:1").to_json()).encode()


def per_call_ms(call: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    benchlib.print_header(
        "Reading an agent's message",
        "jsonlimits.loads (nesting check, then json.loads) on messages an agent sends",
    )
    messages = {
        "update, 200 B": update_message(200),
        "update, 64 KiB": update_message(64 * 1024),
        f"update, {SOCKET_UPDATE_MOST_BYTES // 1024} KiB (the most)": update_message(
            SOCKET_UPDATE_MOST_BYTES
        ),
        "report, 200 lines of 2,000 characters": report_message(),
    }
    rows = []
    for name, raw in messages.items():
        steps: dict[str, Callable[[], object]] = {
            "nesting check": functools.partial(jsonlimits.check_depth, raw),
            "jsonlimits.loads": functools.partial(jsonlimits.loads, raw),
            "json.loads alone": functools.partial(json.loads, raw),
        }
        times = {
            step: [per_call_ms(call, args.repeat) for _ in range(args.rounds)]
            for step, call in steps.items()
        }
        rows.append(
            (
                name,
                f"{len(raw):,}",
                *(f"{min(t):.2f} / {median(t):.2f}" for t in times.values()),
            )
        )
    print(
        md_table(
            [
                "message",
                "bytes",
                *(
                    f"{step}, ms (best / median)"
                    for step in ("nesting check", "jsonlimits.loads", "json.loads alone")
                ),
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
