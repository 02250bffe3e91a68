"""`outbox-relay audit`: read back from the brokers what the outbox says it delivered
(outbox_relay/operations/audit.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from outbox_relay.cli.common import CONFIG_OPTION, connect, load, one_line_errors, positive_duration, require_schema
from outbox_relay.operations import audit


@click.command("audit")
@CONFIG_OPTION
@click.option(
    "--since",
    default="1h",
    show_default=True,
    callback=positive_duration,
    help="Messages dispatched this long ago or later.",
)
@click.option("--topic", help="Only topics matching this glob (* and ?).")
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Check at most this many, the latest dispatched: the brokers are read only there.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def audit_command(config_path: Path, since: float, topic: str | None, sample: int, as_json: bool) -> None:
    """Check that dispatched messages are on their brokers where their receipts say
    (exit 0), or report what is missing (exit 1)."""
    cfg = load(config_path)
    with connect(cfg.database.dsn.get_secret_value()) as conn:
        require_schema(conn, cfg.database.schema_name)
        report = asyncio.run(audit.audit(conn, cfg, since_s=since, topic=topic, sample=sample))
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else audit.render(report))
    if not report.ok:
        sys.exit(1)
