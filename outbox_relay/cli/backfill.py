"""`outbox-relay backfill`: snapshot an existing table into the outbox, in resumable chunks."""

from __future__ import annotations

from pathlib import Path

import click

from outbox_relay.cli.common import (
    CONFIG_OPTION,
    confirm,
    confirm_finish,
    connect,
    load,
    one_line_errors,
    require_schema,
    run_with_progress,
)
from outbox_relay.engine.routing import Router
from outbox_relay.operations import backfill as backfill_module


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


@click.command()
@CONFIG_OPTION
@click.option("--table", help="The table to snapshot: NAME (on the search path) or SCHEMA.NAME.")
@click.option("--topic", help="The topic of the messages.")
@click.option("--key-column", help="The column whose value (as text) is each message's key (default: no key).")
@click.option(
    "--where",
    "filters",
    multiple=True,
    help="Only rows where COLUMN=VALUE (also >=, <=, >, <, !=); repeatable, all must hold.",
)
@click.option(
    "--chunk",
    default=backfill_module.DEFAULT_CHUNK,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Rows per transaction.",
)
@click.option("--rate", help="At most this many messages per second (500 or 500/s).")
@click.option("--dry-run", is_flag=True, help="Count the rows, and change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--again", is_flag=True, help="Snapshot a source that was backfilled before.")
@click.option("--resume", "resume_id", type=int, help="Finish backfill N, stopped before it was done.")
@click.option(
    "--dsn",
    envvar="OUTBOX_RELAY_BACKFILL_DSN",
    help="Connect with this DSN instead of the config's (a role that may read the table; "
    "env: OUTBOX_RELAY_BACKFILL_DSN).",
)
@one_line_errors
def backfill(
    config_path: Path,
    table: str | None,
    topic: str | None,
    key_column: str | None,
    filters: tuple[str, ...],
    chunk: int,
    rate: str | None,
    dry_run: bool,
    yes: bool,
    again: bool,
    resume_id: int | None,
    dsn: str | None,
) -> None:
    """Snapshot an existing table into the outbox: one message per row (the row as JSON).

    Keyset pagination by the primary key, one short transaction per chunk, resumable
    after a crash (--resume N) with nothing missing and nothing twice. Says how many
    rows and asks first (--yes: do not ask).
    """
    per_second = _rate(rate)
    cfg = load(config_path)
    schema_name = cfg.database.schema_name
    if resume_id is None:
        if not table or not topic:
            raise click.UsageError("--table and --topic are required (or --resume N)")
        source = backfill_module.Source(
            table, topic, key_column, tuple(backfill_module.Filter.parse(f) for f in filters)
        )
        # Its messages would be dead-lettered, and under dead_letter_policy hold would
        # then stop their keys' live messages.
        if Router(cfg.routes).resolve(topic) is None:
            raise click.UsageError(
                f"no route in {config_path} takes topic {topic!r}: every message would be "
                "dead-lettered; add a route or choose another --topic"
            )
    elif table or topic or key_column or filters:
        raise click.UsageError(
            "--resume takes no --table, --topic, --key-column or --where: the backfill keeps what it was started with"
        )
    with connect(dsn or cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, schema_name)
        if resume_id is not None:
            recorded = backfill_module.get(conn, schema_name, resume_id)
            if recorded.finished:
                click.echo(f"backfill #{resume_id} is already done: {recorded.copied} message(s)")
                return
            backfill_id, total = resume_id, recorded.total
            found = backfill_module.resolve(conn, recorded.source)
            table = f"{found.schema}.{found.name}"
            click.echo(
                f"backfill #{backfill_id} of {table} to {recorded.source.topic} "
                f"stopped at {recorded.copied} of {total} enqueued"
            )
            confirm_finish(
                "backfill",
                backfill_id,
                created_by=recorded.created_by,
                own=recorded.own,
                acts=f"copy {table} to topic {recorded.source.topic}",
                dry_run=dry_run,
                yes=yes,
            )
            if dry_run:
                return
            click.echo(f"resuming backfill #{backfill_id}: {recorded.copied} of {total} copied so far")
        else:
            found = backfill_module.resolve(conn, source)
            source = source.qualified(found)
            table = f"{found.schema}.{found.name}"
            total = backfill_module.count(conn, found, source)
            click.echo(f"{total} row(s) of {table} to enqueue on {source.topic}")
            earlier = backfill_module.previous(conn, schema_name, source, found)
            if earlier is not None and not again:
                earlier_id, _, finished = earlier
                hint = "" if finished else f"; it did not finish: --resume {earlier_id} completes it"
                said = f"this table was backfilled the same way before (#{earlier_id}){hint}"
                if not dry_run:  # a dry run says so and never refuses
                    raise click.UsageError(f"{said}; pass --again to snapshot it once more")
                click.echo(f"{said}; a backfill of it needs --again")
            if total == 0:
                return
            confirm(
                dry_run,
                yes,
                f"{total} row(s) would be enqueued",
                f"Enqueue {total} message(s) from {table} on {source.topic}?",
            )
            if dry_run:
                return
            backfill_id = backfill_module.begin(conn, schema_name, source, total)
            click.echo(f"backfill #{backfill_id} started")
        done = run_with_progress(
            "backfill",
            backfill_id,
            total,
            lambda report: backfill_module.copy(
                conn,
                schema_name,
                backfill_id,
                chunk=chunk,
                rate=per_second,
                progress=report,
                max_payload_bytes=cfg.relay.max_payload_bytes,
            ),
        )
    click.echo(f"backfill #{backfill_id} done: {done} message(s) in the outbox; the relay publishes them")
