"""`outbox-relay replay`: publish dispatched messages again, recorded and resumable."""

from __future__ import annotations

from datetime import datetime
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
from outbox_relay.operations import replay as replay_module
from outbox_relay.validation import MAX_KEY_BYTES

# Rows written before schema version 6 may hold a key over today's limit (1,024
# characters were allowed); a copy is a new message, and no new message takes such a key.
_UNFIT = f"a key over {MAX_KEY_BYTES} bytes, more than a new message may have since schema version 6"


@click.command()
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
@click.option(
    "--chunk",
    default=replay_module.DEFAULT_CHUNK,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Rows copied per transaction.",
)
@click.option("--rate", type=click.FloatRange(min=0.001), help="At most this many messages per second.")
@one_line_errors
def replay(
    config_path: Path,
    topic: str | None,
    key: str | None,
    since: str | None,
    until: str | None,
    message_ids: tuple[str, ...],
    everything: bool,
    dry_run: bool,
    yes: bool,
    again: bool,
    resume_id: int | None,
    chunk: int,
    rate: float | None,
) -> None:
    """Publish dispatched messages again (those retention still keeps).

    Copies go to the tail of the outbox with their message id and the header
    outbox-replay-id; the relay publishes them like any message, in per-key order.
    In WAL mode only messages parked in the table are rows: a selection that reaches
    into that time says so, and is refused when the table has none of it.
    """
    selection = replay_module.Selection(
        topic=topic,
        key=key,
        since=replay_module.parse_time(since, "--since") if since else None,
        until=replay_module.parse_time(until, "--until") if until else None,
        message_ids=replay_module.parse_message_ids(message_ids),
    )
    if resume_id is not None and (not selection.empty or everything or again):
        raise click.UsageError(
            "--resume takes no filter, --all or --again: the replay keeps the selection it was started with"
        )
    if resume_id is None and selection.empty and not everything:
        raise click.UsageError("choose what to replay (--topic, --key, --since, --until, --message-id) or pass --all")
    cfg = load(config_path)
    schema_name = cfg.database.schema_name
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, schema_name)
        if resume_id is not None:
            recorded = replay_module.get(conn, schema_name, resume_id)
            if recorded.finished:
                click.echo(f"replay #{resume_id} is already done: {recorded.copied} message(s) copied")
                return
            replay_id, total = resume_id, recorded.total
            click.echo(f"replay #{replay_id} stopped at {recorded.copied} of {total} copied")
            confirm_finish(
                "replay",
                replay_id,
                created_by=recorded.created_by,
                own=recorded.own,
                acts=f"copy {replay_module.describe(recorded.selection)} ({total} message(s))",
                dry_run=dry_run,
                yes=yes,
            )
            if dry_run:
                return
            click.echo(f"resuming replay #{replay_id}")
        else:
            chosen = replay_module.plan(conn, schema_name, selection)
            listing = ", ".join(f"{name}: {n}" for name, n in chosen.by_topic.items())
            click.echo(f"{chosen.total} message(s) to replay" + (f" ({listing})" if listing else ""))
            if chosen.unsettled:
                click.echo(
                    f"note: {chosen.unsettled} transaction(s) open when it counted were still open 10s later; "
                    "a message one of them marked dispatched before the count is copied too"
                )
            if chosen.unfit:
                click.echo(f"{chosen.unfit} of them will be skipped: {_UNFIT}")
            if chosen.wal is not None:
                # The WAL source: what went out straight from the WAL is not in the table.
                if chosen.to_copy == 0 and not dry_run:
                    raise replay_module.NotInTable(f"nothing to replay: {chosen.wal.note()}")
                click.echo(chosen.wal.note())
            if chosen.previous is not None and not again:
                said = _replayed_before(chosen, {"--since": since, "--until": until})
                if not dry_run:  # a dry run says so and never refuses
                    raise click.UsageError(f"{said}; pass --again to replay it once more")
                click.echo(f"{said}; a replay of it needs --again")
            # A copy whose topic no route takes would be dead-lettered, and under
            # dead_letter_policy hold would then stop its key's live messages.
            router = Router(cfg.routes)
            unrouted = [name for name in chosen.by_topic if router.resolve(name) is None]
            if unrouted:
                raise click.UsageError(
                    f"no route in {config_path} takes topic {unrouted[0]!r}: its copies would be "
                    "dead-lettered; add a route or narrow --topic"
                )
            if chosen.to_copy == 0:
                click.echo("nothing to replay")
                return
            confirm(
                dry_run, yes, f"{chosen.to_copy} message(s) would be replayed", f"Replay {chosen.to_copy} message(s)?"
            )
            if dry_run:
                return
            replay_id, total = replay_module.begin(conn, schema_name, chosen), chosen.total
            click.echo(f"replay #{replay_id} started")
        copied = run_with_progress(
            "replay",
            replay_id,
            total,
            lambda report: replay_module.copy(conn, schema_name, replay_id, chunk=chunk, rate=rate, progress=report),
        )
        skipped = replay_module.get(conn, schema_name, replay_id).skipped
    # The rest of what was counted: skipped keys, and rows that retention deleted before
    # their chunk was copied (not there to copy).
    missing = [f"{skipped} skipped for a key over {MAX_KEY_BYTES} bytes"] if skipped else []
    if total - copied - skipped > 0:
        missing.append(f"{total - copied - skipped} deleted meanwhile by retention")
    short = f" (of {total} counted: {'; '.join(missing)})" if missing else ""
    click.echo(f"replay #{replay_id} done: {copied} message(s) copied to the outbox{short}; the relay publishes them")


def _replayed_before(chosen: replay_module.Plan, given: dict[str, str | None]) -> str:
    """Which earlier replay selected some of the same messages, how many, and what a
    duration it was given stood for then."""
    earlier = chosen.previous
    assert earlier is not None
    said = (
        f"this selection was replayed before (#{earlier.replay_id} at {earlier.requested_at:%Y-%m-%d %H:%M:%S %Z}): "
        f"{earlier.shared} of the {chosen.total} message(s) it matches now were selected then"
    )
    bounds = {"--since": chosen.selection.since, "--until": chosen.selection.until}
    then = [
        f"{option} {given[option]} meant {datetime.fromisoformat(earlier.resolved[option[2:]]):%Y-%m-%d %H:%M:%S %Z}"
        for option, bound in bounds.items()
        if bound is not None and bound.relative and earlier.resolved.get(option[2:])
    ]
    if then:
        said += f" (a duration is recorded as the instant it stood for when that replay counted: {' and '.join(then)})"
    if not earlier.finished:
        said += f"; it did not finish: --resume {earlier.replay_id} completes it"
    return said
