"""`outbox-relay claim-check sweep` (outbox_relay/operations/claim_check_sweep.py)."""

from __future__ import annotations

import click

from outbox_relay.claim_check.stores import open_store
from outbox_relay.cli.common import Target, database_options, positive_duration, require_schema
from outbox_relay.cli.output import JSON_OPTION, one_line_errors, print_json
from outbox_relay.engine.routing import Router
from outbox_relay.errors import ConfigError
from outbox_relay.operations import claim_check_sweep


@click.group("claim-check")
def claim_check_group() -> None:
    """Large payloads in object storage (claim_check)."""


@claim_check_group.command("sweep")
@database_options(needs_config="its claim_check stores and relay.retention", dsn_env=None)
@click.option(
    "--older-than",
    required=True,
    callback=positive_duration,
    help="Only objects written this long ago or earlier (longer than any transaction that enqueues).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@JSON_OPTION
@one_line_errors
def sweep(target: Target, older_than: float, dry_run: bool, as_json: bool) -> None:
    """Remove objects `enqueue_large` uploaded for transactions that rolled back (exit 0
    also when none is old enough: a job that runs it on a schedule)."""
    cfg = target.full_config()
    configs = Router(cfg.routes, cfg.claim_check).claim_check_stores()
    if not configs:
        raise ConfigError("no claim_check store is configured (claim_check or routes[].claim_check)")
    stores = [open_store(store) for store in dict.fromkeys(c.store for c in configs)]
    with target.connect() as conn:
        require_schema(conn, target.schema)
        report = claim_check_sweep.sweep(
            conn,
            target.schema,
            stores,
            older_than=older_than,
            retention=cfg.relay.retention,
            dry_run=dry_run,
        )
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(claim_check_sweep.render(report, dry_run=dry_run))
