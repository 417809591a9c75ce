"""The agent's WebSocket messages (``client_agent.protocol``): what each one looks like on the
wire, written out by hand, and what the receiver makes of a message that is not right."""

from __future__ import annotations

import json

import pytest

from client_agent.protocol import (
    Ack,
    ErrorBody,
    ErrorMessage,
    Event,
    Heartbeat,
    InvalidReport,
    ProtocolError,
    Report,
    TaskProgress,
    UnknownMessage,
    Welcome,
    encode,
    message_id,
    parse_portal_message,
    unknown_type,
)
from common.rounds import round_for_people


def test_what_the_portal_sends_looks_as_it_did() -> None:
    welcome = Welcome(site="site-1", project="p", heartbeat_seconds=15)
    assert encode(welcome.to_json()) == (
        '{"type":"welcome","site":"site-1","project":"p","heartbeat_seconds":15}'
    )
    assert Event({"kind": "job.state", "state": "running"}).to_json() == {
        "type": "event",
        "event": {"kind": "job.state", "state": "running"},
    }
    assert Ack(id="r1", stored=3).to_json() == {"type": "ack", "id": "r1", "stored": 3}
    assert Ack(id=7, state="failed").to_json() == {"type": "ack", "id": 7, "state": "failed"}
    assert Ack(id="r2").to_json() == {"type": "ack", "id": "r2"}
    slow = ErrorBody("slow_down", "too fast", retry_after=2.5)
    assert Ack(id="r3", error=slow).to_json() == {
        "type": "ack",
        "id": "r3",
        "error": {"code": "slow_down", "message": "too fast", "retry_after": 2.5},
    }
    bad = ErrorBody("invalid", "lines must be a list", field="lines")
    assert ErrorMessage(bad).to_json() == {
        "type": "error",
        "code": "invalid",
        "message": "lines must be a list",
        "field": "lines",
    }


def test_what_the_agent_sends_looks_as_it_did() -> None:
    assert json.dumps(Heartbeat().to_json()) == '{"type": "heartbeat"}'
    lines = [{"id": "o0", "stream": "script", "text": "epoch 1", "round": 0}]
    assert encode(Report(job="u-1", lines=lines, id="report:ab:1").to_json()) == (
        '{"type":"report","job":"u-1","lines":[{"id":"o0","stream":"script","text":"epoch 1",'
        '"round":0}],"id":"report:ab:1"}'
    )
    assert TaskProgress(job="u-1", round=0, state="failed", reason="crashed").to_json() == {
        "type": "task",
        "job": "u-1",
        "round": 0,
        "state": "failed",
        "reason": "crashed",
    }


def test_the_agent_reads_each_kind_of_portal_message() -> None:
    welcome = parse_portal_message('{"type":"welcome","site":"s","project":"p"}')
    assert welcome == Welcome(site="s", project="p", heartbeat_seconds=15.0)  # the default
    event = parse_portal_message('{"type":"event","event":{"kind":"round.state"}}')
    assert event == Event({"kind": "round.state"})
    ack = parse_portal_message(
        '{"type":"ack","id":"r1","error":{"code":"slow_down","message":"m","retry_after":"x"}}'
    )
    assert ack == Ack(id="r1", error=ErrorBody("slow_down", "m"))  # no number: no wait given
    # An error that is no object is no error: the message was taken.
    assert parse_portal_message('{"type":"ack","id":5,"error":"?"}') == Ack(id="5")
    error = parse_portal_message('{"type":"error","message":"no"}')
    assert error == ErrorMessage(ErrorBody("?", "no"))
    assert parse_portal_message('{"type":"something newer"}') is None  # ignored


@pytest.mark.parametrize("text", ["{'type': 'ack'", "[1, 2]", '"ack"'])
def test_a_portal_message_that_is_no_json_object_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_portal_message(text)


def test_a_welcome_with_a_heartbeat_that_is_no_number_is_refused() -> None:
    with pytest.raises(ProtocolError):
        parse_portal_message('{"type":"welcome","heartbeat_seconds":[1]}')


def test_a_task_message_needs_an_integer_round() -> None:
    parsed = TaskProgress.parse({"type": "task", "job": "u", "round": 3, "id": 9})
    assert parsed == TaskProgress(job="u", round=3, state="None", reason="", id=9)
    for bad in ("3", 3.0, True, None):
        with pytest.raises(UnknownMessage) as caught:
            TaskProgress.parse({"type": "task", "job": "u", "round": bad})
        assert (caught.value.message, caught.value.field) == ("round must be an integer", "round")


@pytest.mark.parametrize("name", ["points", "lines"])
def test_a_report_needs_lists(name: str) -> None:
    with pytest.raises(InvalidReport) as caught:
        Report.parse({"type": "log", "job": "u", name: "x"})
    assert (caught.value.message, caught.value.field) == (f"{name} must be a list", name)
    parsed = Report.parse({"type": "metrics", "job": "u", name: []})
    assert (parsed.points, parsed.lines) == (([], None) if name == "points" else (None, []))


def test_only_strings_and_integers_are_ids_to_acknowledge() -> None:
    assert [message_id({"id": v}) for v in ("a", 4, True, 1.5, None, [1])] == [
        "a",
        4,
        None,
        None,
        None,
        None,
    ]


def test_an_unknown_type_is_named_in_the_error() -> None:
    assert str(unknown_type("upload")) == (
        "unknown message type 'upload'; send heartbeat, task or report"
    )


def test_rounds_count_from_zero_and_people_from_one() -> None:
    assert [round_for_people(n) for n in (0, 4)] == [1, 5]
