"""`outbox-relay dead-letters list|requeue|purge`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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
@click.option("--json", "as_json", is_flag=True)
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
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        done = dead_letters.requeue(
            conn, cfg.database.schema_name, message_ids=parsed, topic=topic, everything=everything
        )
    click.echo(f"requeued {len(done)} message(s)")
    missing = set(parsed) - set(done)
    if missing:
        click.echo(f"not dead-lettered (or unknown): {', '.join(sorted(map(str, missing)))}", err=True)
        sys.exit(1)


@dead_letters_group.command("purge")
@CONFIG_OPTION
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete dead letters dead-lettered longer ago than this (e.g. 7d, 12h, 30m).",
)
@click.option("--topic", help="Only topics matching this glob.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@one_line_errors
def dead_letters_purge(config_path: Path, older_than: str, topic: str | None, yes: bool) -> None:
    """Delete old dead letters for good (after listing or requeueing what you need)."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
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
