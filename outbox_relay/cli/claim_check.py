"""`outbox-relay claim-check sweep` (outbox_relay/operations/claim_check_sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from outbox_relay.claim_check.stores import open_store
from outbox_relay.cli.common import CONFIG_OPTION, connect, load, one_line_errors, positive_duration, require_schema
from outbox_relay.engine.routing import Router
from outbox_relay.errors import ConfigError
from outbox_relay.operations import claim_check_sweep


@click.group("claim-check")
def claim_check_group() -> None:
    """Large payloads in object storage (claim_check)."""


@claim_check_group.command("sweep")
@CONFIG_OPTION
@click.option(
    "--older-than",
    required=True,
    callback=positive_duration,
    help="Only objects written this long ago or earlier (longer than any transaction that enqueues).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def sweep(config_path: Path, older_than: float, dry_run: bool, as_json: bool) -> None:
    """Remove objects `enqueue_large` uploaded for transactions that rolled back."""
    cfg = load(config_path)
    configs = Router(cfg.routes, cfg.claim_check).claim_check_stores()
    if not configs:
        raise ConfigError("no claim_check store is configured (claim_check or routes[].claim_check)")
    stores = [open_store(store) for store in dict.fromkeys(c.store for c in configs)]
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        report = claim_check_sweep.sweep(
            conn,
            cfg.database.schema_name,
            stores,
            older_than=older_than,
            retention=cfg.relay.retention,
            dry_run=dry_run,
        )
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else claim_check_sweep.render(report, dry_run=dry_run))
