"""(f) what the outbox costs the application's transaction, measured with pgbench (a C
client, so the figures are the database's cost and not a Python client's):

- plain: ``BEGIN; INSERT INTO bench_orders ...; COMMIT``
- outbox: the same plus ``SELECT <schema>.enqueue(...)`` (and its NOTIFY trigger),
  with the trigger enabled and disabled;
- floor: the same bytes into a bare table (what any outbox must at least cost);
- direct: an INSERT into the outbox table without the enqueue function;
- outbox in one statement: the INSERT and the enqueue in one data-modifying CTE, so
  the enqueue adds no round trip;
- outbox in WAL mode (measure_wal): the same enqueue into an outbox switched to the
  WAL source, which emits a logical decoding message instead of inserting a row.

p50 latency for one client, and throughput for 16 concurrent clients. Runs are
interleaved over several rounds and the medians reported.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.common import percentile
from benchmarks.env import fresh_schema
from benchmarks.wal_source import drop_slot, install
from outbox_relay import sqlfiles
from outbox_relay.demo import local_postgres
from outbox_relay.operations import schema_manager

SCHEMA = "bench_write"

PLAIN = """\\set c random(1, 1000)
BEGIN;
INSERT INTO bench_orders (customer, total) VALUES (:c, :c * 3);
COMMIT;
"""

OUTBOX = f"""\\set c random(1, 1000)
BEGIN;
INSERT INTO bench_orders (customer, total) VALUES (:c, :c * 3);
SELECT {SCHEMA}.enqueue('orders.created', 'customer-' || :c::int,
    jsonb_build_object('customer', :c::int, 'total', :c::int * 3));
COMMIT;
"""


# The same enqueue into an outbox in WAL mode (schema source wal): its body emits one
# logical decoding message instead of inserting a row.
WAL_SCHEMA = "bench_write_wal"
OUTBOX_WAL = OUTBOX.replace(f"{SCHEMA}.enqueue", f"{WAL_SCHEMA}.enqueue")


# The floor of any outbox: the same bytes into a bare table (bigserial key, no other
# index, no trigger, no check) in the same transaction.
FLOOR = """\\set c random(1, 1000)
BEGIN;
INSERT INTO bench_orders (customer, total) VALUES (:c, :c * 3);
INSERT INTO bench_floor (topic, key, payload) VALUES ('orders.created', 'customer-' || :c::int,
    convert_to(jsonb_build_object('customer', :c::int, 'total', :c::int * 3)::text, 'UTF8'));
COMMIT;
"""

# A direct INSERT into the outbox table (its checks, indexes and trigger, no function).
DIRECT = f"""\\set c random(1, 1000)
BEGIN;
INSERT INTO bench_orders (customer, total) VALUES (:c, :c * 3);
INSERT INTO {SCHEMA}.messages (topic, key, payload) VALUES ('orders.created', 'customer-' || :c::int,
    convert_to(jsonb_build_object('customer', :c::int, 'total', :c::int * 3)::text, 'UTF8'));
COMMIT;
"""

# The same work with the enqueue in the business statement itself (a data-modifying
# CTE): no extra round trip, so what remains is the database's own cost.
OUTBOX_ONE_STATEMENT = f"""\\set c random(1, 1000)
BEGIN;
WITH o AS (INSERT INTO bench_orders (customer, total) VALUES (:c, :c * 3) RETURNING customer, total)
SELECT {SCHEMA}.enqueue('orders.created', 'customer-' || o.customer,
    jsonb_build_object('customer', o.customer, 'total', o.total)) FROM o;
