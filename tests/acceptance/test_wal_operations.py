"""Operations on an outbox in WAL mode, through the real command line against the real
PostgreSQL with logical decoding (docs/how-to/wal-source.md, "Operations in WAL mode"): status, dead
letters, requeue and replay for what the table holds (parked messages are rows); replay
saying, or refusing, when what it is asked for went out straight from the WAL; backfill
writing into the WAL, in commit order with the application's messages."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from outbox_relay import enqueue
from tests.support.cli import RelayProcess, read_jsonl, run_cli
from tests.support.configs import write_config
from tests.support.databases import role_with_grants
from tests.support.http import HttpReceiver, answer
from tests.support.outbox import count
from tests.support.waiting import wait_for
from tests.support.wal import outbox_in_wal_mode

REPLAY = "outbox-replay-id"
BACKFILL = "outbox-backfill-id"


@pytest.fixture
def wal_outbox(db: str) -> Iterator[tuple[str, str]]:
    """The test's database with its outbox in WAL mode, and the slot's name."""
    with outbox_in_wal_mode(db) as name:
        yield db, name


def config_for(tmp_path: Path, db: str, slot: str, **settings: Any) -> Path:
    return write_config(tmp_path / "relay.yaml", db, wal={"slot": slot, "status_interval": "1s"}, **settings)


def streaming(relay: RelayProcess) -> bool:
    return any(line.get("event") == "wal_relay_started" for line in relay.logs())


def cli(config: Path, *args: str) -> Any:
    return run_cli(*args, "--config", str(config))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.lower().startswith("error")]


def replays(db: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.replays").fetchone()
    assert row is not None
    return int(row[0])


def test_dead_letters_requeue_status_and_replay_work_for_what_the_table_holds(
    wal_outbox: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_outbox
    receiver = HttpReceiver(answer(400))  # a rejection: dead-lettered, i.e. parked as a dead letter
    config = config_for(tmp_path, db, name, brokers={"hook": {"type": "webhook", "url": f"{receiver.url}/"}})
    relay = RelayProcess(config)
    try:
        wait_for(lambda: streaming(relay), 30, "the WAL relay streams")
        with psycopg.connect(db) as conn:
            dead = str(enqueue(conn, "orders.created", {"n": 0}, key="k"))
            conn.commit()
            wait_for(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1, 30, "the rejected message parked dead")
            receiver.respond = answer(200)
            live = str(enqueue(conn, "orders.created", {"n": 1}, key="other"))
            conn.commit()
        wait_for(lambda: live in [r.headers["message-id"] for r in receiver.accepted()], 30, "the live one published")
        assert count(db) == 1, "published straight from the WAL: no row"

        shown = cli(config, "status")
        assert shown.returncode == 0, shown.stderr
        assert "  dead-lettered  1\n" in shown.stdout
        assert "  pending        0 (rows in the table: parked messages; what waits in the WAL is the slot's lag)" in (
            shown.stdout
        )
        listed = cli(config, "dead-letters", "list")
        assert listed.returncode == 0 and dead in listed.stdout and "HTTP 400" in listed.stdout, listed.stdout

        requeued = cli(config, "dead-letters", "requeue", "--id", dead)
        assert requeued.returncode == 0, requeued.stderr
        wait_for(lambda: count(db, "dispatched_at IS NOT NULL") == 1, 30, "the table engine delivers the requeued one")

        # The parked message is a dispatched row now: replay copies it, and says what it cannot.
        replayed = cli(config, "replay", "--topic", "orders.*", "--yes")
        assert replayed.returncode == 0, replayed.stderr
        assert "1 message(s) to replay (orders.created: 1)" in replayed.stdout
        assert "the outbox is in WAL mode since " in replayed.stdout
        assert "a message published straight from the WAL never was a row" in replayed.stdout
        wait_for(
            lambda: (
                [
                    json.loads(r.body)["headers"].get(REPLAY)
                    for r in receiver.accepted()
                    if r.headers["message-id"] == dead
                ]
                == [None, "1"]
            ),
            30,
            "the copy delivered",
        )

        # What went out straight from the WAL: refused in one line, nothing recorded; exit 1
        # as for any selection that takes nothing.
        refused = cli(config, "replay", "--message-id", live, "--yes")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert error_lines(refused.stderr) == [refused.stderr.strip()], refused.stderr
        assert refused.stderr.startswith("error: nothing to replay: the outbox is in WAL mode since ")
        assert "replay the others from the broker, or enqueue them again" in refused.stderr
        assert replays(db) == 1
        dry = cli(config, "replay", "--message-id", live, "--dry-run")
        assert dry.returncode == 1 and "0 message(s) to replay" in dry.stdout, dry.stdout + dry.stderr
        assert "the outbox is in WAL mode since " in dry.stdout and "nothing to replay" in dry.stdout

        # A window wholly before the switch to wal is the table's: as in table mode.
        before = cli(config, "replay", "--until", "2000-01-01T00:00:00+00:00", "--yes")
        assert before.returncode == 1 and before.stdout.endswith("nothing to replay\n"), before.stdout + before.stderr
        assert "WAL mode" not in before.stdout
        assert relay.terminate() == 0
    finally:
        relay.close()
        receiver.close()


def test_replay_after_a_switch_back_to_the_table_says_the_wal_period_is_not_in_the_table(
    db: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    never = cli(config, "replay", "--all", "--yes")
    assert never.returncode == 1 and never.stdout == "0 message(s) to replay\nnothing to replay\n", never.stdout
    with outbox_in_wal_mode(db) as name:
        with psycopg.connect(db) as conn:
            enqueue(conn, "orders.created", {"n": 0}, key="k")  # into the WAL
            conn.commit()
        back = run_cli("schema", "source", "table", "--slot", name, env={"DATABASE_URL": db})
        assert back.returncode == 0, back.stderr
        refused = cli(config, "replay", "--all", "--yes")
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: nothing to replay: the outbox was in WAL mode until "), refused.stderr
        assert len(error_lines(refused.stderr)) == 1
        # After the switch back, the table has it all again.
        since = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        after = cli(config, "replay", "--since", since, "--yes")
        assert after.returncode == 1 and after.stdout.endswith("nothing to replay\n"), after.stdout + after.stderr
        assert "WAL mode" not in after.stdout
    assert replays(db) == 0


@pytest.fixture
def accounts(db: str) -> Iterator[str]:
    """A table of 3,000 accounts, and the DSN of the application's role (the producer
    GRANTs, and what FOR SHARE needs of the table), the role a backfill is best run as."""
    with psycopg.connect(db) as conn:
        conn.execute(
            "CREATE TABLE public.accounts (id bigint PRIMARY KEY, owner text NOT NULL, "
            "balance integer NOT NULL DEFAULT 0, version integer NOT NULL DEFAULT 0)"
        )
        conn.execute("INSERT INTO public.accounts (id, owner) SELECT g, 'owner-' || g FROM generate_series(1, 3000) g")
        conn.commit()
    with role_with_grants(db, "producer", "app") as app:
        role = sql.Identifier(str(conninfo_to_dict(app)["user"]))
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT SELECT, UPDATE (balance) ON public.accounts TO {}").format(role))
        yield app  # dropped with its grants (DROP OWNED BY)


def backfill(config: Path, app_dsn: str, *args: str) -> Any:
    return run_cli(
        "backfill",
        "--config",
        str(config),
        "--table",
        "accounts",
        "--topic",
        "accounts.snapshot",
        "--key-column",
        "id",
        "--yes",
        *args,
        env={"OUTBOX_RELAY_BACKFILL_DSN": app_dsn},
        timeout=120,
    )


def test_a_backfill_in_wal_mode_writes_into_the_wal_as_the_applications_role(
    wal_outbox: tuple[str, str], accounts: str, tmp_path: Path
) -> None:
    db, name = wal_outbox
    sink = tmp_path / "out.jsonl"
    config = config_for(tmp_path, db, name, sink=sink)
    done = backfill(config, accounts, "--chunk", "700")
    assert done.returncode == 0 and "backfill #1 done: 3000 message(s)" in done.stdout, done.stdout + done.stderr
    assert count(db) == 0, "no row: the chunks called enqueue, which writes into the WAL"
    relay = RelayProcess(config)
    try:
        wait_for(lambda: len(read_jsonl(sink)) >= 3000, 60, "the backfill streamed from the slot")
        assert relay.terminate() == 0
    finally:
        relay.close()
    records = read_jsonl(sink)
    assert [r["payload"]["id"] for r in records] == list(range(1, 3001)), "once each, in primary-key order"
    assert {r["headers"][BACKFILL] for r in records} == {"1"}
    assert all(r["key"] == str(r["payload"]["id"]) for r in records)
    assert count(db) == 0


def test_in_wal_mode_the_last_message_of_a_key_carries_the_rows_latest_state_under_live_updates(
    wal_outbox: tuple[str, str], accounts: str, tmp_path: Path
) -> None:
    # As tests/acceptance/test_backfill.py checks it in table mode: the application
    # updates accounts and enqueues each change (into the WAL) in the same transaction,
    # while the backfill snapshots the same rows and a relay streams everything.
    db, name = wal_outbox
    sink = tmp_path / "out.jsonl"
    config = config_for(tmp_path, db, name, sink=sink)
    stop = threading.Event()
    committed: list[int] = []
    failures: list[BaseException] = []

    def application() -> None:
        rng = random.Random()
        try:
            with psycopg.connect(db) as conn:
                while not stop.is_set():
                    account = rng.randint(1, 3000)
                    row = conn.execute(
                        "UPDATE public.accounts SET balance = balance + 1, version = version + 1 "
                        "WHERE id = %s RETURNING version",
                        (account,),
                    ).fetchone()
                    assert row is not None
                    enqueue(conn, "accounts.changed", {"id": account, "version": row[0]}, key=str(account))
                    conn.commit()
                    committed.append(account)
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    relay = RelayProcess(config)
    writers = [threading.Thread(target=application) for _ in range(3)]
    try:
        wait_for(lambda: streaming(relay), 30, "the WAL relay streams")
        for writer in writers:
            writer.start()
        wait_for(lambda: len(committed) >= 200, 30, "live updates before the backfill")
        before = len(committed)
        out = backfill(config, accounts, "--chunk", "50", "--rate", "3000")
        assert out.returncode == 0, out.stderr
        assert len(committed) > before + 100, "live writes went on during the backfill"
        stop.set()
        for writer in writers:
            writer.join()
        assert not failures, failures
        wait_for(lambda: len(read_jsonl(sink)) >= len(committed) + 3000, 120, "everything delivered")
        assert relay.terminate() == 0
    finally:
        stop.set()
        relay.close()
    with psycopg.connect(db) as conn:
        final = dict(conn.execute("SELECT id::text, version FROM public.accounts").fetchall())
    last: dict[str, int] = {}
    snapshots = 0
    for line in read_jsonl(sink):
        last[line["key"]] = line["payload"]["version"]
        snapshots += BACKFILL in line["headers"]
    assert snapshots == 3000
    wrong = {key: (last[key], version) for key, version in final.items() if last[key] != version}
    assert not wrong, f"{len(wrong)} accounts whose last message is stale, e.g. {list(wrong.items())[:3]}"
    assert count(db) == 0, "nothing went through the table"
