"""The `outbox-relay` command line: the only place that turns errors into exit codes.

Exit codes: 0 all well; 1 a runtime failure (database or broker unreachable in
`check`, a failed install); 2 a usage or configuration error. User errors print one
line, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import click
import psycopg
import structlog

from outbox_relay import config as config_module
from outbox_relay import sqlfiles
from outbox_relay.connections import connect_sync
from outbox_relay.durations import parse_duration
from outbox_relay.engine.routing import Router
from outbox_relay.errors import OutboxRelayError, SchemaError
from outbox_relay.observability.logging_setup import configure as configure_logging
from outbox_relay.operations import backfill as backfill_module
from outbox_relay.operations import dead_letters, schema_manager, status
from outbox_relay.operations import replay as replay_module

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="OUTBOX_RELAY_CONFIG", default="relay.yaml", show_default=True,
    help="YAML config file (env: OUTBOX_RELAY_CONFIG).",
)
DSN_OPTION = click.option(
    "--dsn", envvar="DATABASE_URL", required=True,
    help="PostgreSQL connection string (env: DATABASE_URL; prefer the env for passwords).",
)
SCHEMA_OPTION = click.option(
    "--schema", "schema_name", default=sqlfiles.DEFAULT_SCHEMA, show_default=True,
    help="Schema that holds the outbox.",
)


def one_line_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OutboxRelayError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except psycopg.Error as exc:
            click.echo(f"error: database: {str(exc).strip().splitlines()[0]}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return connect_sync(dsn, application_name="outbox-relay-cli")


def _load(config_path: Path) -> config_module.Config:
    return config_module.load(config_path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="outbox-relay")
def main() -> None:
    """Transactional outbox relay for PostgreSQL."""


# -- schema -----------------------------------------------------------------------------

@main.group()
def schema() -> None:
    """Install the outbox schema, or print its SQL."""


@schema.command("install")
@DSN_OPTION
@SCHEMA_OPTION
@one_line_errors
def schema_install(dsn: str, schema_name: str) -> None:
    """Create or upgrade the outbox schema (idempotent, safe to run concurrently)."""
    sqlfiles.validate_schema_name(schema_name)
    with _connect(dsn) as conn:
        result = schema_manager.install(conn, schema_name)
    if result.previous_version is None:
        click.echo(f"installed outbox schema {schema_name!r} at version {result.version}")
    elif result.changed:
        click.echo(f"upgraded outbox schema {schema_name!r} from version "
                   f"{result.previous_version} to {result.version}")
    else:
        click.echo(f"outbox schema {schema_name!r} is already at version {result.version}")


@schema.command("sql")
@SCHEMA_OPTION
@click.option("--relay-role", help="Also print GRANTs for the relay's least-privilege role.")
@click.option("--producer-role", help="Also print GRANTs for an application role that only enqueues.")
@click.option("--grants-only", is_flag=True, help="Print only the GRANTs.")
@one_line_errors
def schema_sql(schema_name: str, relay_role: str | None, producer_role: str | None, grants_only: bool) -> None:
    """Print the DDL, for teams that apply DDL with their own migration tool."""
    parts: list[str] = []
    if not grants_only:
        parts.append(sqlfiles.ddl(schema_name).as_string())
        parts.append(sqlfiles.record_version(schema_name).as_string() + ";\n")
    for kind, role in (("relay", relay_role), ("producer", producer_role)):
        if role:
            parts.append(sqlfiles.grants(kind, schema_name, role).as_string())
    click.echo("\n".join(parts).rstrip())


@schema.command("notify")
@click.argument("state", type=click.Choice(["on", "off"]))
@DSN_OPTION
@SCHEMA_OPTION
@one_line_errors
def schema_notify(state: str, dsn: str, schema_name: str) -> None:
    """Turn the NOTIFY trigger on or off (off: the relay's poll finds new rows alone)."""
    with _connect(dsn) as conn:
        schema_manager.set_notify(conn, schema_name, state == "on")
    click.echo(f"NOTIFY trigger {state} for schema {schema_name!r}")


# -- run / check / status -------------------------------------------------------------

@main.command()
@CONFIG_OPTION
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@one_line_errors
def run(config_path: Path, log_level: str) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    # A SIGTERM before the event loop's handler is in place (while loading the config)
    # is still a clean stop: nothing has been claimed yet.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
    from outbox_relay.assembly import build_relay

    cfg = _load(config_path)
    configure_logging(log_level)
    relay = build_relay(cfg)

    async def main_async() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)
        await relay.run()

    asyncio.run(main_async())


