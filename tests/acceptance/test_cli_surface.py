"""Every command answers --help; logs are JSON off a terminal and readable on one."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from outbox_relay.observability.logging_setup import configure
from tests.support.cli import run_cli

COMMANDS = [
    [],
    ["schema"],
    ["schema", "install"],
    ["schema", "sql"],
    ["schema", "notify"],
    ["run"],
    ["check"],
    ["status"],
    ["dead-letters"],
    ["dead-letters", "list"],
    ["dead-letters", "show"],
    ["dead-letters", "requeue"],
    ["dead-letters", "purge"],
    ["replay"],
    ["backfill"],
    ["audit"],
    ["inbox", "prune"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "outbox-relay")
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: outbox-relay")


def test_check_fails_with_exit_1_when_a_broker_is_unreachable(db: str, tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        json.dumps(
            {
                "database": {"dsn": db},
                "brokers": {"hook": {"type": "webhook", "url": "http://127.0.0.1:1/"}},
                "routes": [{"topic": "*", "broker": "hook"}],
            }
        )
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert "database  ok" in result.stdout
    assert "broker    FAIL  hook (webhook)" in result.stdout


def test_library_warnings_are_json_lines_too(capsys: pytest.CaptureFixture[str], restored_logging: None) -> None:
    # psycopg, aiokafka and pika log through the standard logging module; unrouted, their
    # warnings came out raw ("query cancellation interrupted ...") among the JSON lines.
    configure("info")
    logging.getLogger("psycopg").warning("query cancellation interrupted (%s): closing connection", "AdminShutdown")
    logging.getLogger("aiokafka").info("below warning: not shown")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["level"], line["event"]) for line in lines] == [
        ("psycopg", "warning", "query cancellation interrupted (AdminShutdown): closing connection")
    ]


def test_logs_are_json_when_not_a_terminal(capsys: pytest.CaptureFixture[str], restored_logging: None) -> None:
    configure("info")  # pytest's captured stderr is not a terminal
    structlog.get_logger("t").info("batch_recorded", message_id="m1", topic="t")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["event"] == "batch_recorded" and line["message_id"] == "m1" and line["level"] == "info"


def test_logs_are_readable_on_a_terminal(monkeypatch: pytest.MonkeyPatch, restored_logging: None) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    monkeypatch.setattr("sys.stderr", stream)
    configure("info")
    structlog.get_logger("t").info("relay_started", workers=2)
    text = stream.getvalue()
    assert "relay_started" in text and "workers" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


# A relay's own lines and a library's, written from two threads at once (librdkafka's
# log callback runs in the thread that polls it: seen in the exactly-once fault tests).
INTERLEAVING = """
import logging, threading
import structlog
from outbox_relay.observability.logging_setup import configure
configure("info", json=True)
def library():
    for i in range(5000):
        logging.getLogger("rdkafka").warning("GETPID retrying %d", i)
thread = threading.Thread(target=library)
thread.start()
for i in range(5000):
    structlog.get_logger("t").info("broker_circuit_half_open", broker="kafka", n=i)
thread.join()
"""


def test_log_lines_written_from_two_threads_stay_whole() -> None:
    # print() wrote a line and its newline in two writes: another thread's line could land
    # between them, two JSON objects on one line (which no JSON-lines reader takes).
    result = subprocess.run([sys.executable, "-c", INTERLEAVING], capture_output=True, text=True, check=True)
    lines = result.stderr.splitlines()
    assert len(lines) == 10_000
    broken = [line for line in lines if not _json_object(line)]
    assert not broken, f"{len(broken)} lines not one JSON object each, e.g. {broken[0][:200]!r}"


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False
