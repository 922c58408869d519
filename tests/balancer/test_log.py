from __future__ import annotations

import io
import json
import logging

from balancer import Pool, configure_logging, log_event, log_state_change


def test_plain(stream: io.StringIO) -> None:
    configure_logging("plain", stream=stream)
    log_event("failover", backend="abc", to="def", reason="connection refused", tries=2)
    line = stream.getvalue()
    assert line.endswith("\n")
    stamp, level, rest = line.rstrip("\n").split(" ", 2)
    assert stamp.endswith("Z")
    assert "T" in stamp
    assert level == "INFO"
    assert rest == 'failover backend=abc to=def reason="connection refused" tries=2'


def test_json(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    log_event("rejected", level=logging.WARNING, reason="smuggling", client="10.0.0.1")
    data = json.loads(stream.getvalue())
    assert data.pop("time").endswith("Z")
    assert data == {
        "level": "WARNING",
        "event": "rejected",
        "reason": "smuggling",
        "client": "10.0.0.1",
    }


def test_configure_twice_keeps_one_handler(stream: io.StringIO) -> None:
    configure_logging("plain", stream=io.StringIO())
    configure_logging("json", stream=stream)
    log_event("x")
    assert json.loads(stream.getvalue())["event"] == "x"
    named = [h for h in logging.getLogger("balancer").handlers if h.get_name() == "balancer"]
    assert len(named) == 1


def test_plain_messages_of_other_loggers_in_the_tree(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    logging.getLogger("balancer.access").info("GET / 200")
    assert json.loads(stream.getvalue())["event"] == "GET / 200"


def test_state_changes_are_logged(stream: io.StringIO) -> None:
    configure_logging("json", stream=stream)
    pool = Pool(["http://127.0.0.1:9001"], on_change=log_state_change)
    backend = next(iter(pool))
    backend.mark_down("status 503", 0.0)
    pool.drain(backend.id, 0.0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(d["level"], d["old"], d["new"]) for d in lines] == [("WARNING", "up", "down")]
    assert lines[0]["reason"] == "status 503"
    assert lines[0]["backend"] == backend.id
    backend.mark_up(1.0)
    last = json.loads(stream.getvalue().splitlines()[-1])
    assert (last["level"], last["old"], last["new"]) == ("INFO", "down", "draining")
