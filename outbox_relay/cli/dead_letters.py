"""`outbox-relay dead-letters list|show|requeue|purge`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, Literal
from uuid import UUID

import click

from outbox_relay.cli.common import (
    TOPIC_GLOB,
    Target,
    confirm,
    database_options,
    message_ids_option,
    positive_duration,
    require_schema,
    time_bound,
)
from outbox_relay.cli.output import JSON_OPTION, NOT_FOUND, notes, one_line_errors, print_json
from outbox_relay.engine.routing import Router
from outbox_relay.operations import dead_letters
from outbox_relay.operations.replay import TimeBound
from outbox_relay.operations.status import printable, utc
from outbox_relay.redact import payload_text, redacted_headers


@click.group("dead-letters")
def dead_letters_group() -> None:
    """List, show, requeue and purge dead-lettered messages."""


@dead_letters_group.command("list")
@database_options()
@click.option("--topic", help=f"Only topics matching this {TOPIC_GLOB}.")
@click.option("--key", help="Only messages with this key.")
@click.option(
    "--since", callback=time_bound, help="Dead-lettered at or after this time (ISO 8601) or this long ago (2h)."
)
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(1, 100_000), help="List at most this many."
)
@JSON_OPTION
@one_line_errors
def dead_letters_list(
    target: Target, topic: str | None, key: str | None, since: TimeBound | None, limit: int, as_json: bool
) -> None:
    """Dead letters, oldest first, with their reason and the broker their topic routes to
    (from the config's routes; - without a config)."""
    with target.connect() as conn:
        require_schema(conn, target.schema)
        found = dead_letters.list_dead(
            conn, target.schema, topic=topic, key=key, since=since.at if since else None, limit=limit
        )
    broker = _broker_of(target)
    if as_json:
        print_json([{**_letter_fields(d), "broker": broker(d.topic)} for d in found.rows])
        return
    if not found.rows:
        click.echo("no dead letters match" if (topic or key or since) else "no dead letters")
        return
    for d in found.rows:
        key = printable(d.key) if d.key is not None else "(none)"  # as `show` says it
        click.echo(
            f"{d.message_id}  {printable(d.topic)}  broker={broker(d.topic) or '-'}  key={key}  "
            f"attempts={d.attempts}  {d.dead_lettered_at.isoformat(timespec='seconds')}  {printable(d.reason)}"
        )
    of = f"more than {dead_letters.COUNT_CAP:,}" if found.capped else f"{found.matched:,}"
    more = "; --limit N shows more" if found.capped or found.matched > len(found.rows) else ""
    click.echo(f"showing {len(found.rows):,} of {of} dead letter(s){more}")


def _broker_of(target: Target) -> Callable[[str], str | None]:
    """The broker a topic routes to, by the config's routes (first match wins, as in
    the relay); None without a config (unknown: "-" in text, null in JSON), "(no
    route)" for a topic no route takes."""
    if target.config is None:
        return lambda _topic: None
    router = Router(target.config.routes)

    def broker(topic: str) -> str | None:
        found = router.resolve(topic)
        return found.broker if found is not None else "(no route)"

    return broker


def _letter_fields(d: dead_letters.DeadLetter) -> dict[str, Any]:
    return {
        "message_id": str(d.message_id),
        "topic": d.topic,
        "key": d.key,
        "attempts": d.attempts,
        "created_at": d.created_at.isoformat(),
        "dead_lettered_at": d.dead_lettered_at.isoformat(),
        "reason": d.reason,
    }


@dead_letters_group.command("show")
@click.argument("message_id", type=click.UUID)
@database_options()
@click.option("--payload", "with_payload", is_flag=True, help="Show the payload too (redacted by default).")
@click.option(
    "--headers",
    "with_headers",
    is_flag=True,
    help=(
        "Show every header's value (by default only traceparent, tracestate, outbox-replay-id and"
        " outbox-backfill-id; the others are redacted)."
    ),
)
@JSON_OPTION
@one_line_errors
def dead_letters_show(target: Target, message_id: UUID, with_payload: bool, with_headers: bool, as_json: bool) -> None:
    """One dead letter by its message id: reason, attempts, times, headers (names, and
    the values of trace context only unless --headers: an application's headers may
    carry secrets); the payload only with --payload. Exit 1 if that message is not a
    dead letter."""
    with target.connect() as conn:
        require_schema(conn, target.schema)
        found = dead_letters.show(conn, target.schema, message_id, with_payload=with_payload)
    if not found:
        click.echo(
            f"error: no dead letter {message_id} in schema {target.schema!r} "
            "(requeued, purged, not dead-lettered, or never enqueued here)",
            err=True,
        )
        sys.exit(NOT_FOUND)
    if as_json:
        print_json({"message_id": str(message_id), "dead_letters": [_detail_fields(d, with_headers) for d in found]})
        return
    click.echo("\n".join(_render_detail(d, with_headers) for d in found))


def _detail_fields(d: dead_letters.DeadLetterDetail, with_headers: bool) -> dict[str, Any]:
    headers = d.headers if with_headers else redacted_headers(d.headers)
    return {
        **_letter_fields(d.letter),
        "row_id": d.row_id,
        "published_to_dead_letter_topic": d.published_to_topic,
        "last_error": d.last_error,
        "content_type": d.content_type,
        "headers": headers,
        "headers_redacted": headers != d.headers,
        # As stored when it is text (a script parses it as its content type says).
        "payload": None if d.payload is None else _stored_text(d.payload),
        "payload_redacted": d.payload is None,
    }


def _stored_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload_text(payload)  # its length and hex


def _render_detail(d: dead_letters.DeadLetterDetail, with_headers: bool) -> str:
    letter = d.letter
    if d.payload is not None:
        payload = "\n" + "\n".join(f"    {line}" for line in payload_text(d.payload).splitlines())
    elif d.payload_refused:
        payload = "(redacted: this database role may not read payloads)"
    else:
        payload = "(redacted; --payload shows it)"
    shown = d.headers if with_headers else redacted_headers(d.headers)
    headers = ", ".join(f"{printable(k)}={printable(v)}" for k, v in shown.items()) or "(none)"
    if shown != d.headers:
        headers += " (--headers shows every value)"
    fields = [
        ("topic", printable(letter.topic)),
        ("key", printable(letter.key) if letter.key is not None else "(none)"),
        ("reason", printable(letter.reason)),
        ("attempts", str(letter.attempts)),
        ("enqueued", utc(letter.created_at)),
        ("dead-lettered", utc(letter.dead_lettered_at)),
        ("dead-letter topic", "published" if d.published_to_topic else "not published"),
        *([("earlier error", printable(d.last_error))] if d.last_error else []),
        ("content type", printable(d.content_type)),
        ("headers", headers),
        ("payload", payload),
    ]
    return "\n".join(
        [
            f"dead letter {letter.message_id} (row {d.row_id})",
            *(f"  {name}{value}" if value.startswith("\n") else f"  {name:<18} {value}" for name, value in fields),
        ]
    )


def _selection(
    command: Literal["requeue", "purge"],
    ids: tuple[UUID, ...],
    topic: str | None,
    everything: bool,
    older_than: float | None = None,
) -> dead_letters.Selection:
    """The dead letters the options select; options that do not go together are one
    line and exit 2 (Selection), before any connection."""
    return dead_letters.Selection(ids, topic, older_than, everything, command)


def _left_out(asked: tuple[UUID, ...], taken: Iterable[UUID], selection: dead_letters.Selection) -> list[UUID]:
    """The ids asked for that were not taken: a mistyped id, one that is not (or no
    longer) a dead letter, or one the other filters leave out; named on stderr."""
    missing = sorted(set(asked) - set(taken), key=str)
    if missing:
        others = [name for name in selection.filters() if name != "--message-id"]
        outside = f", or outside {' and '.join(others)}" if others else ""
        click.echo(
            f"not {selection.command}d: {', '.join(map(str, missing))} (not dead-lettered, unknown{outside})",
            err=True,
        )
    return missing


# The selection options, shared by requeue and purge.
IDS_OPTION = message_ids_option("This message id (repeatable).", old="--id")
TOPIC_OPTION = click.option("--topic", help=f"Dead letters whose topic matches this {TOPIC_GLOB}.")
ALL_OPTION = click.option("--all", "everything", is_flag=True, help="Every dead letter; takes no filter.")


@dead_letters_group.command("requeue")
@database_options()
@IDS_OPTION
@TOPIC_OPTION
@ALL_OPTION
@JSON_OPTION
@one_line_errors
def dead_letters_requeue(
    target: Target, message_ids: tuple[UUID, ...], topic: str | None, everything: bool, as_json: bool
) -> None:
    """Put dead letters back to pending with a fresh attempt budget.

    Takes the dead letters that match every filter given (--message-id and --topic
    together: an id whose topic does not match stays dead), or --all alone. Exit 1
    when it took none, or not every id given.
    """
    selection = _selection("requeue", message_ids, topic, everything)
    with target.connect() as conn:
        require_schema(conn, target.schema)
        done = dead_letters.requeue(conn, target.schema, selection)
    missing = _left_out(selection.message_ids, done, selection)
    if as_json:
        print_json({"requeued": done, "not_requeued": missing})
    else:
        click.echo(f"requeued {len(done)} message(s)")
    if missing or not done:
        sys.exit(NOT_FOUND)


@dead_letters_group.command("purge")
@database_options()
@IDS_OPTION
@TOPIC_OPTION
@click.option(
    "--older-than",
    "older_than",
    callback=positive_duration,
    help="Dead letters dead-lettered longer ago than this (e.g. 7d, 12h, 30m).",
)
@ALL_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@JSON_OPTION
@one_line_errors
def dead_letters_purge(
    target: Target,
    message_ids: tuple[UUID, ...],
    topic: str | None,
    older_than: float | None,
    everything: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete dead letters for good (after listing or requeueing what you need).

    Takes the dead letters that match every filter given (--message-id, --topic and
    --older-than together), or --all alone; says how many and asks first. Exit 1 when
    none matched, or not every id given.
    """
    say = notes(as_json)
    selection = _selection("purge", message_ids, topic, everything, older_than)
    policy = target.config.relay.dead_letter_policy if target.config else None
    with target.connect() as conn:
        require_schema(conn, target.schema)
        selection = selection.with_cut(conn, target.schema)
        selected = dead_letters.count(conn, target.schema, selection)
        if selected.count == 0:
            missing = _left_out(selection.message_ids, (), selection)
            if as_json:
                print_json(
                    {
                        "deleted": [],
                        "not_deleted": missing,
                        "pending_behind": None if policy == "release" else 0,
                        "dead_letter_policy": policy,
                    }
                )
            else:
                click.echo("no dead letters match")
            sys.exit(NOT_FOUND)
        # Under hold, a dead letter keeps its key's later messages back; deleting it lets
        # them go (as a requeue would, but without the dead one): say so before asking.
        # Under release nothing waits behind a dead letter: not counted (None).
        behind = dead_letters.held_behind(conn, target.schema, selection) if policy != "release" else None
        released = _released(behind, policy)
        confirm(
            False,
            yes,
            f"{selected.count} dead letter(s) would be deleted{released}",
            f"Delete {selected.count} dead letter(s) for good{released}?",
            err=as_json,
        )
        deleted = dead_letters.purge(conn, target.schema, selection)
    missing = _left_out(selection.message_ids, selected.message_ids, selection)
    if as_json:
        print_json({"deleted": deleted, "not_deleted": missing, "pending_behind": behind, "dead_letter_policy": policy})
    else:
        say(f"deleted {len(deleted)} dead letter(s){released}")
    if missing:
        sys.exit(NOT_FOUND)


def _released(behind: int | None, policy: str | None) -> str:
    """What deleting dead letters does to the messages behind them, for the question
    and the answer: known under the config's policy, said for both without a config."""
    if not behind:
        return ""
    if policy == "hold":
        return f" (dead_letter_policy is hold: {behind} message(s) held behind them will be published)"
    return f" ({behind} pending message(s) behind them: held until then if dead_letter_policy is hold)"