@main.command()
@CONFIG_OPTION
@one_line_errors
def check(config_path: Path) -> None:
    """Validate the config, then connect to the database and to every broker."""
    from outbox_relay.operations.check import run_checks

    cfg = _load(config_path)
    ok = asyncio.run(run_checks(cfg, click.echo))
    sys.exit(0 if ok else 1)


@main.command("status")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def status_command(config_path: Path, as_json: bool) -> None:
    """Pending, in flight, dead-lettered and oldest pending age, per topic."""
    cfg = _load(config_path)
    with _connect(cfg.database.dsn.get_secret_value()) as conn:
        _require_schema(conn, cfg.database.schema_name)
        current = status.read(conn, cfg.database.schema_name)
    if as_json:
        click.echo(json.dumps(current.as_dict(), indent=2))
    else:
        click.echo(status.render(current))


def _require_schema(conn: psycopg.Connection[Any], schema_name: str) -> None:
    problem = schema_manager.missing_or_old(schema_manager.version(conn, schema_name), schema_name)
    if problem:
        raise SchemaError(problem)


# -- dead letters ------------------------------------------------------------------------

@main.group("dead-letters")
def dead_letters_group() -> None:
    """List, requeue and purge dead-lettered messages."""


@dead_letters_group.command("list")
@CONFIG_OPTION
@click.option("--topic", help="Only topics matching this glob.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def dead_letters_list(config_path: Path, topic: str | None, limit: int, as_json: bool) -> None:
    """Dead letters, oldest first, with their reason."""
    cfg = _load(config_path)
    with _connect(cfg.database.dsn.get_secret_value()) as conn:
        _require_schema(conn, cfg.database.schema_name)
        found = dead_letters.list_dead(conn, cfg.database.schema_name, topic=topic, limit=limit)
    if as_json:
        click.echo(json.dumps([
            {"message_id": str(d.message_id), "topic": d.topic, "key": d.key, "attempts": d.attempts,
             "created_at": d.created_at.isoformat(), "dead_lettered_at": d.dead_lettered_at.isoformat(),
             "reason": d.reason} for d in found
        ], indent=2))
        return
    if not found:
        click.echo("no dead letters")
    for d in found:
        click.echo(f"{d.message_id}  {d.topic}  key={d.key}  attempts={d.attempts}  "
                   f"{d.dead_lettered_at.isoformat(timespec='seconds')}  {d.reason}")


@dead_letters_group.command("requeue")
@CONFIG_OPTION
@click.option("--id", "ids", multiple=True, help="Message id to requeue (repeatable).")
@click.option("--topic", help="Requeue dead letters whose topic matches this glob.")
@click.option("--all", "everything", is_flag=True, help="Requeue every dead letter.")
@one_line_errors
def dead_letters_requeue(config_path: Path, ids: tuple[str, ...], topic: str | None, everything: bool) -> None:
    """Put dead letters back to pending with a fresh attempt budget."""
    if not (ids or topic or everything):
        raise click.UsageError("say which: --id ID (repeatable), --topic GLOB or --all")
    try:
        parsed = [UUID(i) for i in ids]
    except ValueError:
        raise click.BadParameter("not a UUID", param_hint="--id") from None
    cfg = _load(config_path)
    with _connect(cfg.database.dsn.get_secret_value()) as conn:
        _require_schema(conn, cfg.database.schema_name)
        done = dead_letters.requeue(conn, cfg.database.schema_name, message_ids=parsed, topic=topic,
                                    everything=everything)
    click.echo(f"requeued {len(done)} message(s)")
    missing = set(parsed) - set(done)
    if missing:
        click.echo(f"not dead-lettered (or unknown): {', '.join(sorted(map(str, missing)))}", err=True)
        sys.exit(1)


@dead_letters_group.command("purge")
@CONFIG_OPTION
@click.option("--older-than", "older_than", required=True,
              help="Delete dead letters dead-lettered longer ago than this (e.g. 7d, 12h, 30m).")
@click.option("--topic", help="Only topics matching this glob.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@one_line_errors
def dead_letters_purge(config_path: Path, older_than: str, topic: str | None, yes: bool) -> None:
    """Delete old dead letters for good (after listing or requeueing what you need)."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    cfg = _load(config_path)
    with _connect(cfg.database.dsn.get_secret_value()) as conn:
        _require_schema(conn, cfg.database.schema_name)
        cut = dead_letters.cut_for(conn, cfg.database.schema_name, seconds)
        count = dead_letters.count_older(conn, cfg.database.schema_name, cut=cut, topic=topic)
        if count == 0:
            click.echo("no dead letters that old")
            return
        # Under hold, a dead letter keeps its key's later messages back; deleting it lets
        # them go (as a requeue would, but without the dead one): say so before asking.
        released = ""
        if cfg.relay.dead_letter_policy == "hold":
            held = dead_letters.held_behind_older(conn, cfg.database.schema_name, cut=cut, topic=topic)
            if held:
                released = f" (dead_letter_policy is hold: {held} message(s) held behind them will be published)"
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(f"{count} dead letter(s) would be deleted{released}; pass --yes to confirm")
            click.confirm(f"Delete {count} dead letter(s) for good{released}?", abort=True)
        deleted = dead_letters.purge(conn, cfg.database.schema_name, cut=cut, topic=topic)
    click.echo(f"deleted {deleted} dead letter(s){released}")


# -- replay --------------------------------------------------------------------------------

@main.command()
@CONFIG_OPTION
@click.option("--topic", help="Only topics matching this glob.")
@click.option("--key", help="Only messages with this key.")
@click.option("--since", help="Enqueued at or after this time (ISO 8601) or this long ago (2h).")
@click.option("--until", help="Enqueued before this time (ISO 8601) or this long ago.")
@click.option("--message-id", "message_ids", multiple=True, help="Only this message (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Every dispatched message still kept (no filter).")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed, and change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--again", is_flag=True, help="Replay a selection that was replayed before.")
@click.option("--resume", "resume_id", type=int, help="Finish replay N, stopped before it was done.")
@click.option("--chunk", default=replay_module.DEFAULT_CHUNK, show_default=True, type=click.IntRange(1, 100_000),
              help="Rows copied per transaction.")
@click.option("--rate", type=click.FloatRange(min=0.001), help="At most this many messages per second.")
@one_line_errors
def replay(config_path: Path, topic: str | None, key: str | None, since: str | None, until: str | None,
           message_ids: tuple[str, ...], everything: bool, dry_run: bool, yes: bool, again: bool,
           resume_id: int | None, chunk: int, rate: float | None) -> None:
    """Publish dispatched messages again (those retention still keeps).

    Copies go to the tail of the outbox with their message id and the header
    outbox-replay-id; the relay publishes them like any message, in per-key order.
    """
    selection = replay_module.Selection(
        topic=topic, key=key,
        since=replay_module.parse_time(since, "--since") if since else None,
        until=replay_module.parse_time(until, "--until") if until else None,
        message_ids=replay_module.parse_message_ids(message_ids),
    )
    if resume_id is not None and (not selection.empty or everything or again):
        raise click.UsageError("--resume takes no filter, --all or --again: the replay keeps the selection "
                               "it was started with")
    if resume_id is None and selection.empty and not everything:
        raise click.UsageError("choose what to replay (--topic, --key, --since, --until, --message-id) or pass --all")
    cfg = _load(config_path)
    schema_name = cfg.database.schema_name
    with _connect(cfg.database.dsn.get_secret_value()) as conn:
        _require_schema(conn, schema_name)
        if resume_id is not None:
            recorded = replay_module.get(conn, schema_name, resume_id)
            if recorded.finished:
                click.echo(f"replay #{resume_id} is already done: {recorded.copied} message(s) copied")
                return
            replay_id, total = resume_id, recorded.total
            click.echo(f"replay #{replay_id} stopped at {recorded.copied} of {total} copied")
            _confirm(dry_run, yes, f"replay #{replay_id} would be finished", f"Finish replay #{replay_id}?")
            if dry_run:
                return
            click.echo(f"resuming replay #{replay_id}")
        else:
            chosen = replay_module.plan(conn, schema_name, selection)
            listing = ", ".join(f"{name}: {n}" for name, n in chosen.by_topic.items())
            click.echo(f"{chosen.total} message(s) to replay" + (f" ({listing})" if listing else ""))
            if chosen.previous is not None and not again:
                previous_id, when, finished = chosen.previous
                hint = "" if finished else f"; it did not finish: --resume {previous_id} completes it"
                raise click.UsageError(f"this selection was replayed before (#{previous_id} at "
                                       f"{when:%Y-%m-%d %H:%M:%S %Z}){hint}; pass --again to replay it once more")
            # A copy whose topic no route takes would be dead-lettered, and under
            # dead_letter_policy hold would then stop its key's live messages.
            router = Router(cfg.routes)
            unrouted = [name for name in chosen.by_topic if router.resolve(name) is None]
            if unrouted:
                raise click.UsageError(f"no route in {config_path} takes topic {unrouted[0]!r}: its copies would be "
                                       "dead-lettered; add a route or narrow --topic")
            if chosen.total == 0:
                click.echo("nothing to replay")
                return
            _confirm(dry_run, yes, f"{chosen.total} message(s) would be replayed",
                     f"Replay {chosen.total} message(s)?")
            if dry_run:
                return
            replay_id, total = replay_module.begin(conn, schema_name, chosen), chosen.total
            click.echo(f"replay #{replay_id} started")
        copied = _run_with_progress("replay", replay_id, total,
                                    lambda report: replay_module.copy(conn, schema_name, replay_id, chunk=chunk,
                                                                      rate=rate, progress=report))
    # Rows that retention deleted before their chunk was copied are not there to copy.
    short = f" (of {total} counted: {total - copied} deleted meanwhile by retention)" if copied < total else ""
    click.echo(f"replay #{replay_id} done: {copied} message(s) copied to the outbox{short}; "
               "the relay publishes them")


def _confirm(dry_run: bool, yes: bool, would: str, question: str) -> None:
    """Nothing to ask on a dry run; otherwise --yes, or a yes at a terminal."""
    if dry_run or yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{would}; pass --yes to confirm")
    click.confirm(question, abort=True)


# -- backfill ------------------------------------------------------------------------------

def _rate(value: str | None) -> float | None:
    if value is None:
        return None
    number = value[:-2] if value.endswith("/s") else value
    try:
        rate = float(number)
    except ValueError:
        rate = 0.0
    if not rate > 0:
        raise click.BadParameter(f"{value!r}: give messages per second, e.g. 500 or 500/s", param_hint="--rate")
    return rate


@main.command()
@CONFIG_OPTION
@click.option("--table", help="The table to snapshot: NAME (on the search path) or SCHEMA.NAME.")
@click.option("--topic", help="The topic of the messages.")
@click.option("--key-column", help="The column whose value (as text) is each message's key (default: no key).")
@click.option("--where", "filters", multiple=True,
              help="Only rows where COLUMN=VALUE (also >=, <=, >, <, !=); repeatable, all must hold.")
@click.option("--chunk", default=backfill_module.DEFAULT_CHUNK, show_default=True, type=click.IntRange(1, 100_000),
              help="Rows per transaction.")
@click.option("--rate", help="At most this many messages per second (500 or 500/s).")
@click.option("--dry-run", is_flag=True, help="Count the rows, and change nothing.")
@click.option("--again", is_flag=True, help="Snapshot a source that was backfilled before.")
@click.option("--resume", "resume_id", type=int, help="Finish backfill N, stopped before it was done.")
@click.option("--dsn", envvar="OUTBOX_RELAY_BACKFILL_DSN",
              help="Connect with this DSN instead of the config's (a role that may read the table; "
                   "env: OUTBOX_RELAY_BACKFILL_DSN).")
@one_line_errors
def backfill(config_path: Path, table: str | None, topic: str | None, key_column: str | None,
             filters: tuple[str, ...], chunk: int, rate: str | None, dry_run: bool, again: bool,
             resume_id: int | None, dsn: str | None) -> None:
    """Snapshot an existing table into the outbox: one message per row (the row as JSON).

    Keyset pagination by the primary key, one short transaction per chunk, resumable
    after a crash (--resume N) with nothing missing and nothing twice.
    """
    per_second = _rate(rate)
    cfg = _load(config_path)
    schema_name = cfg.database.schema_name
    if resume_id is None:
        if not table or not topic:
            raise click.UsageError("--table and --topic are required (or --resume N)")
        source = backfill_module.Source(table, topic, key_column,
                                        tuple(backfill_module.Filter.parse(f) for f in filters))
        # Its messages would be dead-lettered, and under dead_letter_policy hold would
        # then stop their keys' live messages.
        if Router(cfg.routes).resolve(topic) is None:
            raise click.UsageError(f"no route in {config_path} takes topic {topic!r}: every message would be "
                                   "dead-lettered; add a route or choose another --topic")
    elif table or topic or key_column or filters:
        raise click.UsageError("--resume takes no --table, --topic, --key-column or --where: "
                               "the backfill keeps what it was started with")
    with _connect(dsn or cfg.database.dsn.get_secret_value()) as conn:
        _require_schema(conn, schema_name)
        if resume_id is not None:
            recorded = backfill_module.get(conn, schema_name, resume_id)
            if recorded.finished:
                click.echo(f"backfill #{resume_id} is already done: {recorded.copied} message(s)")
                return
            backfill_id, total = resume_id, recorded.total
            click.echo(f"resuming backfill #{backfill_id}: {recorded.copied} of {total} copied so far")
        else:
            found = backfill_module.resolve(conn, source)
            total = backfill_module.count(conn, found, source)
            click.echo(f"{total} row(s) of {found.schema}.{found.name} to enqueue on {source.topic}")
            earlier = backfill_module.previous(conn, schema_name, source)
            if earlier is not None and not again and not dry_run:
                earlier_id, _, finished = earlier
                hint = "" if finished else f"; it did not finish: --resume {earlier_id} completes it"
                raise click.UsageError(f"this table was backfilled the same way before (#{earlier_id}){hint}; "
                                       "pass --again to snapshot it once more")
            if dry_run or total == 0:
                return
            backfill_id = backfill_module.begin(conn, schema_name, source, total)
            click.echo(f"backfill #{backfill_id} started")
        done = _run_with_progress("backfill", backfill_id, total,
                                  lambda report: backfill_module.copy(
                                      conn, schema_name, backfill_id, chunk=chunk, rate=per_second, progress=report,
                                      max_payload_bytes=cfg.relay.max_payload_bytes))
    click.echo(f"backfill #{backfill_id} done: {done} message(s) in the outbox; the relay publishes them")


def _run_with_progress(what: str, number: int, total: int, work: Callable[[Callable[[int], None]], int]) -> int:
    """A progress bar on a terminal; otherwise a JSON log line at most every 5 s."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=f"{what} #{number}", file=sys.stderr) as bar:
            shown = 0

            def advance(copied: int) -> None:
                nonlocal shown
                bar.update(copied - shown)
                shown = copied

            return work(advance)
    configure_logging("info")
    log = structlog.get_logger(f"outbox_relay.{what}")
    started = last = time.monotonic()

    def report(copied: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 5 or copied >= total:
            last = now
            log.info(f"{what}_progress", **{f"{what}_id": number}, copied=copied, total=total,
                     rows_per_s=round(copied / max(now - started, 1e-6)))

    return work(report)


# -- demo ----------------------------------------------------------------------------------

@main.command()
@click.option("--orders", default=200, show_default=True, type=click.IntRange(1, 1_000_000),
              help="How many orders the sample application writes.")
@click.option("--rollback-every", default=5, show_default=True, type=click.IntRange(2, 1000),
              help="Every Nth order's transaction is rolled back.")
@click.option("--dsn", envvar="OUTBOX_DEMO_DSN", default=None,
              help="Use this database instead of an embedded one (env: OUTBOX_DEMO_DSN).")
@one_line_errors
def demo(orders: int, rollback_every: int, dsn: str | None) -> None:
    """Run a sample application and the relay on an embedded PostgreSQL."""
    from outbox_relay.demo.run import run_demo

    configure_logging("warning")
    sys.exit(run_demo(orders=orders, rollback_every=rollback_every, dsn=dsn))


# The consumer inbox lives in its own package (outbox_relay/inbox/), its commands too.
from outbox_relay.inbox.cli import inbox_group  # noqa: E402

main.add_command(inbox_group)
