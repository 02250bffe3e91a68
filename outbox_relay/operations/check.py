"""`outbox-relay check`: the config is valid, the database and every broker answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import psycopg

from outbox_relay.assembly import build_adapters
from outbox_relay.config import Config
from outbox_relay.connections import connect_once
from outbox_relay.errors import OutboxRelayError, first_line
from outbox_relay.operations import schema_manager
from outbox_relay.redact import UNPARSEABLE, UNPARSEABLE_REASON, redact_dsn, redact_text

CHECK_TIMEOUT = 15.0


async def run_checks(config: Config, echo: Callable[[str], None]) -> bool:
    """Print one line per check; True when all pass. Config errors raise ConfigError."""
    adapters = build_adapters(config)  # validates every adapter's options first
    echo(f"config    ok  {config.source}: {len(config.brokers)} broker(s), {len(config.routes)} route(s)")
    dsn = config.database.dsn.get_secret_value()
    ok = True
    try:
        conn = await asyncio.wait_for(connect_once(dsn, timeout=config.database.connect_timeout), CHECK_TIMEOUT)
        async with conn:
            await schema_manager.check(conn, config.database.schema_name)
        echo(f"database  ok  {redact_dsn(dsn)} schema {config.database.schema_name!r}")
    except (psycopg.Error, OutboxRelayError, TimeoutError) as exc:
        ok = False
        shown = redact_dsn(dsn)
        # libpq's parse error quotes a piece of the DSN, which may be the password.
        why = UNPARSEABLE_REASON if shown == UNPARSEABLE else redact_text(first_line(exc), [dsn])
        echo(f"database  FAIL  {shown}: {why}")
    for name, adapter in adapters.items():
        kind = config.brokers[name].type
        try:
            await asyncio.wait_for(adapter.connect(), CHECK_TIMEOUT)
            ready = await asyncio.wait_for(adapter.ready(), CHECK_TIMEOUT)
            echo(f"broker    {'ok' if ready else 'FAIL'}  {name} ({kind}){'' if ready else ': not ready'}")
            ok = ok and ready
        except Exception as exc:
            ok = False
            echo(f"broker    FAIL  {name} ({kind}): {redact_text(str(exc) or repr(exc), [dsn])}")
        finally:
            with contextlib.suppress(Exception):
                await adapter.close()
    return ok
