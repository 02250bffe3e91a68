"""`outbox-relay run` (the relay, until SIGTERM) and `outbox-relay check` (config, database, brokers)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from outbox_relay.cli.common import CONFIG_OPTION, load, one_line_errors
from outbox_relay.observability.logging_setup import configure as configure_logging
from outbox_relay.process import tune_gc


@click.command()
@CONFIG_OPTION
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@one_line_errors
def run(config_path: Path, log_level: str) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    # A SIGTERM before the event loop's handler is in place (while loading the config)
    # is still a clean stop: nothing has been claimed yet.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
    from outbox_relay.assembly import build_relay
    from outbox_relay.console.mount import RelayConsole

    cfg = load(config_path)
    configure_logging(log_level)
    # The console is handed in from here, the top: nothing below the console imports it.
    relay = build_relay(cfg, mount=RelayConsole(cfg) if cfg.console.enabled else None)
    tune_gc()  # after the imports and the set-up: they stay out of the collector's sight

    async def main_async() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)
        await relay.run()

    asyncio.run(main_async())


@click.command()
@CONFIG_OPTION
@one_line_errors
def check(config_path: Path) -> None:
    """Validate the config, then connect to the database and to every broker."""
    from outbox_relay.operations.check import run_checks

    cfg = load(config_path)
    ok = asyncio.run(run_checks(cfg, click.echo))
    sys.exit(0 if ok else 1)