COMMIT;
"""


def _pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    candidate = local_postgres.find_bindir() / "pgbench"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("pgbench not found (it comes with the PostgreSQL client/server packages)")


def _setup(dsn: str) -> None:
    fresh_schema(dsn, SCHEMA)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_orders")
        conn.execute(
            "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer int NOT NULL, "
            "total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("DROP TABLE IF EXISTS bench_floor")
        conn.execute("CREATE TABLE bench_floor (id bigserial PRIMARY KEY, topic text, key text, payload bytea)")


def _notify(dsn: str, on: bool) -> None:
    with psycopg.connect(dsn) as conn:
        schema_manager.set_notify(conn, SCHEMA, on)


def _run(dsn: str, script: str, clients: int, seconds: float, workdir: Path) -> tuple[float, list[float]]:
    """(transactions per second, per-transaction latencies in ms)."""
    path = workdir / "script.sql"
    path.write_text(script)
    for old in workdir.glob("pgbench_log*"):
        old.unlink()
    result = subprocess.run(
        # Prepared statements, as drivers use them (psycopg prepares a repeated query).
        [
            _pgbench(),
            "-n",
            "-M",
            "prepared",
            "-f",
            str(path),
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(int(seconds)),
            "-l",
            "--log-prefix",
            str(workdir / "pgbench_log"),
            dsn,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()[-500:]}")
    tps = next(float(line.split("=")[1].split()[0]) for line in result.stdout.splitlines() if line.startswith("tps ="))
    latencies = [
        int(line.split()[2]) / 1000
        for log in workdir.glob("pgbench_log*")
        for line in log.read_text().splitlines()
        if line.strip()
    ]
    return tps, latencies


def measure(dsn: str, *, seconds: float, rounds: int) -> dict[str, float]:
    _setup(dsn)
    variants = {
        "plain": (PLAIN, True),
        "floor_bare_table": (FLOOR, True),
        "outbox_direct_insert_notify_on": (DIRECT, True),
        "outbox_notify_on": (OUTBOX, True),
        "outbox_notify_off": (OUTBOX, False),
        "outbox_one_statement_notify_on": (OUTBOX_ONE_STATEMENT, True),
    }
    return _measure(dsn, variants, seconds=seconds, rounds=rounds)


def measure_wal(dsn: str, *, seconds: float, rounds: int) -> dict[str, float]:
    """`outbox.enqueue` in WAL mode (one logical message, no row) beside the floor and
    the table's enqueue, interleaved in the same rounds. The WAL outbox's slot exists
    (a switch to wal needs it) and nothing streams it meanwhile: the figures are the
    writer's cost alone; the walsender's decoding is measured with the drains."""
    _setup(dsn)
    install(dsn, WAL_SCHEMA, "wal")
    variants = {
        "plain": (PLAIN, True),
        "floor_bare_table": (FLOOR, True),
        "outbox_notify_on": (OUTBOX, True),
        "outbox_wal": (OUTBOX_WAL, True),
    }
    try:
        return _measure(dsn, variants, seconds=seconds, rounds=rounds)
    finally:
        drop_slot(dsn, WAL_SCHEMA)


# The outbox as it was at an earlier schema version, built by this package's own
# migrations up to it: what a schema change costs the write path, measured beside the
# current one in the same rounds (issue 22: version 9 against today's).
def install_version(dsn: str, schema: str, version: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    with psycopg.connect(dsn) as conn, conn.transaction():
        for number, name in sqlfiles.migrations():
            if number <= version:
                conn.execute(sqlfiles.migration(name, schema))
                conn.execute(sqlfiles.record_version(schema, number))


def measure_against_version(dsn: str, *, version: int, seconds: float, rounds: int) -> dict[str, float]:
    """`outbox.enqueue` now and at schema `version`, beside the floor, interleaved."""
    _setup(dsn)
    previous = f"bench_write_v{version}"
    install_version(dsn, previous, version)
    variants = {
        "floor_bare_table": (FLOOR, True),
        "outbox_notify_on": (OUTBOX, True),
        f"outbox_v{version}_notify_on": (OUTBOX.replace(f"{SCHEMA}.enqueue", f"{previous}.enqueue"), True),
    }
    return _measure(dsn, variants, seconds=seconds, rounds=rounds)


# The optional index of pending rows by message id (docs/how-to/console.md): what it
# costs each enqueue, as btree and as hash, with a backlog in every schema (an index's
# insert cost grows with its size), interleaved with the same enqueue without it.
BACKLOG = """INSERT INTO {s}.messages (topic, key, payload)
SELECT 'orders.created', CASE WHEN g % 2 = 0 THEN 'customer-' || (g % 1000) END, '\\x7b7d'::bytea
FROM generate_series(1, {n}) AS g"""
PENDING_ID_INDEX = (
    "CREATE INDEX messages_pending_message_id_idx ON {s}.messages USING {kind} (message_id) "
    "WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL"
)


def measure_optional_index(dsn: str, *, backlog: int, seconds: float, rounds: int) -> dict[str, float]:
    _setup(dsn)
    kinds = {f"{SCHEMA}_btree": "btree", f"{SCHEMA}_hash": "hash"}
    for schema in kinds:
        fresh_schema(dsn, schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in (SCHEMA, *kinds):
            conn.execute(sql.SQL(BACKLOG.format(s="{s}", n=int(backlog))).format(s=sql.Identifier(schema)))
        for schema, kind in kinds.items():
            statement = PENDING_ID_INDEX.format(s="{s}", kind=kind)  # kind: one of two literals above
            conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema)))
        conn.execute("VACUUM ANALYZE")
    variants = {"floor_bare_table": (FLOOR, True), "outbox_notify_on": (OUTBOX, True)}
    for schema, kind in kinds.items():
        variants[f"outbox_pending_id_{kind}"] = (OUTBOX.replace(f"{SCHEMA}.enqueue", f"{schema}.enqueue"), True)
    return _measure(dsn, variants, seconds=seconds, rounds=rounds)


def main() -> None:
    """`python -m benchmarks.write_path --against VERSION [--seconds S] [--rounds N]`, or
    `--optional-index [--backlog N]`: the optional pending message-id index's cost."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.write_path")
    parser.add_argument("--against", type=int, help="the earlier schema version")
    parser.add_argument("--optional-index", action="store_true", help="the optional pending message-id index")
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if (args.against is None) == (not args.optional_index):
        parser.error("give --against VERSION or --optional-index")
    with local_postgres.running() as cluster:
        if args.optional_index:
            result = measure_optional_index(cluster.dsn, backlog=args.backlog, seconds=args.seconds, rounds=args.rounds)
        else:
            result = measure_against_version(
                cluster.dsn, version=args.against, seconds=args.seconds, rounds=args.rounds
            )
    print(json.dumps(result, indent=2))


def _measure(dsn: str, variants: dict[str, tuple[str, bool]], *, seconds: float, rounds: int) -> dict[str, float]:
    p50: dict[str, list[float]] = {name: [] for name in variants}
    tps: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for _ in range(rounds):
            for name, (script, notify) in variants.items():
                _notify(dsn, notify)
                _, latencies = _run(dsn, script, 1, seconds, workdir)
                p50[name].append(percentile(latencies, 50))
                tps[name].append(_run(dsn, script, 16, seconds, workdir)[0])
    result: dict[str, float] = {}
    for name in variants:
        result[f"{name}_p50_ms"] = round(statistics.median(p50[name]), 3)
        result[f"{name}_tps_16w"] = round(statistics.median(tps[name]), 1)
    return result


if __name__ == "__main__":
    main()
