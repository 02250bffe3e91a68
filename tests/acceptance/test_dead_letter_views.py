"""What operators reached for (issue 25, point 5): `dead-letters show`, `dead-letters
list --key/--since` with the broker and "showing N of M", and status's keys behind a
dead letter with a DSN alone. The real command against real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from outbox_relay import enqueue
from tests.support.cli import run_cli
from tests.support.configs import write_config
from tests.support.outbox import make_dead_letter

SECRET = "4111-1111-1111-1111"


def test_show_redacts_the_payload_unless_asked(db: str) -> None:
    dead = make_dead_letter(
        db,
        "billing.charge",
        {"card": SECRET},
        key="acct-7",
        reason="HTTP 422: card refused",
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tenant": "t1"},
    )
    shown = run_cli("dead-letters", "show", dead, "--dsn", db)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"dead letter {dead} (row ")
    for label, value in [
        ("topic", "billing.charge"),
        ("key", "acct-7"),
        ("reason", "HTTP 422: card refused"),
        ("attempts", "3"),
        ("content type", "application/json"),
        ("payload", "(redacted; --payload shows it)"),
    ]:
        assert f"  {label:<18} {value}" in lines, (label, shown.stdout)
    assert any(line.startswith("  dead-lettered      20") for line in lines), shown.stdout
    # Header names, and the values of trace context only: an application's may be secrets.
    headers = next(line for line in lines if line.startswith("  headers"))
    assert headers == (
        "  headers            tenant=(redacted), "
        "traceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 (--headers shows every value)"
    )
    assert SECRET not in shown.stdout
    whole = run_cli("dead-letters", "show", dead, "--dsn", db, "--headers").stdout
    assert "tenant=t1" in whole and "(redacted)" not in whole.split("payload")[0] and SECRET not in whole

    revealed = run_cli("dead-letters", "show", dead, "--dsn", db, "--payload")
    assert revealed.returncode == 0 and f'"card": "{SECRET}"' in revealed.stdout, revealed.stdout

    as_json = json.loads(run_cli("dead-letters", "show", dead, "--dsn", db, "--json").stdout)
    (letter,) = as_json["dead_letters"]
    assert (letter["payload"], letter["payload_redacted"], letter["attempts"]) == (None, True, 3)
    assert letter["headers"]["tenant"] == "(redacted)" and letter["headers_redacted"] is True
    assert letter["headers"]["traceparent"].startswith("00-0af7") and letter["reason"] == "HTTP 422: card refused"
    whole_json = json.loads(run_cli("dead-letters", "show", dead, "--dsn", db, "--json", "--headers").stdout)
    assert whole_json["dead_letters"][0]["headers"]["tenant"] == "t1"
    assert whole_json["dead_letters"][0]["headers_redacted"] is False
    with_payload = json.loads(run_cli("dead-letters", "show", dead, "--dsn", db, "--json", "--payload").stdout)
    assert json.loads(with_payload["dead_letters"][0]["payload"]) == {"card": SECRET}


def test_show_payload_writes_a_text_payloads_control_characters_out(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, payload, content_type, dead_lettered_at, dead_letter_reason) "
            "VALUES ('t', convert_to(E'hi \\x1b]0;pwned\\x07 there', 'UTF8'), 'text/plain', now(), 'x') "
        )
        row = conn.execute("SELECT message_id FROM outbox.messages").fetchone()
        conn.commit()
    assert row is not None
    dead = str(row[0])
    shown = run_cli("dead-letters", "show", dead, "--dsn", db, "--payload")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "    hi \\x1b]0;pwned\\x07 there" in shown.stdout.splitlines(), shown.stdout


def test_show_of_what_is_not_a_dead_letter_is_one_line_exit_1(db: str) -> None:
    with psycopg.connect(db) as conn:
        pending = str(enqueue(conn, "orders.created", {"n": 1}))
        conn.commit()
    out = run_cli("dead-letters", "show", pending, "--dsn", db)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.splitlines() == [
        f"error: no dead letter {pending} in schema 'outbox' (requeued, purged, not dead-lettered, "
        "or never enqueued here)"
    ]


def test_list_filters_by_key_and_since_and_names_the_broker(db: str, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"orders_hook": {"type": "stdout"}, "audit_hook": {"type": "stdout"}},
        routes=[{"topic": "orders.*", "broker": "orders_hook"}, {"topic": "audit.*", "broker": "audit_hook"}],
    )
    old = make_dead_letter(db, "orders.created", {"n": 0}, key="k1", age="3 days")
    recent = make_dead_letter(db, "orders.created", {"n": 1}, key="k1")
    other_key = make_dead_letter(db, "orders.created", {"n": 2}, key="k2")
    audit = make_dead_letter(db, "audit.logged", {"n": 3}, key="k1")
    unrouted = make_dead_letter(db, "legacy.event", {"n": 4}, key="k1")

    def listed(*args: str) -> list[dict[str, str]]:
        out = run_cli("dead-letters", "list", "--config", str(config), "--json", *args)
        assert out.returncode == 0, out.stderr
        return [{"id": d["message_id"], "broker": d["broker"]} for d in json.loads(out.stdout)]

    assert listed("--key", "k1") == [
        {"id": old, "broker": "orders_hook"},
        {"id": recent, "broker": "orders_hook"},
        {"id": audit, "broker": "audit_hook"},
        {"id": unrouted, "broker": "(no route)"},
    ]
    assert [d["id"] for d in listed("--key", "k1", "--since", "1d")] == [recent, audit, unrouted]
    assert [d["id"] for d in listed("--since", "1d", "--topic", "orders.*")] == [recent, other_key]
    human = run_cli("dead-letters", "list", "--config", str(config), "--key", "k1", "--limit", "2")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines[:2]] == [old, recent]
    assert "  broker=orders_hook  key=k1  attempts=3  " in lines[0]
    assert lines[2:] == ["showing 2 of 4 dead letter(s); --limit N shows more"]
    # Without a config the routes are unknown: the broker is "-".
    bare = run_cli("dead-letters", "list", "--dsn", db, "--key", "k2").stdout.splitlines()
    assert len(bare) == 2 and bare[0].startswith(f"{other_key}  orders.created  broker=-  key=k2  "), bare
    assert bare[1] == "showing 1 of 1 dead letter(s)"
    # In JSON the unknown broker is null; text keeps "-".
    (unknown,) = json.loads(run_cli("dead-letters", "list", "--dsn", db, "--key", "k2", "--json").stdout)
    assert unknown["message_id"] == other_key and unknown["broker"] is None
    # A keyless message: "(none)", as `show` says it.
    keyless = make_dead_letter(db, "keyless.event", {"n": 5})
    listed_keyless = run_cli("dead-letters", "list", "--dsn", db, "--topic", "keyless.*").stdout.splitlines()
    assert listed_keyless[0].startswith(f"{keyless}  keyless.event  broker=-  key=(none)  "), listed_keyless
    nothing = run_cli("dead-letters", "list", "--dsn", db, "--key", "nobody")
    assert (nothing.returncode, nothing.stdout) == (0, "no dead letters match\n")


def test_list_counts_matches_up_to_ten_thousand(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, payload, dead_lettered_at, dead_letter_reason) "
            "SELECT 'bulk', '\\x7b7d', now(), 'x' FROM generate_series(1, 10001)"
        )
        conn.commit()
    out = run_cli("dead-letters", "list", "--dsn", db, "--limit", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "showing 1 of more than 10,000 dead letter(s); --limit N shows more"
    exact = run_cli("dead-letters", "list", "--dsn", db, "--limit", "1", "--since", "2000-01-01T00:00:00Z")
    assert "more than 10,000" in exact.stdout, "a time filter is counted up to the cap too"


def _held_keys(db: str) -> None:
    """k1: a dead letter and two pending messages after it; k2: one after its dead letter,
    and one before it (not behind it); k3: pending only; a keyless dead letter."""
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders", {"n": 0}, key="k2")
        conn.commit()
    make_dead_letter(db, "orders", {"n": 1}, key="k1")
    make_dead_letter(db, "orders", {"n": 2}, key="k2")
    make_dead_letter(db, "orders", {"n": 3})
    with psycopg.connect(db) as conn:
        for n, key in ((4, "k1"), (5, "k1"), (6, "k2"), (7, "k3")):
            enqueue(conn, "orders", {"n": n}, key=key)
        conn.commit()


def test_status_counts_keys_behind_a_dead_letter_with_a_dsn_alone(db: str, tmp_path: Path) -> None:
    _held_keys(db)
    bare = run_cli("status", "--dsn", db)
    assert bare.returncode == 0, bare.stderr
    assert (
        "  behind them    2 key(s), 3 pending message(s) after a dead letter of their key "
        "(held under dead_letter_policy: hold, published under release)"
    ) in bare.stdout.splitlines(), bare.stdout
    data = json.loads(run_cli("status", "--dsn", db, "--json").stdout)
    assert data["behind_dead_letters"] == {"keys": 2, "messages": 3, "policy": None, "held": None}

    hold = write_config(tmp_path / "hold.yaml", db, dead_letter_policy="hold")
    held = run_cli("status", "--config", str(hold))
    assert "  behind them    2 key(s), 3 pending message(s) after a dead letter of their key (held: " in held.stdout
    assert json.loads(run_cli("status", "--config", str(hold), "--json").stdout)["behind_dead_letters"]["held"]
    release = write_config(tmp_path / "release.yaml", db, dead_letter_policy="release")
    released = run_cli("status", "--config", str(release), "--json")
    assert json.loads(released.stdout)["behind_dead_letters"] == {
        "keys": 2,
        "messages": 3,
        "policy": "release",
        "held": False,
    }


def test_purge_without_a_config_says_what_waits_behind_under_either_policy(db: str) -> None:
    _held_keys(db)
    asked = run_cli("dead-letters", "purge", "--dsn", db, "--all")
    assert asked.returncode == 2, asked.stderr
    assert asked.stderr == (
        "error: 3 dead letter(s) would be deleted (3 pending message(s) behind them: held until then if "
        "dead_letter_policy is hold); pass --yes to confirm\n"
    )
