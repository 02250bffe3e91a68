"""`outbox-relay run` (the relay, until SIGTERM) and `outbox-relay check` (config, database, brokers)."""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from outbox_relay.cli.common import Target, database_options
from outbox_relay.cli.output import JSON_OPTION, one_line_errors, print_json
from outbox_relay.observability.logging_setup import configure as configure_logging
from outbox_relay.process import tune_gc

LOG_LEVEL_OPTION = click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="The least severe log lines written (JSON lines on stderr off a terminal).",
)


def _clean_stop_while_starting(func: Callable[..., Any]) -> Callable[..., Any]:
    """A SIGTERM before the event loop's handler is in place (while the config is read,
    before `run` itself starts) is still a clean stop: nothing has been claimed yet."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
        return func(*args, **kwargs)

    return wrapper


@click.command()
@_clean_stop_while_starting
@database_options(needs_config="its brokers and routes", dsn_env=None)
@LOG_LEVEL_OPTION
@one_line_errors
def run(target: Target, log_level: str) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    from outbox_relay.assembly import build_relay
    from outbox_relay.console.mount import RelayConsole

    cfg = target.full_config()
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
@database_options(needs_config="it checks the config's brokers and routes", dsn_env=None)
@JSON_OPTION
@one_line_errors
def check(target: Target, as_json: bool) -> None:
    """Validate the config, then connect to the database and to every broker (exit 1
    when a check fails)."""
    from outbox_relay.operations.check import finding, run_checks

    lines: list[str] = []
    ok = asyncio.run(run_checks(target.full_config(), lines.append if as_json else click.echo))
    if as_json:
        print_json({"ok": ok, "checks": [finding(line) for line in lines]})
    sys.exit(0 if ok else 1)
