"""`outbox-relay audit`: read back from the brokers what the outbox says it delivered
(outbox_relay/operations/audit.py)."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import click

from outbox_relay.cli.common import TOPIC_GLOB, Target, database_options, require_schema, time_bound
from outbox_relay.cli.output import JSON_OPTION, one_line_errors, print_json
from outbox_relay.errors import CommandLineError
from outbox_relay.operations import audit
from outbox_relay.operations.replay import TimeBound


@click.command("audit")
@database_options(needs_config="it reads the config's brokers", dsn_env=None)
@click.option(
    "--since",
    default="1h",
    show_default=True,
    callback=time_bound,
    help="Messages dispatched at or after this time (ISO 8601) or this long ago (2h).",
)
@click.option("--topic", help=f"Only topics matching this {TOPIC_GLOB}.")
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Check at most this many, the latest dispatched: the brokers are read only there.",
)
@JSON_OPTION
@one_line_errors
def audit_command(target: Target, since: TimeBound, topic: str | None, sample: int, as_json: bool) -> None:
    """Check that dispatched messages are on their brokers where their receipts say
    (exit 0), or report what is missing (exit 1)."""
    since_s = (datetime.now(UTC) - since.at).total_seconds()
    if since_s <= 0:
        raise CommandLineError(f"--since {since.given}: give a time in the past")
    cfg = target.full_config()
    with target.connect() as conn:
        require_schema(conn, target.schema)
        report = asyncio.run(audit.audit(conn, cfg, since_s=since_s, topic=topic, sample=sample))
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(audit.render(report))
    if not report.ok:
        sys.exit(1)
