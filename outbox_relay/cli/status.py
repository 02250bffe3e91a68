"""`outbox-relay status`: pending, in flight, dead letters, lag, replays and backfills."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from uuid import UUID

import click

from outbox_relay.cli.common import CONFIG_OPTION, connect, load, one_line_errors, require_schema
from outbox_relay.operations import message_lookup, status


@click.command("status")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--message-id",
    type=click.UUID,
    default=None,
    help="One message instead: its state, attempts and, once dispatched, where it landed (exit 1 if not found).",
)
@one_line_errors
def status_command(config_path: Path, as_json: bool, message_id: UUID | None) -> None:
    """Pending, in flight, dead-lettered and oldest pending age, per topic."""
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        if message_id is not None:
            rows = message_lookup.lookup(conn, cfg.database.schema_name, message_id)
        else:
            current = status.read(conn, cfg.database.schema_name, wal_slot=cfg.wal_slot)
    if message_id is not None:
        if not rows:
            click.echo(
                f"error: no message {message_id} in schema {cfg.database.schema_name!r}"
                " (never enqueued here, or deleted by retention or a purge)",
                err=True,
            )
            sys.exit(1)
        click.echo(message_lookup.as_json(message_id, rows) if as_json else message_lookup.render(message_id, rows))
        return
    if as_json:
        click.echo(json.dumps(current.as_dict(), indent=2))
    else:
        click.echo(status.render(current))
