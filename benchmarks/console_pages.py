"""The operator console's pages on a large outbox (issue 24, point 6): each page should
answer in under 200 ms with 1,000,000 pending and 100,000 dead-lettered rows, through
the existing indexes (no sequential scan of the outbox).

A benchmark figure, not a timed test. One outbox is loaded once, in a few INSERT ...
SELECT generate_series statements: 200,000 dispatched rows (what retention keeps), then
100,000 dead letters (four topics, four reasons, dead-lettered over the last week), then
1,000,000 pending rows in four key shapes (one hot key, 100 keys, a key per message,
keyless), then three relays and an hour of their samples (one a relay every 10 s), and
VACUUM ANALYZE. The console (outbox_relay.console.app.Console, dead_letter_policy hold,
a bearer token) is served by uvicorn in a thread, as tests/console serve it, and asked
over loopback with httpx: each page `--requests` times, median and p95 of the whole
answer (HTTP, the queries, the template). The overview's first read computes its
snapshot while the page waits (cold: once a run, a fresh Console each run); later reads
are served from the snapshot (warm) while the background refresh runs beside them.

Every console query is also run under EXPLAIN (ANALYZE, BUFFERS) as the console's
sessions run it (enable_seqscan off); the plans go into the results file, and any
"Seq Scan on messages" is reported.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from benchmarks import env
from benchmarks.common import PAYLOAD_BYTES, percentile
from outbox_relay.console.app import Console
from outbox_relay.console.auth import Authenticator
from outbox_relay.console.read_model import COUNT_CAP, Database, DeadLetterFilter
from outbox_relay.demo import local_postgres
from outbox_relay.sqlfiles import Queries
from tests.console.conftest import console_config, served

SCHEMA = "bench_console"
TOKEN = "console-bench-token-0123456789"
TARGET_MS = 200.0
PENDING = 1_000_000
DEAD = 100_000
DISPATCHED = 200_000
CONFIRM_IDS = 50

# Pending rows, by g mod 10: the topic and its key shape.
PENDING_SHAPES = """
CASE WHEN mod(g, 10) = 0 THEN 'orders.eu' WHEN mod(g, 10) < 4 THEN 'payments'
     WHEN mod(g, 10) < 7 THEN 'events.clicks' ELSE 'audit' END,
CASE WHEN mod(g, 10) = 0 THEN 'customer-42' WHEN mod(g, 10) < 4 THEN 'payment-' || mod(g / 10, 100)
     WHEN mod(g, 10) < 7 THEN 'click-' || g ELSE NULL END
"""
# Dead letters, by g mod 4: the same topics and key shapes, each with its reason.
DEAD_SHAPES = """
CASE mod(g, 4) WHEN 0 THEN 'orders.eu' WHEN 1 THEN 'payments' WHEN 2 THEN 'events.clicks' ELSE 'audit' END,
CASE mod(g, 4) WHEN 0 THEN 'customer-' || mod(g / 4, 1000) WHEN 1 THEN 'payment-' || mod(g / 4, 100)
     WHEN 2 THEN 'dead-click-' || g ELSE NULL END
"""
DEAD_REASONS = """
CASE mod(g, 4) WHEN 0 THEN 'attempts exhausted: broker unavailable (connection refused)'
     WHEN 1 THEN 'permanent: schema rejected by the registry'
     WHEN 2 THEN 'attempts exhausted: timeout after 30 s'
     ELSE 'permanent: message too large (1048576 bytes)' END
