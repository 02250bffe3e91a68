"""`outbox-relay demo`: a sample application and the relay on an embedded PostgreSQL."""

from __future__ import annotations

import sys

import click

from outbox_relay.cli.output import one_line_errors
from outbox_relay.observability.logging_setup import configure as configure_logging
from outbox_relay.operations.schema_manager import SOURCES


@click.command()
@click.option(
    "--orders",
    default=200,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="How many orders the sample application writes.",
)
@click.option(
    "--rollback-every",
    default=5,
    show_default=True,
    type=click.IntRange(2, 1000),
    help="Every Nth order's transaction is rolled back.",
)
@click.option(
    "--dsn",
    envvar="OUTBOX_DEMO_DSN",
    show_envvar=True,
    default=None,
    help="Use this database instead of an embedded one.",
)
@click.option(
    "--source",
    type=click.Choice(SOURCES),
    default="table",
    show_default=True,
    help="Where enqueue writes: the outbox table, or the WAL (streamed from a replication slot; "
    "needs wal_level = logical, which the embedded PostgreSQL has).",
)
@one_line_errors
def demo(orders: int, rollback_every: int, dsn: str | None, source: str) -> None:
    """Run a sample application and the relay on an embedded PostgreSQL."""
    from outbox_relay.demo.run import run_demo

    configure_logging("warning")
    sys.exit(run_demo(orders=orders, rollback_every=rollback_every, dsn=dsn, source=source))
