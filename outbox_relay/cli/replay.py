"""`outbox-relay replay`: publish dispatched messages again, recorded and resumable."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

import click

from outbox_relay.cli.common import (
    RATE_OPTION,
    TOPIC_GLOB,
    Target,
    chunk_option,
    confirm,
    confirm_finish,
    database_options,
    message_ids_option,
    require_schema,
    run_with_progress,
    time_bound,
)
from outbox_relay.cli.output import JSON_OPTION, NOT_FOUND, notes, one_line_errors, print_json
from outbox_relay.engine.routing import Router
from outbox_relay.errors import CommandLineError
from outbox_relay.operations import replay as replay_module
from outbox_relay.operations.replay import TimeBound
from outbox_relay.validation import MAX_KEY_BYTES

# Rows written before schema version 6 may hold a key over today's limit (1,024
# characters were allowed); a copy is a new message, and no new message takes such a key.
_UNFIT = f"a key over {MAX_KEY_BYTES} bytes, more than a new message may have since schema version 6"


@click.command()
@database_options(needs_config="its routes must take the copies' topics", dsn_env=None)
@click.option("--topic", help=f"Only topics matching this {TOPIC_GLOB}.")
@click.option("--key", help="Only messages with this key.")
@click.option("--since", callback=time_bound, help="Enqueued at or after this time (ISO 8601) or this long ago (2h).")
@click.option("--until", callback=time_bound, help="Enqueued before this time (ISO 8601) or this long ago.")
@message_ids_option("Only this message (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Every dispatched message still kept (no filter).")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed, and change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--again", is_flag=True, help="Replay a selection that was replayed before.")
@click.option("--resume", "resume_id", type=int, help="Finish replay N, stopped before it was done.")
@chunk_option(replay_module.DEFAULT_CHUNK)
@RATE_OPTION
@JSON_OPTION
@one_line_errors
def replay(
    target: Target,
    topic: str | None,
    key: str | None,
    since: TimeBound | None,
    until: TimeBound | None,
    message_ids: tuple[UUID, ...],
    everything: bool,
    dry_run: bool,
    yes: bool,
    again: bool,
    resume_id: int | None,
    chunk: int,
    rate: float | None,
    as_json: bool,
) -> None:
    """Publish dispatched messages again (those retention still keeps).

    Copies go to the tail of the outbox with their message id and the header
    outbox-replay-id; the relay publishes them like any message, in per-key order.
    In WAL mode only messages parked in the table are rows: a selection that reaches
    into that time says so, and is refused when the table has none of it. Exit 1
    when the selection takes nothing.
    """
    say = notes(as_json)
    selection = replay_module.Selection(topic=topic, key=key, since=since, until=until, message_ids=message_ids)
    if resume_id is not None and (not selection.empty or everything or again):
        raise CommandLineError(
            "--resume takes no filter, --all or --again: the replay keeps the selection it was started with"
        )
    if resume_id is None and selection.empty and not everything:
        raise CommandLineError("choose what to replay (--topic, --key, --since, --until, --message-id) or pass --all")
    cfg = target.full_config()
    schema_name = target.schema
    answer: dict[str, Any] = {"replay_id": resume_id, "dry_run": dry_run}
    with target.connect() as conn:
        require_schema(conn, schema_name)
        if resume_id is not None:
            recorded = replay_module.get(conn, schema_name, resume_id)
            answer.update(total=recorded.total, copied=recorded.copied, skipped=recorded.skipped)
            if recorded.finished:
                say(f"replay #{resume_id} is already done: {recorded.copied} message(s) copied")
                _answer(as_json, {**answer, "done": True})
                return
            replay_id, total = resume_id, recorded.total
            say(f"replay #{replay_id} stopped at {recorded.copied} of {total} copied")
            confirm_finish(
                "replay",
                replay_id,
                created_by=recorded.created_by,
                own=recorded.own,
                acts=f"copy {replay_module.describe(recorded.selection)} ({total} message(s))",
                dry_run=dry_run,
                yes=yes,
                err=as_json,
            )
            if dry_run:
                _answer(as_json, {**answer, "done": False})
                return
            say(f"resuming replay #{replay_id}")
        else:
            chosen = replay_module.plan(conn, schema_name, selection)
            _say_plan(chosen, say, dry_run=dry_run)
            answer.update(total=chosen.total, to_copy=chosen.to_copy, by_topic=chosen.by_topic, skipped=chosen.unfit)
            if chosen.previous is not None and not again:
                said = _replayed_before(chosen, {"--since": since, "--until": until})
                if not dry_run:  # a dry run says so and never refuses
                    raise CommandLineError(f"{said}; pass --again to replay it once more")
                say(f"{said}; a replay of it needs --again")
            # A copy whose topic no route takes would be dead-lettered, and under
            # dead_letter_policy hold would then stop its key's live messages.
            router = Router(cfg.routes)
            unrouted = [name for name in chosen.by_topic if router.resolve(name) is None]
            if unrouted:
                raise CommandLineError(
                    f"no route in {cfg.source} takes topic {unrouted[0]!r}: its copies would be "
                    "dead-lettered; add a route or narrow --topic"
                )
            if chosen.to_copy == 0:
                say("nothing to replay")
                _answer(as_json, {**answer, "copied": 0, "done": False})
                sys.exit(NOT_FOUND)
            confirm(
                dry_run,
                yes,
                f"{chosen.to_copy} message(s) would be replayed",
                f"Replay {chosen.to_copy} message(s)?",
                err=as_json,
            )
            if dry_run:
                _answer(as_json, {**answer, "copied": 0, "done": False})
                return
            replay_id, total = replay_module.begin(conn, schema_name, chosen), chosen.total
            answer["replay_id"] = replay_id
            say(f"replay #{replay_id} started")
        copied = run_with_progress(
            "replay",
            replay_id,
            total,
            lambda report: replay_module.copy(conn, schema_name, replay_id, chunk=chunk, rate=rate, progress=report),
        )
        skipped = replay_module.get(conn, schema_name, replay_id).skipped
    # The rest of what was counted: skipped keys, and rows that retention deleted before
    # their chunk was copied (not there to copy).
    deleted = max(total - copied - skipped, 0)
    missing = [f"{skipped} skipped for a key over {MAX_KEY_BYTES} bytes"] if skipped else []
    if deleted:
        missing.append(f"{deleted} deleted meanwhile by retention")
    short = f" (of {total} counted: {'; '.join(missing)})" if missing else ""
    say(f"replay #{replay_id} done: {copied} message(s) copied to the outbox{short}; the relay publishes them")
    _answer(
        as_json,
        {**answer, "total": total, "copied": copied, "skipped": skipped, "deleted_meanwhile": deleted, "done": True},
    )


def _say_plan(chosen: replay_module.Plan, say: Callable[[str], None], *, dry_run: bool) -> None:
    """What the selection takes, and what of it cannot be copied."""
    listing = ", ".join(f"{name}: {n}" for name, n in chosen.by_topic.items())
    say(f"{chosen.total} message(s) to replay" + (f" ({listing})" if listing else ""))
    if chosen.unsettled:
        say(
            f"note: {chosen.unsettled} transaction(s) open when it counted were still open 10s later; "
            "a message one of them marked dispatched before the count is copied too"
        )
    if chosen.unfit:
        say(f"{chosen.unfit} of them will be skipped: {_UNFIT}")
    if chosen.wal is not None:
        # The WAL source: what went out straight from the WAL is not in the table.
        if chosen.to_copy == 0 and not dry_run:
            raise replay_module.NotInTable(f"nothing to replay: {chosen.wal.note()}")
        say(chosen.wal.note())


def _answer(as_json: bool, answer: dict[str, Any]) -> None:
    """--json: what the replay did (or, on a dry run, would do), as one document."""
    if as_json:
        print_json(answer)


def _replayed_before(chosen: replay_module.Plan, given: dict[str, TimeBound | None]) -> str:
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
        f"{option} {_as_given(given[option])} meant "
        f"{datetime.fromisoformat(earlier.resolved[option[2:]]):%Y-%m-%d %H:%M:%S %Z}"
        for option, bound in bounds.items()
        if bound is not None and bound.relative and earlier.resolved.get(option[2:])
    ]
    if then:
        said += f" (a duration is recorded as the instant it stood for when that replay counted: {' and '.join(then)})"
    if not earlier.finished:
        said += f"; it did not finish: --resume {earlier.replay_id} completes it"
    return said


def _as_given(bound: TimeBound | None) -> str:
    """A time bound as the user wrote it, near enough: a duration as "2h ago"."""
    return "" if bound is None else bound.given
