"""`outbox-relay dead-letters list|requeue|purge`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from uuid import UUID

import click

from outbox_relay.cli.common import CONFIG_OPTION, connect, load, one_line_errors, require_schema
from outbox_relay.durations import parse_duration
from outbox_relay.operations import dead_letters


@click.group("dead-letters")
def dead_letters_group() -> None:
    """List, requeue and purge dead-lettered messages."""


@dead_letters_group.command("list")
@CONFIG_OPTION
@click.option("--topic", help="Only topics matching this glob.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def dead_letters_list(config_path: Path, topic: str | None, limit: int, as_json: bool) -> None:
    """Dead letters, oldest first, with their reason."""
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        found = dead_letters.list_dead(conn, cfg.database.schema_name, topic=topic, limit=limit)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "message_id": str(d.message_id),
                        "topic": d.topic,
                        "key": d.key,
                        "attempts": d.attempts,
                        "created_at": d.created_at.isoformat(),
                        "dead_lettered_at": d.dead_lettered_at.isoformat(),
                        "reason": d.reason,
                    }
                    for d in found
                ],
                indent=2,
            )
        )
        return
    if not found:
        click.echo("no dead letters")
    for d in found:
        click.echo(
            f"{d.message_id}  {d.topic}  key={d.key}  attempts={d.attempts}  "
            f"{d.dead_lettered_at.isoformat(timespec='seconds')}  {d.reason}"
        )


def _selection(
    command: Literal["requeue", "purge"],
    ids: tuple[str, ...],
    topic: str | None,
    everything: bool,
    older_than: str | None = None,
) -> dead_letters.Selection:
    """The dead letters the options select; one line and exit 2, before any connection,
    for an id that is not a UUID, a bad duration or options that do not go together."""
    try:
        parsed = tuple(UUID(i) for i in ids)
    except ValueError:
        raise click.BadParameter("not a UUID", param_hint="--id") from None
    seconds = None
    if older_than is not None:
        try:
            seconds = parse_duration(older_than)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--older-than") from None
    return dead_letters.Selection(parsed, topic, seconds, everything, command)


def _left_out(asked: tuple[UUID, ...], taken: Iterable[UUID], selection: dead_letters.Selection) -> None:
    """Name the ids asked for that were not taken, and exit 1: a mistyped id, one that is
    not (or no longer) a dead letter, or one the other filters leave out."""
    missing = set(asked) - set(taken)
    if missing:
        others = [name for name in selection.filters() if name != "--id"]
        outside = f", or outside {' and '.join(others)}" if others else ""
        click.echo(
            f"not {selection.command}d: {', '.join(sorted(map(str, missing)))} (not dead-lettered, unknown{outside})",
            err=True,
        )
        sys.exit(1)


# The selection options, shared by requeue and purge.
ID_OPTION = click.option("--id", "ids", multiple=True, help="This message id (repeatable).")
TOPIC_OPTION = click.option("--topic", help="Dead letters whose topic matches this glob.")
ALL_OPTION = click.option("--all", "everything", is_flag=True, help="Every dead letter; takes no filter.")


@dead_letters_group.command("requeue")
@CONFIG_OPTION
@ID_OPTION
@TOPIC_OPTION
@ALL_OPTION
@one_line_errors
def dead_letters_requeue(config_path: Path, ids: tuple[str, ...], topic: str | None, everything: bool) -> None:
    """Put dead letters back to pending with a fresh attempt budget.

    Takes the dead letters that match every filter given (--id and --topic together:
    an id whose topic does not match stays dead), or --all alone.
    """
    selection = _selection("requeue", ids, topic, everything)
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        done = dead_letters.requeue(conn, cfg.database.schema_name, selection)
    click.echo(f"requeued {len(done)} message(s)")
    _left_out(selection.message_ids, done, selection)


@dead_letters_group.command("purge")
@CONFIG_OPTION
@ID_OPTION
@TOPIC_OPTION
@click.option(
    "--older-than",
    "older_than",
    help="Dead letters dead-lettered longer ago than this (e.g. 7d, 12h, 30m).",
)
@ALL_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@one_line_errors
def dead_letters_purge(
    config_path: Path, ids: tuple[str, ...], topic: str | None, older_than: str | None, everything: bool, yes: bool
) -> None:
    """Delete dead letters for good (after listing or requeueing what you need).

    Takes the dead letters that match every filter given (--id, --topic and
    --older-than together), or --all alone; says how many and asks first.
    """
    selection = _selection("purge", ids, topic, everything, older_than)
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        selection = selection.with_cut(conn, cfg.database.schema_name)
        selected = dead_letters.count(conn, cfg.database.schema_name, selection)
        if selected.count == 0:
            click.echo("no dead letters match")
            _left_out(selection.message_ids, (), selection)
            return
        # Under hold, a dead letter keeps its key's later messages back; deleting it lets
        # them go (as a requeue would, but without the dead one): say so before asking.
        released = ""
        if cfg.relay.dead_letter_policy == "hold":
            held = dead_letters.held_behind(conn, cfg.database.schema_name, selection)
            if held:
                released = f" (dead_letter_policy is hold: {held} message(s) held behind them will be published)"
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(
                    f"{selected.count} dead letter(s) would be deleted{released}; pass --yes to confirm"
                )
            click.confirm(f"Delete {selected.count} dead letter(s) for good{released}?", abort=True)
        deleted = len(dead_letters.purge(conn, cfg.database.schema_name, selection))
    click.echo(f"deleted {deleted} dead letter(s){released}")
    _left_out(selection.message_ids, selected.message_ids, selection)