"""


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} console: {name}", flush=True)


def _payload() -> sql.Composable:
    return sql.SQL("convert_to(lpad(g::text, {}, 'x'), 'UTF8')").format(sql.Literal(PAYLOAD_BYTES))


def load(dsn: str) -> dict[str, float]:
    """The outbox of the module's docstring, in a fresh schema; seconds each step took."""
    took: dict[str, float] = {}
    env.fresh_schema(dsn, SCHEMA)
    m = sql.Identifier(SCHEMA)
    steps = {
        f"{DISPATCHED:,} dispatched": sql.SQL(
            "INSERT INTO {m}.messages (topic, key, payload, created_at, attempts, dispatched_at, receipt) "
            "SELECT 'payments', 'payment-' || mod(g, 100), {p}, now() - interval '1 day' + g * interval '1 ms', 1, "
            "now() - interval '1 day' + g * interval '1 ms' + interval '20 ms', "
            "jsonb_build_object('broker', 'main', 'partition', mod(g, 12), 'offset', g) "
            "FROM generate_series(1, {n}) AS g"
        ).format(m=m, p=_payload(), n=sql.Literal(DISPATCHED)),
        f"{DEAD:,} dead letters": sql.SQL(
            "INSERT INTO {m}.messages (topic, key, payload, created_at, attempts, last_error, dead_lettered_at, "
            "dead_letter_reason) "
            "SELECT {shapes}, {p}, now() - interval '7 days' + g * interval '6 s', 10, 'the broker said no', "
            "now() - interval '7 days' + g * interval '6 s' + interval '5 min', {reasons} "
            "FROM generate_series(1, {n}) AS g"
        ).format(m=m, shapes=sql.SQL(DEAD_SHAPES), p=_payload(), reasons=sql.SQL(DEAD_REASONS), n=sql.Literal(DEAD)),
        f"{PENDING:,} pending": sql.SQL(
            "INSERT INTO {m}.messages (topic, key, payload, created_at) "
            "SELECT {shapes}, {p}, now() - interval '1 hour' + g * interval '3 ms' "
            "FROM generate_series(1, {n}) AS g"
        ).format(m=m, shapes=sql.SQL(PENDING_SHAPES), p=_payload(), n=sql.Literal(PENDING)),
        "relays and an hour of samples": sql.SQL(
            "INSERT INTO {m}.relays (relay_id, hostname, pid, version, source, in_flight, brokers) "
            "SELECT gen_random_uuid(), 'relay-' || r, 1000 + r, '1.0.0', 'table', 500, "
            """'{{"main": {{"connected": true, "circuit_open": false}}}}'::jsonb """
            "FROM generate_series(1, 3) AS r; "
            "INSERT INTO {m}.relay_samples (relay_id, sampled_at, published, failed, dead_lettered, "
            "oldest_pending_age_s) "
            "SELECT r.relay_id, now() - s * interval '10 s', 9000 + mod(s, 7) * 100, mod(s, 5), mod(s, 11) / 10, "
            "30 + mod(s, 60) FROM {m}.relays AS r, generate_series(0, 359) AS s"
        ).format(m=m),
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, statement in steps.items():
            _step(f"load: {name}")
            started = time.perf_counter()
            conn.execute(statement)
            took[name] = round(time.perf_counter() - started, 1)
        _step("load: VACUUM ANALYZE")
        started = time.perf_counter()
        conn.execute(sql.SQL("VACUUM ANALYZE {}.messages").format(m))
        conn.execute(sql.SQL("VACUUM ANALYZE {}.relay_samples").format(m))
        conn.execute(sql.SQL("VACUUM ANALYZE {}.relays").format(m))
        took["VACUUM ANALYZE"] = round(time.perf_counter() - started, 1)
    return took


class Ids:
    """Rows the pages are asked about, read once after the load."""

    def __init__(self, dsn: str) -> None:
        m = sql.Identifier(SCHEMA)
        with psycopg.connect(dsn) as conn:

            def one(query: str) -> Any:
                row = conn.execute(sql.SQL(query).format(m=m)).fetchone()
                assert row is not None, query
                return row[0]

            self.pending = str(
                one(
                    "SELECT message_id FROM {m}.messages WHERE dispatched_at IS NULL "
                    "AND dead_lettered_at IS NULL AND key = 'payment-7' ORDER BY id DESC LIMIT 1"
                )
            )
            self.dispatched = str(one("SELECT message_id FROM {m}.messages WHERE dispatched_at IS NOT NULL LIMIT 1"))
            self.dead = str(one("SELECT message_id FROM {m}.messages WHERE dead_lettered_at IS NOT NULL LIMIT 1"))
            self.dead_row = int(one("SELECT max(id) FROM {m}.messages WHERE dead_lettered_at IS NOT NULL"))
            # A page 1% of the way from the oldest dead letter (1,000 of 100,000): the
            # keyset's `before` there, as the next-page links give it.
            self.deep_before = int(
                one(
                    f"SELECT id FROM {{m}}.messages WHERE dead_lettered_at IS NOT NULL ORDER BY id "
                    f"LIMIT 1 OFFSET {DEAD // 100}"
                )
            )
            # What an operator selects on the first page: the newest dead letters.
            rows = conn.execute(
                sql.SQL(
                    "SELECT message_id FROM {m}.messages WHERE dead_lettered_at IS NOT NULL ORDER BY id DESC LIMIT %s"
                ).format(m=m),
                (CONFIRM_IDS,),
            ).fetchall()
            self.confirm = [str(r[0]) for r in rows]


def _pages(ids: Ids) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Each page measured: (method, path, request keywords)."""
    return {
        "overview, warm (/console/)": ("GET", "/console/", {}),
        "overview live part (/console/live)": ("GET", "/console/live", {}),
        "dead letters, first page": ("GET", "/console/dead-letters", {}),
        "dead letters, topic glob orders.*": ("GET", "/console/dead-letters", {"params": {"topic": "orders.*"}}),
        "dead letters, reason 'timeout'": ("GET", "/console/dead-letters", {"params": {"reason": "timeout"}}),
        # A filter that matches nothing: its count reads every dead letter (the worst shape).
        "dead letters, reason matching none": ("GET", "/console/dead-letters", {"params": {"reason": "no such"}}),
        "dead letters, key payment-7": ("GET", "/console/dead-letters", {"params": {"key": "payment-7"}}),
        "dead letters, deep page (keyset before)": (
            "GET",
            "/console/dead-letters",
            {"params": {"before": str(ids.deep_before)}},
        ),
        "one dead letter (/dead-letters/{id})": ("GET", f"/console/dead-letters/{ids.dead_row}", {}),
        "jobs": ("GET", "/console/jobs", {}),
        "message lookup, pending": ("GET", "/console/messages", {"params": {"id": ids.pending}}),
        "message lookup, dispatched": ("GET", "/console/messages", {"params": {"id": ids.dispatched}}),
        "message lookup, dead letter": ("GET", "/console/messages", {"params": {"id": ids.dead}}),
        # What the lookup page's script asks after it: every row, the pending ones too.
        "message lookup's rows with the pending ones (/messages/rows)": (
            "GET",
            "/console/messages/rows",
            {"params": {"id": ids.pending}},
        ),
        f"confirm {CONFIRM_IDS} ids, hold (held-behind count)": (
            "POST",
            "/console/dead-letters/confirm",
            {
                "data": {"id": ids.confirm, "action": "purge"},
                "headers": {"Authorization": f"Bearer {TOKEN}"},
            },
        ),
    }


@contextlib.contextmanager
def _console(dsn: str) -> Iterator[tuple[Console, httpx.Client]]:
    config = console_config(dsn, schema=SCHEMA, dead_letter_policy="hold")
    console = Console(config, auth=Authenticator(TOKEN, None))
    console.open()
    try:
        with served(console.asgi) as base, httpx.Client(base_url=base, timeout=60) as client:
            # The pool's first connection, before anything is timed.
            assert client.get("/console/readyz").status_code == 200
            yield console, client
    finally:
        console.close()


def _timed(client: httpx.Client, method: str, path: str, **kw: Any) -> float:
    started = time.perf_counter()
    response = client.request(method, path, **kw)
    took = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
    return took


def _summary(times: list[float]) -> dict[str, Any]:
    return {
        "median_ms": round(statistics.median(times), 1),
        "p95_ms": round(percentile(times, 95), 1),
        "max_ms": round(max(times), 1),
        "n": len(times),
    }


def _first_reading(console: Any) -> Any:
    """The overview's reading, once it exists (the first one counts the whole backlog)."""
    deadline = time.monotonic() + 120
    while (snapshot := console.overview.current()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the overview's first reading took over 120 s")
    return snapshot


def measure_pages(dsn: str, ids: Ids, *, runs: int, requests: int) -> dict[str, Any]:
    """Every page `requests` times a run, `runs` runs (a fresh Console each: its overview
    cold once a run); pages alternated request by request so that the machine's drift
    (this machine is shared) hits all alike."""
    pages = _pages(ids)
    cold = "overview, first request (the first reading runs in the background)"
    times: dict[str, list[float]] = {cold: []}
    times.update({name: [] for name in pages})
    readings: list[float] = []
    for n in range(runs):
        with _console(dsn) as (console, client):
            _step(f"run {n + 1}: overview, cold")
            times[cold].append(_timed(client, "GET", "/console/"))
            first = _first_reading(console)
            readings.append(first.took_s)
            _step(f"run {n + 1}: {len(pages)} pages x {requests}")
            for _ in range(requests):
                for name, (method, path, kw) in pages.items():
                    times[name].append(_timed(client, method, path, **kw))
            # The background refreshes that ran beside the warm reads, if any came due.
            readings.append(_first_reading(console).took_s)
    rows = {name: _summary(t) for name, t in times.items()}
    return {
        "pages": rows,
        "overview_reading_s": {
            "each": [round(r, 3) for r in readings],
            "median": round(statistics.median(readings), 3),
        },
    }


# The index docs/how-to/console.md offers for lookups of pending rows at any backlog (it costs every
# enqueue an entry, so the schema does not build it).
OPTIONAL_INDEX = (
    "CREATE INDEX CONCURRENTLY messages_pending_message_id_idx ON {m}.messages USING hash (message_id) "
    "WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL"
)


def measure_lookups_with_the_optional_index(dsn: str, ids: Ids, *, runs: int, requests: int) -> dict[str, Any]:
    """The three lookups again, with the optional pending message-id index built."""
    m = sql.Identifier(SCHEMA)
    lookups = {name: page for name, page in _pages(ids).items() if name.startswith("message lookup's rows")}
    times: dict[str, list[float]] = {f"{name}, optional index": [] for name in lookups}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            _step("building the optional pending message-id index")
            conn.execute(sql.SQL(OPTIONAL_INDEX).format(m=m))
            conn.execute(sql.SQL("ANALYZE {}.messages").format(m))
        for _ in range(runs):
            with _console(dsn) as (_, client):
                for _ in range(requests):
                    for name, (method, path, kw) in lookups.items():
                        times[f"{name}, optional index"].append(_timed(client, method, path, **kw))
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}.messages_pending_message_id_idx").format(m))
    return {name: _summary(t) for name, t in times.items()}


def _explained(ids: Ids) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each console query with the parameters its page gives it: (query name, params)."""
    cap = {"cap": COUNT_CAP + 1}
    none = {**DeadLetterFilter().params(), **cap}

    def dead(selected: DeadLetterFilter, before: int | None = None) -> dict[str, Any]:
        return {**selected.params(), "before": before, "limit": 51}

    selection = {"message_ids": [uuid.UUID(i) for i in ids.confirm], "topic_regex": None, "cut": None}
    return {
        "console_pending_keyed": ("console_pending_keyed", {}),
        "console_pending_keyless": ("console_pending_keyless", {}),
        "console_dead_by_topic": ("console_dead_by_topic", {}),
        "console_relays": ("console_relays", {}),
        "console_samples": ("console_samples", {}),
        "console_dead_letters (first page)": ("console_dead_letters", dead(DeadLetterFilter())),
        "console_dead_letters (topic orders.*)": ("console_dead_letters", dead(DeadLetterFilter(topic="orders.*"))),
        "console_dead_letters (reason timeout)": ("console_dead_letters", dead(DeadLetterFilter(reason="timeout"))),
        "console_dead_letters (key payment-7)": ("console_dead_letters", dead(DeadLetterFilter(key="payment-7"))),
        "console_dead_letters (deep page)": ("console_dead_letters", dead(DeadLetterFilter(), ids.deep_before)),
        "console_dead_letters_count": ("console_dead_letters_count", none),
        "console_dead_letters_count (topic orders.*)": (
            "console_dead_letters_count",
            {**DeadLetterFilter(topic="orders.*").params(), **cap},
        ),
        "console_dead_letters_count (reason timeout)": (
            "console_dead_letters_count",
            {**DeadLetterFilter(reason="timeout").params(), **cap},
        ),
        "console_dead_letters_count (reason matching none)": (
            "console_dead_letters_count",
            {**DeadLetterFilter(reason="no such").params(), **cap},
        ),
        "console_dead_letters_count (key payment-7)": (
            "console_dead_letters_count",
            {**DeadLetterFilter(key="payment-7").params(), **cap},
        ),
        "console_dead_letter": ("console_dead_letter", {"id": ids.dead_row}),
        "status_replays": ("status_replays", {"limit": 20}),
        "status_backfills": ("status_backfills", {"limit": 20}),
        "message_by_id_settled (dispatched)": ("message_by_id_settled", {"message_id": uuid.UUID(ids.dispatched)}),
        "message_by_id_settled (dead letter)": ("message_by_id_settled", {"message_id": uuid.UUID(ids.dead)}),
        "message_by_id_pending (pending)": ("message_by_id_pending", {"message_id": uuid.UUID(ids.pending)}),
        f"dead_letters_count_selected ({CONFIRM_IDS} ids)": ("dead_letters_count_selected", selection),
        f"dead_letters_held_behind_selected ({CONFIRM_IDS} ids)": ("dead_letters_held_behind_selected", selection),
    }


def explain(dsn: str, ids: Ids) -> dict[str, dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of every console query, in a session set as the
    console's (read_model.Database: sequential scans and JIT off, for each transaction)."""
    queries = Queries(SCHEMA)
    out: dict[str, dict[str, Any]] = {}
    with psycopg.connect(dsn) as conn:
        for label, (name, params) in _explained(ids).items():
            Database._limits(conn)  # SET LOCAL: this query's transaction, as the console's
            statement = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + queries[name]
            plan = "\n".join(str(row[0]) for row in conn.execute(statement, params).fetchall())
            conn.rollback()
            executed = [line for line in plan.splitlines() if "Execution Time" in line]
            out[label] = {
                "query": name,
                "execution_ms": float(executed[-1].split(":")[1].split()[0]) if executed else None,
                "seq_scan_on_messages": "Seq Scan on messages" in plan,
                "plan": plan,
            }
    return out


def run(dsn: str, *, runs: int, requests: int) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    loaded = load(dsn)
    ids = Ids(dsn)
    _step("EXPLAIN (ANALYZE, BUFFERS) of each console query")
    plans = explain(dsn, ids)
    measured = measure_pages(dsn, ids, runs=runs, requests=requests)
    measured["pages"].update(measure_lookups_with_the_optional_index(dsn, ids, runs=runs, requests=requests))
    with psycopg.connect(dsn, autocommit=True) as conn:
        size = conn.execute(
            sql.SQL("SELECT pg_size_pretty(pg_total_relation_size('{}.messages'))").format(sql.Identifier(SCHEMA))
        ).fetchone()
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    return {
        "started": started,
        "machine": env.machine(),
        "commit": _commit(),
        "pending": PENDING,
        "dead_lettered": DEAD,
        "dispatched": DISPATCHED,
        "outbox_size": size[0] if size else None,
        "runs": runs,
        "requests": requests,
        "target_ms": TARGET_MS,
        "load_s": loaded,
        **measured,
        "plans": plans,
    }


def _commit() -> str:
    from benchmarks.wal import code_commit

    return code_commit()


def table(part: dict[str, Any]) -> str:
    """The pages worst first, then what each query's plan took."""
    pages: dict[str, dict[str, Any]] = part["pages"]
    worst_first = sorted(pages.items(), key=lambda item: item[1]["p95_ms"], reverse=True)
    lines = [
        f"| page ({part['pending']:,} pending, {part['dead_lettered']:,} dead letters, {part['dispatched']:,} "
        f"dispatched; {part['runs']} runs x {part['requests']} requests) | median ms | p95 ms | max ms "
        f"| under {part['target_ms']:.0f} ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in worst_first:
        met = "yes" if row["p95_ms"] < part["target_ms"] else "**no**"
        lines.append(f"| {name} | {row['median_ms']} | {row['p95_ms']} | {row['max_ms']} | {met} |")
    reading = part["overview_reading_s"]
    lines += [
        "",
        f"The overview's reading (Snapshot.took_s), median {reading['median']} s: {reading['each']}",
        "",
        "| query (EXPLAIN ANALYZE, as the console's sessions: seqscan, jit off) "
        "| execution ms | Seq Scan on messages |",
        "|---|---|---|",
    ]
    for label, plan in part["plans"].items():
        lines.append(f"| {label} | {plan['execution_ms']} | {'**yes**' if plan['seq_scan_on_messages'] else 'no'} |")
    m = part["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}. Run {part['started']} on {part['commit']}; "
        f"outbox {part['outbox_size']}; load {part['load_s']}.",
    ]
    return "\n".join(lines)


def plans_text(part: dict[str, Any]) -> str:
    return "\n\n".join(f"### {label}\n\n{plan['plan']}" for label, plan in part["plans"].items())


def write(part: dict[str, Any], directory: Path) -> Path:
    """The table and every plan into results/console_pages_<date>.txt."""
    out = directory / f"console_pages_{part['started'][:10]}.txt"
    out.write_text(f"{table(part)}\n\n## Plans\n\n{plans_text(part)}\n", encoding="utf-8")
    return out


def with_cluster(measure: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    dsn = os.environ.get("OUTBOX_RELAY_BENCH_DSN")
    if dsn:
        return measure(dsn)
    with local_postgres.running({"max_connections": "200"}) as cluster:
        return measure(cluster.dsn)


def main() -> None:
    """`python -m benchmarks.console_pages [RUNS] [REQUESTS]`: this part alone, on its own
    PostgreSQL or the one OUTBOX_RELAY_BENCH_DSN names; prints the table and writes the
    results file (not latest.json: `scripts/bench --console-only` does)."""
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    part = with_cluster(lambda dsn: run(dsn, runs=runs, requests=requests))
    print(table(part))
    print(f"\n(results: {write(part, Path('benchmarks/results'))})")


if __name__ == "__main__":
    main()
