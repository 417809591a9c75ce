"""The agent's WebSocket messages (``client_agent.protocol``): what each one looks like on the
wire, written out by hand, and what the receiver makes of a message that is not right."""

from __future__ import annotations

import json

import pytest

from client_agent.protocol import (
    MAX_MESSAGE_BYTES,
    SOCKET_UPDATE_MOST_BYTES,
    Ack,
    ErrorBody,
    ErrorMessage,
    Event,
    Heartbeat,
    InvalidReport,
    InvalidUpdate,
    ProtocolError,
    Report,
    TaskProgress,
    UnknownMessage,
    UpdateMessage,
    Welcome,
    encode,
    message_id,
    parse_portal_message,
    unknown_type,
)
from common.rounds import round_for_people


def test_what_the_portal_sends_looks_as_it_did() -> None:
    welcome = Welcome(site="site-1", project="p", heartbeat_seconds=15, update_max_bytes=65536)
    assert encode(welcome.to_json()) == (
        '{"type":"welcome","site":"site-1","project":"p","heartbeat_seconds":15,'
        '"update_max_bytes":65536}'
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
        "unknown message type 'upload'; send heartbeat, task, report or update"
    )


def test_an_update_message_carries_the_files_bytes_in_base64_with_their_digest() -> None:
    message = UpdateMessage(job="u-1", round=2, sha256="ab" * 32, data=b"\x00\xffsafe", id="u:1")
    assert message.to_json() == {
        "type": "update",
        "job": "u-1",
        "round": 2,
        "sha256": "ab" * 32,
        "data": "AP9zYWZl",
        "id": "u:1",
    }
    assert UpdateMessage.parse(json.loads(encode(message.to_json()))) == message


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"round": "2"}, "round", "round must be an integer"),
        ({"round": True}, "round", "round must be an integer"),
        ({"sha256": None}, "sha256", "sha256 must be the update's SHA-256, in hex"),
        ({"data": ""}, "data", "data must be the update's bytes, base64"),
        ({"data": [1]}, "data", "data must be the update's bytes, base64"),
        ({"data": "AP9z!!"}, "data", "data: not base64"),
        ({"data": "é"}, "data", "data: not base64"),
    ],
)
def test_an_update_message_that_is_not_right_is_refused_naming_the_field(
    change: dict[str, object], field: str, why: str
) -> None:
    good = {"type": "update", "job": "u", "round": 0, "sha256": "a" * 64, "data": "AP9z"}
    with pytest.raises(InvalidUpdate) as caught:
        UpdateMessage.parse({**good, **change})
    assert (caught.value.field, caught.value.message) == (field, why)


def test_the_welcome_says_how_large_an_update_the_socket_takes_and_a_bad_figure_means_none() -> (
    None
):
    def most(value: object) -> int:
        parsed = Welcome.parse({"type": "welcome", "site": "s", "project": "p", **value})  # type: ignore[dict-item]
        return parsed.update_max_bytes

    assert most({}) == 0  # a portal that does not say: every update over HTTP
    assert most({"update_max_bytes": 65536}) == 65536
    for bad in (-1, "65536", 1.5, True, None):
        assert most({"update_max_bytes": bad}) == 0
    # Never more than one message can carry, whatever a portal says.
    assert most({"update_max_bytes": 10**9}) == SOCKET_UPDATE_MOST_BYTES
    largest = UpdateMessage(
        job="0" * 36,
        round=10**6,
        sha256="a" * 64,
        data=b"x" * SOCKET_UPDATE_MOST_BYTES,
        id="update-0123abcd-0123456789ab",
    )
    assert len(encode(largest.to_json())) <= MAX_MESSAGE_BYTES


def test_an_error_says_the_http_status_of_the_same_refusal_when_it_is_one() -> None:
    conflict = ErrorBody("conflict", "this task is already uploaded", status=409)
    assert conflict.to_json() == {
        "code": "conflict",
        "message": "this task is already uploaded",
        "status": 409,
    }
    assert ErrorBody.parse(conflict.to_json()) == conflict
    for bad in ("409", 99, 600, 4.09e2, True):
        assert ErrorBody.parse({"code": "c", "message": "m", "status": bad}).status is None


def test_rounds_count_from_zero_and_people_from_one() -> None:
    assert [round_for_people(n) for n in (0, 4)] == [1, 5]
