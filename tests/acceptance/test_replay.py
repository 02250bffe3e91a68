"""`outbox-relay replay`, through the real CLI and a real relay process (file sink)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from outbox_relay import enqueue
from outbox_relay.operations import schema_manager
from tests.support.cli import RelayProcess, exe, read_jsonl, run_cli, run_cli_at_terminal
from tests.support.configs import write_config
from tests.support.databases import install_at, role_with_grants
from tests.support.outbox import count, dispatched
from tests.support.waiting import wait_for

HEADER = "outbox-replay-id"


def replays_in(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if HEADER in line["headers"]]


def seed(db: str) -> dict[str, list[str]]:
    """Orders for two keys, emails without key, and an old order (ten days ago)."""
    ids: dict[str, list[str]] = {"orders.k1": [], "orders.k2": [], "emails": [], "old": []}
    with psycopg.connect(db) as conn:
        for n in range(6):
            ids["orders.k1"].append(str(enqueue(conn, "orders.created", {"n": n}, key="k1")))
            ids["orders.k2"].append(str(enqueue(conn, "orders.created", {"n": n}, key="k2")))
            ids["emails"].append(str(enqueue(conn, "emails.sent", {"n": n})))
        old = enqueue(conn, "orders.created", {"n": "old"}, key="k3")
        conn.execute("UPDATE outbox.messages SET created_at = now() - interval '10 days' WHERE message_id = %s", (old,))
        ids["old"].append(str(old))
        conn.commit()
    return ids


@pytest.fixture
def relayed(db: str, tmp_path: Path) -> Any:
    """A relay running with a file sink, after the seed messages were delivered."""
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink)
    ids = seed(db)
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        wait_for(lambda: dispatched(db) == 19, what="the seed delivered")
        yield config, sink, ids, relay
    finally:
        relay.close()


def replay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("replay", "--config", str(config), *args)


def test_replay_by_topic_key_and_time_publishes_copies_with_the_same_ids(db: str, relayed: Any) -> None:
    config, sink, ids, _relay = relayed
    by_topic = replay(config, "--topic", "emails.*", "--yes")
    assert by_topic.returncode == 0, by_topic.stderr
    assert "6 message(s) to replay (emails.sent: 6)" in by_topic.stdout and "replay #1 done" in by_topic.stdout
    wait_for(lambda: len(replays_in(read_jsonl(sink))) == 6, what="the emails replayed")
    copies = replays_in(read_jsonl(sink))
    assert [c["message_id"] for c in copies] == ids["emails"], "same ids, in enqueue order"
    assert {c["headers"][HEADER] for c in copies} == {"1"}

    by_key = replay(config, "--key", "k2", "--yes")
    assert by_key.returncode == 0 and "6 message(s) to replay" in by_key.stdout, by_key.stdout + by_key.stderr
    wait_for(lambda: len(replays_in(read_jsonl(sink))) == 12, what="key k2 replayed")
    assert [c["message_id"] for c in replays_in(read_jsonl(sink))[6:]] == ids["orders.k2"]

    # Time range: only the order enqueued ten days ago lies before 5 days ago.
    by_time = replay(config, "--until", "5d", "--since", "2000-01-01T00:00:00+00:00", "--yes")
    assert by_time.returncode == 0 and "1 message(s) to replay" in by_time.stdout, by_time.stdout + by_time.stderr
    wait_for(lambda: len(replays_in(read_jsonl(sink))) == 13, what="the old order replayed")
    last = replays_in(read_jsonl(sink))[-1]
    assert last["message_id"] == ids["old"][0] and last["headers"][HEADER] == "3"

    # Copies are never replayed again: the emails' selection now matches only originals.
    repeat = replay(config, "--topic", "emails.*", "--yes")
    assert repeat.returncode == 2 and "replayed before (#1" in repeat.stderr and "--again" in repeat.stderr
    again = replay(config, "--topic", "emails.*", "--yes", "--again")
    assert again.returncode == 0 and "6 message(s) to replay" in again.stdout, again.stdout + again.stderr

    status = run_cli("status", "--config", str(config), "--json")
    recorded = json.loads(status.stdout)["replays"]
    assert [(r["replay_id"], r["total"], r["copied"], r["finished"]) for r in recorded] == [
        (4, 6, 6, True),
        (3, 1, 1, True),
        (2, 6, 6, True),
        (1, 6, 6, True),
    ]
    assert recorded[-1]["selection"]["topic"] == "emails.*" and " as " in recorded[-1]["requested_by"]
    text = run_cli("status", "--config", str(config)).stdout
    assert "#1 " in text and "topic=emails.*" in text and "6 of 6 copied, done" in text


def test_dry_run_and_refusals_change_nothing(db: str, relayed: Any) -> None:
    config, _sink, _ids, _relay = relayed
    dry = replay(config, "--topic", "orders.*", "--dry-run")
    assert dry.returncode == 0 and "13 message(s) to replay (orders.created: 13)" in dry.stdout, dry.stdout
    unasked = replay(config, "--topic", "orders.*")
    assert unasked.returncode == 2 and "13 message(s) would be replayed; pass --yes" in unasked.stderr
    nothing = replay(config)
    assert nothing.returncode == 2 and "choose what to replay" in nothing.stderr
    for bad, says in [
        (["--since", "yesterday"], "'--since': invalid time or duration 'yesterday'"),
        (["--message-id", "not-a-uuid"], "'--message-id': 'not-a-uuid' is not a valid UUID"),
        (["--resume", "1", "--topic", "x"], "--resume takes no filter"),
        (["--resume", "99", "--yes"], "no replay #99"),
    ]:
        out = replay(config, *bad)
        assert out.returncode != 0 and says in out.stderr, (bad, out.stderr)
        errors = [line for line in out.stderr.splitlines() if line.lower().startswith("error")]
        assert errors == [out.stderr.strip()], out.stderr  # one line that says what is wrong
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.replays").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (19,)


def test_replayed_messages_keep_per_key_order_with_live_traffic(db: str, relayed: Any) -> None:
    # A writer enqueues key k1 before, during and after the replay of k1. Copies are
    # enqueued like any writer's messages: they go after every k1 message committed
    # before the replay, in their original order, and before every k1 message
    # enqueued after it; a live message whose transaction overlapped a chunk's may go
    # on either side of that chunk (docs/how-to/replay.md), in its own order.
    config, sink, _ids, _relay = relayed
    phase = "before"
    phases: dict[str, str] = {}
    stop = threading.Event()

    def live() -> None:
        with psycopg.connect(db) as conn:
            n = 100
            while not stop.is_set():
                started_in = phase
                message_id = str(enqueue(conn, "orders.created", {"n": n}, key="k1"))
                conn.commit()
                phases[message_id] = started_in if started_in == phase else "during"
                n += 1
                time.sleep(0.002)  # pacing: live traffic, one message at a time

    writer = threading.Thread(target=live)
    writer.start()
    try:
        wait_for(lambda: len(phases) >= 20, what="live traffic before the replay")
        phase = "during"
        out = replay(config, "--key", "k1", "--chunk", "2", "--yes")
        assert out.returncode == 0, out.stderr
        phase = "after"
        wait_for(lambda: sum(1 for p in phases.values() if p == "after") >= 20, what="live traffic after it")
    finally:
        stop.set()
        writer.join()
    wait_for(lambda: count(db, "dispatched_at IS NULL") == 0, what="everything delivered")
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT message_id::text, headers ? %s FROM outbox.messages WHERE key = 'k1' ORDER BY id", (HEADER,)
        ).fetchall()
    planned = int(out.stdout.split(" message(s) to replay")[0].split()[-1])
    originals = [m for m, copy in rows if not copy]
    expected_copies = originals[:planned]  # every k1 message dispatched when the replay began
    delivered = [(line["message_id"], HEADER in line["headers"]) for line in read_jsonl(sink) if line["key"] == "k1"]
    copies_at = [i for i, (_, copy) in enumerate(delivered) if copy]
    assert [delivered[i][0] for i in copies_at] == expected_copies, "copies in their original order"
    live_order = [m for m, copy in delivered if not copy]
    assert live_order == originals, "live messages in enqueue order"
    position = {m: i for i, (m, copy) in enumerate(delivered) if not copy}
    before = [m for m, p in phases.items() if p == "before"]
    after = [m for m, p in phases.items() if p == "after"]
    assert max(position[m] for m in before) < copies_at[0], "a copy went before a message committed before it"
    assert min(position[m] for m in after) > copies_at[-1], "a message enqueued after the replay went first"


def test_a_replay_killed_mid_way_resumes_and_copies_nothing_twice(db: str, relayed: Any) -> None:
    config, sink, _ids, relay = relayed
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, dispatched_at) "
            "SELECT 'bulk.done', 'b' || (n % 50), convert_to('{\"n\":' || n || '}', 'UTF8'), now() "
            "FROM generate_series(1, 3000) AS n"
        )
        conn.commit()
    command = subprocess.Popen(
        [*exe(), "replay", "--config", str(config), "--topic", "bulk.*", "--yes", "--chunk", "100", "--rate", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def copied() -> int:
            with psycopg.connect(db) as conn:
                row = conn.execute("SELECT coalesce(max(copied), 0) FROM outbox.replays").fetchone()
            return row[0] if row else 0

        wait_for(lambda: copied() >= 300, what="the replay under way")
        relay.kill()  # the relay dies too, while it publishes copies
        command.kill()
        command.wait(10)
    finally:
        if command.poll() is None:
            command.kill()
        command.communicate()
    assert 0 < copied() < 3000, "killed mid-way"
    restarted = RelayProcess(config)
    try:
        restarted.wait_started()
        resumed = replay(config, "--resume", "1", "--yes")
        assert resumed.returncode == 0 and "resuming replay #1" in resumed.stdout, resumed.stdout + resumed.stderr
        assert "3000 message(s) copied" in resumed.stdout, resumed.stdout
        wait_for(lambda: count(db, "dispatched_at IS NULL") == 0, timeout=90, what="every copy delivered")
    finally:
        restarted.close()
    with psycopg.connect(db) as conn:
        per_source = conn.execute(
            "SELECT message_id, count(*) FROM outbox.messages WHERE topic = 'bulk.done' "
            "AND headers ? %s GROUP BY message_id",
            (HEADER,),
        ).fetchall()
    assert len(per_source) == 3000 and {n for _, n in per_source} == {1}, "each message copied exactly once"
    published = {line["message_id"] for line in replays_in(read_jsonl(sink)) if line["topic"] == "bulk.done"}
    assert len(published) == 3000, "every copy published at least once, the relay's kill notwithstanding"


def test_the_same_selection_is_recognised_however_it_is_written(db: str, relayed: Any) -> None:
    config, _sink, ids, _relay = relayed
    first = replay(config, "--key", "k1", "--since", "2h", "--yes")
    assert first.returncode == 0, first.stderr
    later = replay(config, "--key", "k1", "--since", "120m", "--yes")  # the same request, a moment later
    assert later.returncode == 2 and "replayed before (#1" in later.stderr, later.stderr
    one, other = ids["emails"][:2]
    by_ids = replay(config, "--message-id", one, "--message-id", other, "--yes")
    assert by_ids.returncode == 0, by_ids.stderr
    again = replay(config, "--message-id", other, "--message-id", one, "--message-id", one, "--yes")
    assert again.returncode == 2 and "replayed before (#2" in again.stderr, again.stderr
    instant = replay(config, "--topic", "orders.*", "--since", "2000-01-01T01:00:00+01:00", "--yes")
    assert instant.returncode == 0, instant.stderr
    same = replay(config, "--topic", "orders.*", "--since", "2000-01-01T00:00:00Z", "--yes")
    assert same.returncode == 2 and "replayed before (#3" in same.stderr, same.stderr


def test_resume_with_dry_run_copies_nothing_and_without_yes_asks(db: str, relayed: Any) -> None:
    config, _sink, _ids, _relay = relayed
    with psycopg.connect(db) as conn:  # a replay recorded but stopped before its first chunk
        conn.execute(
            "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total) "
            'SELECT \'test\', \'{"topic": "emails.*", "key": null, "since": null, '
            '"until": null, "message_ids": []}\', max(id), now(), 6 FROM outbox.messages'
        )
        conn.commit()
    dry = replay(config, "--resume", "1", "--dry-run")
    assert dry.returncode == 0 and "stopped at 0 of 6 copied" in dry.stdout, dry.stdout + dry.stderr
    unasked = replay(config, "--resume", "1")
    assert unasked.returncode == 2 and "replay #1 would be finished; pass --yes" in unasked.stderr
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (19,), "nothing copied"
    done = replay(config, "--resume", "1", "--yes")
    assert done.returncode == 0 and "6 message(s) copied" in done.stdout, done.stdout + done.stderr


def test_a_topic_no_route_takes_is_refused_before_anything_is_copied(db: str, tmp_path: Path) -> None:
    import yaml

    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"n": 1})
        enqueue(conn, "legacy.event", {"n": 2})
        conn.execute("UPDATE outbox.messages SET dispatched_at = now()")
        conn.commit()
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"dsn": db},
                "http": {"host": "127.0.0.1", "port": 0},
                "brokers": {"sink": {"type": "file", "path": str(tmp_path / "out.jsonl")}},
                "routes": [{"topic": "orders.*", "broker": "sink"}],
            }
        )
    )
    out = replay(config, "--all", "--yes")
    assert out.returncode == 2 and "takes topic 'legacy.event'" in out.stderr, out.stderr
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (2,)
    assert replay(config, "--topic", "orders.*", "--yes").returncode == 0


def test_resume_refuses_a_replay_another_role_recorded(db: str, relayed: Any) -> None:
    # A role that records a replay must not have a stronger role's resume copy it
    # unseen: a team may have revoked that role's own INSERT on messages.
    config, _sink, _ids, _relay = relayed
    with role_with_grants(db, "relay", "relay") as relay_dsn:
        relay_role = str(conninfo_to_dict(relay_dsn)["user"])
        with psycopg.connect(relay_dsn) as conn:
            conn.execute(
                "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total) "
                'SELECT \'ops@host as operator\', \'{"topic": "emails.*", "key": null, "since": null, '
                '"until": null, "message_ids": []}\', max(id), now(), 6 FROM outbox.messages'
            )
            conn.commit()
        forced = replay(config, "--resume", "1", "--yes")
        assert forced.returncode == 2 and f"recorded by role {relay_role!r}" in forced.stderr, forced.stderr
        declined = run_cli_at_terminal("replay", "--config", str(config), "--resume", "1", "--yes", answer="n")
        assert declined.returncode == 1 and f"recorded by role {relay_role!r}" in declined.stdout, declined.stdout
        assert count(db) == 19, "nothing copied"
        confirmed = run_cli_at_terminal("replay", "--config", str(config), "--resume", "1", answer="y")
        assert confirmed.returncode == 0 and "6 message(s) copied" in confirmed.stdout, confirmed.stdout


def shift_back(db: str, hours: int) -> None:
    """As if everything so far had happened `hours` earlier: the messages, and the
    replays with the instants their windows stood for."""
    with psycopg.connect(db) as conn:
        # A record's times cannot change once recorded (schema.sql, record_guard): the
        # test, as the tables' owner, lifts the guard for this one transaction.
        conn.execute("ALTER TABLE outbox.replays DISABLE TRIGGER replays_record_guard")
        conn.execute(
            "UPDATE outbox.messages SET created_at = created_at - make_interval(hours => %(h)s), "
            "dispatched_at = dispatched_at - make_interval(hours => %(h)s)",
            {"h": hours},
        )
        conn.execute(
            "UPDATE outbox.replays SET requested_at = requested_at - make_interval(hours => %(h)s), "
            "as_of = as_of - make_interval(hours => %(h)s), selection = jsonb_set(selection, '{resolved,since}', "
            "to_jsonb((selection #>> '{resolved,since}')::timestamptz - make_interval(hours => %(h)s)))",
            {"h": hours},
        )
        conn.execute("ALTER TABLE outbox.replays ENABLE TRIGGER replays_record_guard")
        conn.commit()


def dispatched_orders(db: str, n: int) -> None:
    with psycopg.connect(db) as conn:
        for i in range(n):
            enqueue(conn, "orders.created", {"n": i}, key=f"o{i}")
        conn.execute("UPDATE outbox.messages SET dispatched_at = now() WHERE dispatched_at IS NULL")
        conn.commit()


def test_a_relative_window_is_the_time_it_covered_when_it_ran(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    dispatched_orders(db, 5)
    first = replay(config, "--topic", "orders.*", "--since", "1h", "--yes")
    assert first.returncode == 0 and "5 message(s) to replay" in first.stdout, first.stdout + first.stderr
    shift_back(db, 2)  # two hours later, 20 more orders were dispatched
    dispatched_orders(db, 20)
    later = replay(config, "--topic", "orders.*", "--since", "1h", "--dry-run")
    assert later.returncode == 0 and "20 message(s) to replay" in later.stdout, later.stdout + later.stderr
    assert "replayed before" not in later.stdout + later.stderr, "the last hour then and now share no message"
    done = replay(config, "--topic", "orders.*", "--since", "1h", "--yes")
    assert done.returncode == 0 and "replay #2 done: 20 message(s)" in done.stdout, done.stdout + done.stderr
    # The same request once more covers the messages replay #2 selected: a repeat.
    repeat = replay(config, "--topic", "orders.*", "--since", "60m", "--yes")
    assert repeat.returncode == 2 and "replayed before (#2" in repeat.stderr, repeat.stderr
    assert "20 of the 20 message(s)" in repeat.stderr, repeat.stderr


def test_a_dry_run_says_a_selection_was_replayed_before_and_never_refuses(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    dispatched_orders(db, 5)
    assert replay(config, "--topic", "orders.*", "--since", "1h", "--yes").returncode == 0
    dry = replay(config, "--topic", "orders.*", "--since", "1h", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "5 message(s) to replay" in dry.stdout and "replayed before (#1" in dry.stdout, dry.stdout
    assert count(db) == 10, "the dry run copied nothing"


def test_a_replay_skips_messages_whose_key_the_outbox_no_longer_takes(empty_db: str, tmp_path: Path) -> None:
    # Before schema version 6 a key was 1 to 1,024 characters; now it is 1 to 2,048
    # bytes, and rows written before may hold longer keys. A copy of one the key index
    # cannot hold failed its chunk (index row size exceeds maximum), and --resume met
    # the same chunk every time: the replay could never finish. Every key over the limit
    # is skipped (a copy is a new message), and the replay says how many.
    unindexable = "".join(chr(0x4E00 + i * 7907 % 20_000) for i in range(1024))  # 3,072 bytes
    over_limit = "".join(chr(0x4E00 + i * 7919 % 20_000) for i in range(866))  # 2,598 bytes
    with psycopg.connect(empty_db) as conn:
        install_at(conn, "outbox", 5)
        for key in ("a", unindexable, over_limit, "b"):
            conn.execute(
                "INSERT INTO outbox.messages (topic, key, payload, dispatched_at) "
                "VALUES ('orders.created', %s, 'x', now())",
                (key,),
            )
        conn.commit()
        schema_manager.install(conn, "outbox")
    config = write_config(tmp_path / "relay.yaml", empty_db)
    done = replay(config, "--topic", "orders.*", "--yes", "--chunk", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 message(s) to replay" in done.stdout, done.stdout
    assert "2 of them will be skipped: a key over 2048 bytes" in done.stdout, done.stdout
    assert "replay #1 done: 2 message(s) copied to the outbox (of 4 counted: 2 skipped for a key over 2048 bytes)" in (
        done.stdout
    ), done.stdout

    def copied_keys() -> list[str]:
        with psycopg.connect(empty_db) as conn:
            rows = conn.execute("SELECT key FROM outbox.messages WHERE headers ? %s ORDER BY id", (HEADER,)).fetchall()
        return [row[0] for row in rows]

    assert copied_keys() == ["a", "b"]
    # A replay recorded before, stopped after its first row: --resume finishes it.
    with psycopg.connect(empty_db) as conn:
        conn.execute(
            "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total, copied, cursor_id) "
            'SELECT \'test\', \'{"topic": "orders.*", "key": null, "since": null, "until": null, '
            '"message_ids": []}\', 4, now(), 4, 1, 1'
        )
        conn.commit()
    resumed = replay(config, "--resume", "2", "--yes")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "replay #2 done: 2 message(s) copied to the outbox (of 4 counted: 2 skipped" in resumed.stdout
    assert copied_keys() == ["a", "b", "b"]
