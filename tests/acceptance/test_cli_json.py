"""--json on every command whose output a script reads: stdout is one JSON document with
the keys docs/reference/cli.md documents. The real command against real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from outbox_relay import enqueue
from tests.support.cli import run_cli
from tests.support.configs import write_config
from tests.support.outbox import make_dead_letter

LETTER = {"message_id", "topic", "key", "attempts", "created_at", "dead_lettered_at", "reason"}


def _json(*args: str, code: int = 0) -> Any:
    out = run_cli(*args, "--json")
    assert out.returncode == code, (args, out.stdout + out.stderr)
    return json.loads(out.stdout)


def test_status_check_and_dead_letters_answer_in_json(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    c = ["--config", str(config)]
    first = make_dead_letter(db, "orders.created", {"n": 1}, key="k")
    second = make_dead_letter(db, "orders.created", {"n": 2}, key="k")

    status = _json("status", *c)
    assert set(status) == {
        "schema",
        "pending",
        "in_flight",
        "dead_lettered",
        "dispatched_retained",
        "oldest_pending_age_s",
        "topics",
        "relays",
        "replays",
        "backfills",
        "source",
        "behind_dead_letters",
    }
    assert status["dead_lettered"] == 2 and status["source"]["source"] == "table"
    message = _json("status", *c, "--message-id", first)
    assert message["message_id"] == first and message["rows"][0]["state"] == "dead_lettered"

    checked = _json("check", *c)
    assert checked["ok"] is True
    assert [(x["check"], x["state"]) for x in checked["checks"]] == [
        ("config", "ok"),
        ("database", "ok"),
        ("source", "ok"),
        ("outcomes", "ok"),
        ("broker", "ok"),
    ]
    assert checked["checks"][-1]["detail"] == "sink (file)"

    listed = _json("dead-letters", "list", *c)
    assert [set(d) for d in listed] == [LETTER | {"broker"}] * 2 and listed[0]["broker"] == "sink"
    shown = _json("dead-letters", "show", first, *c)
    assert set(shown) == {"message_id", "dead_letters"}
    assert set(shown["dead_letters"][0]) == LETTER | {
        "row_id",
        "published_to_dead_letter_topic",
        "last_error",
        "content_type",
        "headers",
        "headers_redacted",
        "payload",
        "payload_redacted",
    }
    missing = "00000000-0000-4000-8000-000000000000"
    requeued = _json("dead-letters", "requeue", *c, "--message-id", first, "--message-id", missing, code=1)
    assert requeued == {"requeued": [first], "not_requeued": [missing]}
    purged = _json("dead-letters", "purge", *c, "--all", "--yes")
    # Under release nothing waits behind a dead letter: not counted.
    assert purged == {"deleted": [second], "not_deleted": [], "pending_behind": None, "dead_letter_policy": "release"}


def test_a_failed_check_answers_in_json_with_exit_1(db: str, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.yaml", db, brokers={"hook": {"type": "webhook", "url": "http://127.0.0.1:1/"}}
    )
    checked = _json("check", "--config", str(config), code=1)
    assert checked["ok"] is False
    assert {"check": "broker", "state": "FAIL"}.items() <= checked["checks"][-1].items()
    assert checked["checks"][-1]["detail"].startswith("hook (webhook)")


def test_replay_and_backfill_answer_in_json(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    c = ["--config", str(config)]
    with psycopg.connect(db) as conn:
        for n in range(3):
            enqueue(conn, "orders.created", {"n": n}, key="k")
        conn.execute("UPDATE outbox.messages SET dispatched_at = now()")
        conn.execute("CREATE TABLE public.accounts (id int PRIMARY KEY, region text)")
        conn.execute("INSERT INTO public.accounts SELECT g, 'eu' FROM generate_series(1, 4) g")
        conn.commit()

    dry = _json("replay", *c, "--all", "--dry-run")
    assert dry == {
        "replay_id": None,
        "dry_run": True,
        "total": 3,
        "to_copy": 3,
        "by_topic": {"orders.created": 3},
        "skipped": 0,
        "copied": 0,
        "done": False,
    }
    done = _json("replay", *c, "--all", "--yes")
    assert done["replay_id"] == 1 and done["done"] is True
    assert (done["copied"], done["skipped"], done["deleted_meanwhile"]) == (3, 0, 0)
    resumed = _json("replay", *c, "--resume", "1", "--yes")
    assert (resumed["replay_id"], resumed["done"], resumed["copied"]) == (1, True, 3)

    planned = _json("backfill", *c, "--table", "accounts", "--topic", "accounts.snapshot", "--dry-run")
    assert planned == {
        "backfill_id": None,
        "dry_run": True,
        "table": "public.accounts",
        "topic": "accounts.snapshot",
        "total": 4,
        "copied": 0,
        "done": False,
    }
    filled = _json("backfill", *c, "--table", "accounts", "--topic", "accounts.snapshot", "--yes")
    assert (filled["backfill_id"], filled["copied"], filled["done"]) == (1, 4, True)


def test_schema_and_inbox_commands_answer_in_json(empty_db: str) -> None:
    d = ["--dsn", empty_db]
    installed = _json("schema", "install", *d)
    assert set(installed) == {"schema", "version", "previous_version", "changed"}
    assert installed["previous_version"] is None and installed["changed"] is True
    again = _json("schema", "install", *d)
    assert again["previous_version"] == again["version"] and again["changed"] is False
    assert _json("schema", "notify", "off", *d) == {"schema": "outbox", "notify": "off"}
    assert _json("schema", "source", "table", *d) == {
        "schema": "outbox",
        "source": "table",
        "changed": False,
        "slot": "outbox_relay_outbox",
        "slot_created": False,
        "slot_kept": False,
    }
    inbox = _json("inbox", "schema", "install", *d)
    assert inbox == {"schema": "inbox", "version": 1, "previous_version": None}
    with psycopg.connect(empty_db) as conn:
        conn.execute(
            "INSERT INTO inbox.processed (message_id, processed_at) "
            "SELECT gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 3)"
        )
        conn.commit()
    assert _json("inbox", "prune", *d, "--older-than", "7d") == {
        "schema": "inbox",
        "deleted": 3,
        "older_than_s": 604800.0,
    }
