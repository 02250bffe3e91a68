"""`outbox-relay status`: pending, in flight, dead letters, lag, replays and backfills."""

from __future__ import annotations

import json
from pathlib import Path

import click

from outbox_relay.cli.common import CONFIG_OPTION, connect, load, one_line_errors, require_schema
from outbox_relay.operations import status


@click.command("status")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def status_command(config_path: Path, as_json: bool) -> None:
    """Pending, in flight, dead-lettered and oldest pending age, per topic."""
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        current = status.read(conn, cfg.database.schema_name, wal_slot=cfg.wal_slot)
    if as_json:
        click.echo(json.dumps(current.as_dict(), indent=2))
    else:
        click.echo(status.render(current))
