"""`outbox-relay console`: the operator console as its own process (outbox_relay/console/).

Binds to 127.0.0.1 unless told otherwise: a console reachable from the network should
sit behind a proxy or a NetworkPolicy (docs/how-to/console.md). Read-only unless
OUTBOX_RELAY_CONSOLE_TOKEN is set in the environment.
"""

from __future__ import annotations

import socket

import click
import structlog

from outbox_relay.cli.common import Target, database_options, require_schema
from outbox_relay.cli.output import one_line_errors
from outbox_relay.cli.run import LOG_LEVEL_OPTION
from outbox_relay.errors import CommandLineError
from outbox_relay.observability.logging_setup import configure as configure_logging


@click.command("console")
@database_options(needs_config="its console settings", dsn_env=None)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free port).")
@LOG_LEVEL_OPTION
@one_line_errors
def console_command(target: Target, host: str, port: int, log_level: str) -> None:
    """The operator console: status, lag, dead letters, replays and message lookup, on
    http://HOST:PORT/console/ (read-only without OUTBOX_RELAY_CONSOLE_TOKEN)."""
    try:
        import uvicorn

        from outbox_relay.console.app import Console
        from outbox_relay.console.auth import TokenTooShort, UntrustableHeader
    except ImportError as exc:
        raise CommandLineError(
            f"the console needs its extra: pip install 'outbox-relay[console]' ({exc.name} is missing)"
        ) from None
    cfg = target.full_config()
    configure_logging(log_level)
    with target.connect() as conn:
        require_schema(conn, target.schema)
    try:
        console = Console(cfg)
    except (TokenTooShort, UntrustableHeader) as exc:
        raise CommandLineError(str(exc)) from None
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise CommandLineError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound = sock.getsockname()[1]
    log = structlog.get_logger("outbox_relay.console")
    log.info(
        "console_listening",
        url=f"http://{host}:{bound}/console/",
        host=host,
        port=bound,
        can_act=console.auth.can_sign_in or bool(console.auth.trusts_header),
    )
    console.open()
    try:
        # uvicorn's own access log would print every query string: the console logs its
        # actions itself, with who did them.
        server = uvicorn.Server(
            uvicorn.Config(console.asgi, log_level="warning", access_log=False, server_header=False)
        )
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn stops cleanly on Ctrl-C, then raises SIGINT again for whoever runs
            # it: here that is how an operator ends the console, not an error.
            if not server.should_exit:
                raise
    finally:
        console.close()
