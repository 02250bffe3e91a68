"""`outbox-relay backfill`: snapshot an existing table into the outbox, in resumable chunks."""

from __future__ import annotations

import sys
from typing import Any

import click

from outbox_relay.cli.common import (
    RATE_OPTION,
    Target,
    chunk_option,
    confirm,
    confirm_finish,
    database_options,
    require_schema,
    run_with_progress,
)
from outbox_relay.cli.output import JSON_OPTION, NOT_FOUND, notes, one_line_errors, print_json
from outbox_relay.engine.routing import Router
from outbox_relay.errors import CommandLineError
from outbox_relay.operations import backfill as backfill_module
from outbox_relay.operations.status import printable


@click.command()
@database_options(needs_config="its routes must take the topic", dsn_env="OUTBOX_RELAY_BACKFILL_DSN")
@click.option("--table", help="The table to snapshot: NAME (on the search path) or SCHEMA.NAME.")
@click.option("--topic", help="The topic of the messages.")
@click.option("--key-column", help="The column whose value (as text) is each message's key (default: no key).")
@click.option(
    "--where",
    "filters",
    multiple=True,
    help="Only rows where COLUMN=VALUE (also >=, <=, >, <, !=); repeatable, all must hold.",
)
@chunk_option(backfill_module.DEFAULT_CHUNK)
@RATE_OPTION
@click.option("--dry-run", is_flag=True, help="Count the rows, and change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--again", is_flag=True, help="Snapshot a source that was backfilled before.")
@click.option("--resume", "resume_id", type=int, help="Finish backfill N, stopped before it was done.")
@JSON_OPTION
@one_line_errors
def backfill(
    target: Target,
    table: str | None,
    topic: str | None,
    key_column: str | None,
    filters: tuple[str, ...],
    chunk: int,
    rate: float | None,
    dry_run: bool,
    yes: bool,
    again: bool,
    resume_id: int | None,
    as_json: bool,
) -> None:
    """Snapshot an existing table into the outbox: one message per row (the row as JSON).

    Keyset pagination by the primary key, one short transaction per chunk, resumable
    after a crash (--resume N) with nothing missing and nothing twice. Says how many
    rows and asks first (--yes: do not ask). --dsn (or OUTBOX_RELAY_BACKFILL_DSN):
    connect as a role that may read the table instead of the config's. Exit 1 when
    no row matches.
    """
    say = notes(as_json)
    cfg = target.full_config()
    schema_name = target.schema
    if resume_id is None:
        if not table or not topic:
            raise CommandLineError("--table and --topic are required (or --resume N)")
        source = backfill_module.Source(
            table, topic, key_column, tuple(backfill_module.Filter.parse(f) for f in filters)
        )
        # Its messages would be dead-lettered, and under dead_letter_policy hold would
        # then stop their keys' live messages.
        if Router(cfg.routes).resolve(topic) is None:
            raise CommandLineError(
                f"no route in {cfg.source} takes topic {topic!r}: every message would be "
                "dead-lettered; add a route or choose another --topic"
            )
    elif table or topic or key_column or filters:
        raise CommandLineError(
            "--resume takes no --table, --topic, --key-column or --where: the backfill keeps what it was started with"
        )
    answer: dict[str, Any] = {"backfill_id": resume_id, "dry_run": dry_run}
    with target.connect() as conn:
        require_schema(conn, schema_name)
        if resume_id is not None:
            recorded = backfill_module.get(conn, schema_name, resume_id)
            found = backfill_module.resolve(conn, recorded.source)
            table = f"{found.schema}.{found.name}"
            answer.update(table=table, topic=recorded.source.topic, total=recorded.total, copied=recorded.copied)
            if recorded.finished:
                say(f"backfill #{resume_id} is already done: {recorded.copied} message(s)")
                _answer(as_json, {**answer, "done": True})
                return
            backfill_id, total = resume_id, recorded.total
            say(
                f"backfill #{backfill_id} of {printable(table)} to {printable(recorded.source.topic)} "
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
                err=as_json,
            )
            if dry_run:
                _answer(as_json, {**answer, "done": False})
                return
            say(f"resuming backfill #{backfill_id}: {recorded.copied} of {total} copied so far")
        else:
            found = backfill_module.resolve(conn, source)
            source = source.qualified(found)
            table = f"{found.schema}.{found.name}"
            total = backfill_module.count(conn, found, source)
            say(f"{total} row(s) of {table} to enqueue on {source.topic}")
            answer.update(table=table, topic=source.topic, total=total, copied=0)
            earlier = backfill_module.previous(conn, schema_name, source, found)
            if earlier is not None and not again:
                earlier_id, _, finished = earlier
                hint = "" if finished else f"; it did not finish: --resume {earlier_id} completes it"
                said = f"this table was backfilled the same way before (#{earlier_id}){hint}"
                if not dry_run:  # a dry run says so and never refuses
                    raise CommandLineError(f"{said}; pass --again to snapshot it once more")
                say(f"{said}; a backfill of it needs --again")
            if total == 0:
                say("nothing to backfill")
                _answer(as_json, {**answer, "done": False})
                sys.exit(NOT_FOUND)
            confirm(
                dry_run,
                yes,
                f"{total} row(s) would be enqueued",
                f"Enqueue {total} message(s) from {table} on {source.topic}?",
                err=as_json,
            )
            if dry_run:
                _answer(as_json, {**answer, "done": False})
                return
            backfill_id = backfill_module.begin(conn, schema_name, source, total)
            answer["backfill_id"] = backfill_id
            say(f"backfill #{backfill_id} started")
        done = run_with_progress(
            "backfill",
            backfill_id,
            total,
            lambda report: backfill_module.copy(
                conn,
                schema_name,
                backfill_id,
                chunk=chunk,
                rate=rate,
                progress=report,
                max_payload_bytes=cfg.relay.max_payload_bytes,
            ),
        )
    say(f"backfill #{backfill_id} done: {done} message(s) in the outbox; the relay publishes them")
    _answer(as_json, {**answer, "copied": done, "done": True})


def _answer(as_json: bool, answer: dict[str, Any]) -> None:
    """--json: what the backfill did (or, on a dry run, would do), as one document."""
    if as_json:
        print_json(answer)
