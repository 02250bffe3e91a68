"""`outbox-relay backfill`, through the real CLI, against real PostgreSQL."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from outbox_relay import enqueue
from tests.support.cli import RelayProcess, exe, read_jsonl, run_cli, run_cli_at_terminal
from tests.support.configs import write_config
from tests.support.databases import role_with_grants
from tests.support.outbox import count
from tests.support.waiting import wait_for

HEADER = "outbox-backfill-id"
ROWS = 100_000


def make_accounts(db: str, rows: int) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "CREATE TABLE public.accounts (id bigint PRIMARY KEY, owner text NOT NULL, "
            "region text NOT NULL, balance integer NOT NULL DEFAULT 0, version integer NOT NULL DEFAULT 0)"
        )
        conn.execute(
            "INSERT INTO public.accounts (id, owner, region) SELECT g, 'owner-' || g, "
            "CASE WHEN g %% 4 = 0 THEN 'us' ELSE 'eu' END FROM generate_series(1, %s) AS g",
            (rows,),
        )
        conn.commit()


def outbox_rows(db: str) -> list[tuple[str | None, dict[str, Any], dict[str, str]]]:
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT key, convert_from(payload, 'UTF8'), headers FROM outbox.messages "
            "WHERE topic = 'accounts.snapshot' ORDER BY id"
        ).fetchall()
    return [(key, json.loads(payload), headers) for key, payload, headers in rows]


# The source most tests snapshot: by its name on the search path, or schema-qualified.
SNAPSHOT = ("--table", "accounts", "--topic", "accounts.snapshot")
SNAPSHOT_QUALIFIED = ("--table", "public.accounts", "--topic", "accounts.snapshot")


def backfill(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli("backfill", "--config", str(config), *args, timeout=timeout)


def test_one_message_per_row_with_its_key_and_the_row_as_json(db: str, tmp_path: Path) -> None:
    make_accounts(db, ROWS)
    config = write_config(tmp_path / "relay.yaml", db)
    dry = backfill(config, *SNAPSHOT, "--where", "region=eu", "--dry-run")
    assert dry.returncode == 0 and "75000 row(s) of public.accounts to enqueue on accounts.snapshot" in dry.stdout
    assert count(db) == 0, "a dry run writes nothing"
    done = backfill(
        config,
        *SNAPSHOT_QUALIFIED,
        "--key-column",
        "id",
        "--where",
        "region=eu",
        "--chunk",
        "5000",
        "--yes",
    )
    assert done.returncode == 0, done.stderr
    assert "backfill #1 done: 75000 message(s)" in done.stdout, done.stdout
    progress = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert progress and progress[-1]["event"] == "backfill_progress" and progress[-1]["copied"] == 75000, done.stderr
    rows = outbox_rows(db)
    ids = [payload["id"] for _, payload, _ in rows]
    assert len(ids) == 75000 and len(set(ids)) == 75000, "exactly one message per row"
    assert set(ids) == {i for i in range(1, ROWS + 1) if i % 4 != 0}
    assert ids == sorted(ids), "in primary-key order"
    key, payload, headers = rows[0]
    assert key == "1" and payload == {"id": 1, "owner": "owner-1", "region": "eu", "balance": 0, "version": 0}
    assert headers == {HEADER: "1"}
    again = backfill(
        config,
        *SNAPSHOT_QUALIFIED,
        "--key-column",
        "id",
        "--where",
        "region=eu",
        "--yes",
    )
    assert again.returncode == 2 and "backfilled the same way before (#1)" in again.stderr, again.stderr
    status = json.loads(run_cli("status", "--config", str(config), "--json").stdout)
    assert [(b["backfill_id"], b["total"], b["copied"], b["finished"]) for b in status["backfills"]] == [
        (1, 75000, 75000, True)
    ]


def test_bad_input_is_one_line_and_writes_nothing(db: str, tmp_path: Path) -> None:
    make_accounts(db, 10)
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE public.no_pk (a int)")
        conn.commit()
    config = write_config(tmp_path / "relay.yaml", db)
    cases = [
        (["--table", "accounts; DROP TABLE accounts", "--topic", "t"], "--table 'accounts; DROP TABLE accounts'"),
        (["--table", "missing", "--topic", "t"], "no such table"),
        (["--table", "no_pk", "--topic", "t"], "has no primary key"),
        (["--table", "accounts", "--topic", "bad topic"], "--topic: invalid topic"),
        (["--table", "accounts", "--topic", "t", "--key-column", "nope"], "has no column 'nope'"),
        (["--table", "accounts", "--topic", "t", "--where", "region~eu"], "--where 'region~eu'"),
        (["--table", "accounts", "--topic", "t", "--where", "id>=ten"], "invalid input syntax for type bigint"),
        (["--table", "accounts", "--topic", "t", "--rate", "fast"], "--rate"),
        (["--topic", "t"], "--table and --topic are required"),
        (["--resume", "7"], "no backfill #7"),
    ]
    for args, says in cases:
        out = backfill(config, *args)
        assert out.returncode in (1, 2) and says in out.stderr, (args, out.stderr)
        errors = [line for line in out.stderr.splitlines() if line.lower().startswith("error")]
        assert len(errors) == 1, out.stderr
    # A value is a value, never SQL: this filter matches no owner.
    quoted = backfill(config, "--table", "accounts", "--topic", "t", "--where", "owner=x' OR '1'='1", "--dry-run")
    assert quoted.returncode == 1 and "0 row(s)" in quoted.stdout, quoted.stdout + quoted.stderr  # took nothing
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM public.accounts").fetchone() == (10,)
        assert conn.execute("SELECT count(*) FROM outbox.backfills").fetchone() == (0,)
    assert count(db) == 0


def test_a_backfill_killed_mid_way_resumes_with_nothing_missing_and_nothing_twice(db: str, tmp_path: Path) -> None:
    make_accounts(db, ROWS)
    config = write_config(tmp_path / "relay.yaml", db)
    command = subprocess.Popen(
        [
            *exe(),
            "backfill",
            "--config",
            str(config),
            *SNAPSHOT,
            "--key-column",
            "id",
            "--chunk",
            "1000",
            "--rate",
            "20000/s",
            "--yes",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def copied() -> int:
            with psycopg.connect(db) as conn:
                row = conn.execute("SELECT coalesce(max(copied), 0) FROM outbox.backfills").fetchone()
            return row[0] if row else 0

        wait_for(lambda: copied() >= 10_000, what="the backfill under way")
        command.send_signal(signal.SIGKILL)
        command.wait(10)
    finally:
        if command.poll() is None:
            command.kill()
        command.communicate()
    assert 0 < copied() < ROWS, "killed mid-way"
    resumed = backfill(config, "--resume", "1", "--yes")
    assert resumed.returncode == 0 and "resuming backfill #1" in resumed.stdout, resumed.stdout + resumed.stderr
    assert f"backfill #1 done: {ROWS} message(s)" in resumed.stdout, resumed.stdout
    ids = [payload["id"] for _, payload, _ in outbox_rows(db)]
    assert len(ids) == ROWS and set(ids) == set(range(1, ROWS + 1)), "nothing missing, nothing twice"


def test_the_last_message_of_a_key_carries_the_rows_latest_state_under_live_updates(db: str, tmp_path: Path) -> None:
    # The application updates accounts and enqueues each change (key: the account id) in
    # the same transaction, while the backfill snapshots the same rows and a relay
    # publishes everything. Whatever interleaving, the last message delivered for each
    # account shows its final version; and every live write commits.
    rows = 3000
    make_accounts(db, rows)
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink)
    stop = threading.Event()
    committed: list[int] = []
    failures: list[BaseException] = []

    def application() -> None:
        rng = random.Random()
        try:
            with psycopg.connect(db) as conn:
                while not stop.is_set():
                    account = rng.randint(1, rows)
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
        relay.wait_started()
        for writer in writers:
            writer.start()
        wait_for(lambda: len(committed) >= 200, what="live updates before the backfill")
        before = len(committed)
        out = backfill(
            config,
            *SNAPSHOT,
            "--key-column",
            "id",
            "--chunk",
            "50",
            "--rate",
            "3000",
            "--yes",
        )
        assert out.returncode == 0, out.stderr
        assert len(committed) > before + 100, "live writes went on during the backfill"
        stop.set()
        for writer in writers:
            writer.join()
        assert not failures, failures
        with psycopg.connect(db) as conn:
            final = dict(conn.execute("SELECT id::text, version FROM public.accounts").fetchall())
            total = conn.execute("SELECT count(*) FROM outbox.messages").fetchone()
        assert total is not None
        wait_for(lambda: len(read_jsonl(sink)) >= total[0], timeout=120, what="everything delivered")
    finally:
        stop.set()
        relay.close()
    last: dict[str, int] = {}
    snapshots = 0
    for line in read_jsonl(sink):
        last[line["key"]] = line["payload"]["version"]
        snapshots += HEADER in line["headers"]
    assert snapshots == rows
    wrong = {key: (last[key], version) for key, version in final.items() if last[key] != version}
    assert not wrong, f"{len(wrong)} accounts whose last message is stale, e.g. {list(wrong.items())[:3]}"


@pytest.mark.parametrize("rate", ["0", "-5/s"])
def test_a_rate_must_be_positive(db: str, tmp_path: Path, rate: str) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    out = backfill(config, "--table", "accounts", "--topic", "t", "--rate", rate)
    assert out.returncode == 2 and "--rate" in out.stderr


def test_backfill_runs_as_the_applications_role_with_dsn(db: str, tmp_path: Path) -> None:
    # The relay's role may not read application tables; the application's role may, and
    # its outbox GRANTs (schema sql --producer-role) cover what a backfill writes.
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from outbox_relay import sqlfiles

    make_accounts(db, 500)
    role = "app_" + str(conninfo_to_dict(db)["dbname"])[-8:]
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        conn.execute(sqlfiles.grants("producer", "outbox", role))
        # FOR SHARE needs UPDATE on some column besides SELECT (PostgreSQL's rule).
        conn.execute(sql.SQL("GRANT SELECT, UPDATE (balance) ON public.accounts TO {}").format(sql.Identifier(role)))
    try:
        config = write_config(tmp_path / "relay.yaml", db)
        out = run_cli(
            "backfill",
            "--config",
            str(config),
            *SNAPSHOT,
            "--yes",
            env={"OUTBOX_RELAY_BACKFILL_DSN": make_conninfo(db, user=role, password="pw")},
        )
        assert out.returncode == 0 and "done: 500 message(s)" in out.stdout, out.stdout + out.stderr
        assert len(outbox_rows(db)) == 500
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_primary_key_changed_under_a_waiting_chunk_makes_it_skip_nothing(db: str, tmp_path: Path) -> None:
    # The application moves row 5 to id 5,000,000 while the first chunk waits for it.
    # Were the cursor taken from the re-checked rows, it would jump to 5,000,000 and
    # rows 1,001 to 3,000 would never be copied.
    make_accounts(db, 3000)
    config = write_config(tmp_path / "relay.yaml", db)
    with psycopg.connect(db) as holder:
        holder.execute("UPDATE public.accounts SET id = 5000000 WHERE id = 5")  # holds the row
        command = subprocess.Popen(
            [
                *exe(),
                "backfill",
                "--config",
                str(config),
                *SNAPSHOT,
                "--chunk",
                "1000",
                "--yes",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            seen = ""
            assert command.stderr is not None
            while "backfill_chunk_yielded" not in seen:  # the chunk met the held row and gave way
                assert time.monotonic() < deadline and command.poll() is None, seen
                seen += command.stderr.readline()
            holder.commit()
            _out, err = command.communicate(timeout=60)
        finally:
            if command.poll() is None:
                command.kill()
    assert command.returncode == 0, err
    ids = sorted(payload["id"] for _, payload, _ in outbox_rows(db))
    assert ids == [i for i in range(1, 3001) if i != 5] + [5_000_000], "a row skipped or copied twice"


def test_a_column_named_like_the_alias_and_refusals_before_copying(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "CREATE TABLE public.events (id int PRIMARY KEY, t timestamptz NOT NULL DEFAULT now(), body text NOT NULL)"
        )
        conn.execute("INSERT INTO public.events (id, body) VALUES (1, 'small'), (2, repeat('x', 5000))")
        conn.commit()
    config = write_config(tmp_path / "relay.yaml", db, max_payload_bytes=4096)
    too_large = backfill(config, "--table", "events", "--topic", "events.snapshot", "--yes")
    assert too_large.returncode == 1 and "exceeds relay.max_payload_bytes (4096)" in too_large.stderr, too_large.stderr
    assert count(db) == 0, "nothing of the chunk was written"
    import yaml

    tree = yaml.safe_load(config.read_text())
    tree["routes"] = [{"topic": "orders.*", "broker": "sink"}]
    tree["relay"].pop("max_payload_bytes")
    config.write_text(yaml.safe_dump(tree))
    unrouted = backfill(config, "--table", "events", "--topic", "events.snapshot")
    assert unrouted.returncode == 2 and "no route" in unrouted.stderr and "events.snapshot" in unrouted.stderr
    done = backfill(config, "--table", "events", "--topic", "orders.events", "--key-column", "id", "--yes")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(db) as conn:
        payloads = [
            json.loads(r[0])
            for r in conn.execute("SELECT convert_from(payload, 'UTF8') FROM outbox.messages ORDER BY id").fetchall()
        ]
    assert [sorted(p) for p in payloads] == [["body", "id", "t"]] * 2, "the whole row, not its column t"


def test_a_partitioned_table_is_backfilled_from_all_its_partitions(db: str, tmp_path: Path) -> None:
    # A partitioned table holds no rows of its own: reading it ONLY found none.
    with psycopg.connect(db) as conn:
        conn.execute(
            "CREATE TABLE public.ledger (region text NOT NULL, id int NOT NULL, amount int NOT NULL, "
            "PRIMARY KEY (region, id)) PARTITION BY LIST (region)"
        )
        conn.execute("CREATE TABLE public.ledger_eu PARTITION OF public.ledger FOR VALUES IN ('eu')")
        conn.execute("CREATE TABLE public.ledger_us PARTITION OF public.ledger FOR VALUES IN ('us')")
        conn.execute(
            "INSERT INTO public.ledger SELECT CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, g, g * 10 "
            "FROM generate_series(1, 1500) AS g"
        )
        conn.commit()
    config = write_config(tmp_path / "relay.yaml", db)
    out = backfill(config, "--table", "ledger", "--topic", "ledger.snapshot", "--chunk", "100", "--yes")
    assert out.returncode == 0, out.stderr
    assert "1500 row(s) of public.ledger to enqueue" in out.stdout, out.stdout
    assert "backfill #1 done: 1500 message(s)" in out.stdout, out.stdout
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT convert_from(payload, 'UTF8')::jsonb FROM outbox.messages WHERE topic = 'ledger.snapshot' "
            "ORDER BY id"
        ).fetchall()
    copied = [(r[0]["region"], r[0]["id"]) for r in rows]
    assert sorted(copied) == sorted((("us" if g % 3 == 0 else "eu"), g) for g in range(1, 1501)), "each row once"
    assert copied == sorted(copied), "in primary-key order across partitions"
    filtered = backfill(
        config, "--table", "public.ledger", "--topic", "ledger.snapshot", "--where", "region=us", "--dry-run"
    )
    assert filtered.returncode == 0 and "500 row(s) of public.ledger" in filtered.stdout, filtered.stdout


def test_the_same_table_however_it_is_named_was_backfilled_before(db: str, tmp_path: Path) -> None:
    make_accounts(db, 40)
    config = write_config(tmp_path / "relay.yaml", db)
    first = backfill(config, *SNAPSHOT_QUALIFIED, "--where", "region=eu", "--yes")
    assert first.returncode == 0 and "backfill #1 done: 30 message(s)" in first.stdout, first.stdout + first.stderr
    unqualified = backfill(config, *SNAPSHOT, "--where", "region=eu", "--yes")
    assert unqualified.returncode == 2, unqualified.stdout
    assert "backfilled the same way before (#1)" in unqualified.stderr, unqualified.stderr
    assert len(outbox_rows(db)) == 30, "nothing enqueued twice"
    other_filter = backfill(config, *SNAPSHOT, "--where", "region=us", "--yes")
    assert other_filter.returncode == 0, other_filter.stderr
    assert len(outbox_rows(db)) == 40


def test_a_backfill_asks_first_with_the_row_count(db: str, tmp_path: Path) -> None:
    make_accounts(db, 20)
    config = write_config(tmp_path / "relay.yaml", db)
    unasked = backfill(config, *SNAPSHOT)  # no terminal to ask at: refused, never waiting
    assert unasked.returncode == 2 and "20 row(s) would be enqueued; pass --yes to confirm" in unasked.stderr, (
        unasked.stdout + unasked.stderr
    )
    declined = run_cli_at_terminal("backfill", "--config", str(config), *SNAPSHOT, answer="n")
    assert declined.returncode == 1 and "Enqueue 20 message(s)" in declined.stdout, declined.stdout
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.backfills").fetchone() == (0,), "nothing recorded"
    assert count(db) == 0
    accepted = run_cli_at_terminal("backfill", "--config", str(config), *SNAPSHOT, answer="y")
    assert accepted.returncode == 0 and "backfill #1 done: 20 message(s)" in accepted.stdout, accepted.stdout


def test_resume_refuses_a_backfill_another_role_recorded(db: str, tmp_path: Path) -> None:
    # The relay's role may not read payroll, but it may record a backfill: the
    # operator's resume would have copied payroll into the outbox, which that role reads.
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE public.payroll (id int PRIMARY KEY, salary int NOT NULL)")
        conn.execute("INSERT INTO public.payroll SELECT g, 1000 * g FROM generate_series(1, 5) AS g")
        conn.commit()
    config = write_config(tmp_path / "relay.yaml", db)
    with role_with_grants(db, "relay", "relay") as relay_dsn:
        relay_role = str(conninfo_to_dict(relay_dsn)["user"])
        with psycopg.connect(relay_dsn) as conn:
            conn.execute(
                "INSERT INTO outbox.backfills (requested_by, source, total) "
                'VALUES (\'ops@host as operator\', \'{"table": "payroll", "topic": "t"}\', 5)'
            )
            conn.commit()
        forced = backfill(config, "--resume", "1", "--yes")
        assert forced.returncode == 2, forced.stdout + forced.stderr
        assert f"recorded by role {relay_role!r}" in forced.stderr and "public.payroll" in forced.stderr, forced.stderr
        declined = run_cli_at_terminal("backfill", "--config", str(config), "--resume", "1", "--yes", answer="n")
        assert declined.returncode == 1 and "public.payroll" in declined.stdout, declined.stdout + declined.stderr
        assert count(db) == 0, "nothing of payroll reached the outbox"


def test_a_backfill_another_role_recorded_is_resumed_by_that_role_or_after_a_yes(db: str, tmp_path: Path) -> None:
    make_accounts(db, 10)
    config = write_config(tmp_path / "relay.yaml", db)
    with role_with_grants(db, "producer", "app") as app_dsn:
        with psycopg.connect(db, autocommit=True) as conn:  # the application may read its table
            role = str(conninfo_to_dict(app_dsn)["user"])
            conn.execute(
                sql.SQL("GRANT SELECT, UPDATE (balance) ON public.accounts TO {}").format(sql.Identifier(role))
            )
        for _ in range(2):
            with psycopg.connect(app_dsn) as conn:
                conn.execute(
                    "INSERT INTO outbox.backfills (requested_by, source, total) "
                    'VALUES (\'app\', \'{"table": "public.accounts", "topic": "accounts.snapshot"}\', 10)'
                )
                conn.commit()
        own = backfill(config, "--resume", "1", "--yes", "--dsn", app_dsn)
        assert own.returncode == 0 and "backfill #1 done: 10 message(s)" in own.stdout, own.stdout + own.stderr
        confirmed = run_cli_at_terminal("backfill", "--config", str(config), "--resume", "2", answer="y")
        assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
        assert f"recorded by role {role!r}" in confirmed.stdout and "backfill #2 done" in confirmed.stdout
    assert len(outbox_rows(db)) == 20
