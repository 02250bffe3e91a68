"""`outbox-relay check`: the config is valid, every route's destinations fit its broker's
naming rules, the database and every broker answer, the WAL source's slot is there."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from outbox_relay import schema_version
from outbox_relay.adapter import Adapter, destination_check
from outbox_relay.assembly import build_adapters
from outbox_relay.claim_check.stores import open_store
from outbox_relay.config import Config, FileStoreConfig, S3StoreConfig
from outbox_relay.connections import connect_once
from outbox_relay.engine.outcomes import GRANT_HINT, outcomes_granted
from outbox_relay.engine.routing import Router, literal_text
from outbox_relay.errors import ConfigError, OutboxRelayError, first_line
from outbox_relay.operations import schema_manager
from outbox_relay.operations.status import SourceInfo
from outbox_relay.redact import redact_dsn, redact_text, shown_dsn
from outbox_relay.sources.wal import slot
from outbox_relay.sources.wal.runner import WalSource, exactly_once_brokers
from outbox_relay.sqlfiles import Queries

CHECK_TIMEOUT = 15.0

# Every line a check prints: what was checked, its state (ok, WARN, FAIL), and the
# detail, as `database  ok  host=db schema 'outbox'`.
_LINE = re.compile(r"^(?P<check>\w+) +(?P<state>ok|WARN|FAIL)  (?P<detail>.*)$", re.S)


def finding(line: str) -> dict[str, str]:
    """A check's line as `check --json` shows it: check, state, detail."""
    found = _LINE.match(line)
    if found is None:  # every line is written here in that shape; a new one that is not fails loudly
        raise ValueError(f"not a check line: {line!r}")
    return found.groupdict()


async def run_checks(config: Config, echo: Callable[[str], None]) -> bool:
    """Print one line per check (`finding` reads one back); True when all pass. Config
    errors raise ConfigError."""
    adapters = build_adapters(config)  # validates every adapter's options first
    echo(f"config    ok  {config.source}: {len(config.brokers)} broker(s), {len(config.routes)} route(s)")
    ok = check_routes(config, echo)
    dsn = config.database.dsn.get_secret_value()
    try:
        conn = await asyncio.wait_for(connect_once(dsn, timeout=config.database.connect_timeout), CHECK_TIMEOUT)
        async with conn:
            await schema_version.check(conn, config.database.schema_name)
            echo(f"database  ok  {redact_dsn(dsn)} schema {config.database.schema_name!r}")
            ok = await check_source(conn, config, echo) and ok
            ok = await check_exactly_once(conn, config, adapters, echo) and ok
            ok = await check_outcomes(conn, config, echo) and ok
    except (psycopg.Error, OutboxRelayError, TimeoutError) as exc:
        ok = False
        # libpq's answer can quote the piece of the DSN that holds the password.
        shown, hidden = shown_dsn(dsn)
        echo(f"database  FAIL  {shown}: {hidden or redact_text(first_line(exc), [dsn])}")
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
    for claim in Router(config.routes, config.claim_check).claim_check_stores():
        ok = await check_claim_check_store(claim.store, echo) and ok
    return ok


async def check_claim_check_store(config: FileStoreConfig | S3StoreConfig, echo: Callable[[str], None]) -> bool:
    """Whether a claim-check store answers the relay's identity (claim_check/stores.py)."""
    try:
        store = open_store(config)
        await asyncio.wait_for(asyncio.to_thread(store.probe), CHECK_TIMEOUT)
    except Exception as exc:
        where = f"s3://{config.bucket}/{config.prefix}" if isinstance(config, S3StoreConfig) else config.path
        echo(f"store     FAIL  {where}: {first_line(exc)}")
        return False
    echo(f"store     ok  {store.where}")
    return True


async def check_source(conn: psycopg.AsyncConnection[Any], config: Config, echo: Callable[[str], None]) -> bool:
    """The outbox's source, and in WAL mode its slot: FAIL when the slot is missing or
    lost (the relay would stop on it), WARN when PostgreSQL may keep WAL for it without
    limit (max_slot_wal_keep_size = -1: a stalled relay fills the disk) and when PUBLIC
    may still emit logical messages (any role could inject what the relay publishes)."""
    schema = config.database.schema_name
    recorded = await (await conn.execute(Queries(schema)["outbox_source"])).fetchone()
    state = await slot.read_state_async(conn, config.wal_slot)
    info = SourceInfo.from_row(recorded, config.wal_slot, state)
    if info.source == "wal" and state is None:
        echo(
            f"source    FAIL  {info.summary()}: create it with `outbox-relay schema source wal --schema {schema} "
            f"--slot {config.wal_slot}` (or set relay.wal.slot to the one it created)"
        )
        return False
    if info.wal_status == "lost":
        echo(f"source    FAIL  {info.summary()}: PostgreSQL invalidated the slot; WAL it kept is gone")
        return False
    echo(f"source    ok  {info.summary()}")
    if info.source == "wal" and await schema_manager.emit_message_public(conn, schema):
        echo(
            "source    WARN  PUBLIC can execute pg_logical_emit_message: any role that can connect can write "
            "messages the relay publishes; have a superuser run `outbox-relay schema source wal --schema "
            f"{schema}` (it revokes that) or the statements it prints"
        )
    if state is not None:
        keep = await (await conn.execute(slot.query("max_slot_wal_keep_size"))).fetchone()
        if keep is not None and str(keep[0]) == "-1":
            echo(
                "source    WARN  max_slot_wal_keep_size is -1: the slot keeps WAL without limit while no relay "
                "confirms it (a stopped or stalled relay fills the disk); set a limit (ALTER SYSTEM SET "
                "max_slot_wal_keep_size = '50GB'), past which PostgreSQL invalidates the slot instead"
            )
    return True


async def check_exactly_once(
    conn: psycopg.AsyncConnection[Any], config: Config, adapters: Mapping[str, Adapter], echo: Callable[[str], None]
) -> bool:
    """An exactly-once broker needs the WAL source: what `run` refuses at start, said
    here first (the WAL source's check_start)."""
    if not exactly_once_brokers(adapters):
        return True
    try:
        await WalSource(config).check_start(conn, adapters)
    except ConfigError as exc:
        echo(f"exactly   FAIL  {exc.reason}")
        return False
    echo(f"exactly   ok  {', '.join(exactly_once_brokers(adapters))}: transactions from the WAL source")
    return True


async def check_outcomes(conn: psycopg.AsyncConnection[Any], config: Config, echo: Callable[[str], None]) -> bool:
    """Whether the relay's role may write the outcomes the config asks for (what `run`
    refuses, with outcomes.delivered, or warns about, engine/outcomes.py)."""
    outcomes = config.outcomes
    if not outcomes.dead_lettered and not outcomes.delivered:
        return True
    if await outcomes_granted(conn, config.database.schema_name):
        echo("outcomes  ok  the relay's role may write outbox.outcomes")
        return True
    if outcomes.delivered:
        echo(f"outcomes  FAIL  outcomes.delivered: the relay's role may not write outbox.outcomes; {GRANT_HINT}")
        return False
    echo(f"outcomes  WARN  dead letters will be recorded without their outcome row; {GRANT_HINT}")
    return True


def check_routes(config: Config, echo: Callable[[str], None]) -> bool:
    """One line per route whose destinations its broker would refuse (the adapter's
    optional naming rules, outbox_relay/adapter.py); True when there is none. Such a
    route can only dead-letter, so `check` fails on it rather than the messages later."""
    ok = True
    for index, route in enumerate(config.routes):
        kind = config.brokers[route.broker].type
        rule = destination_check(kind)
        explicit = route.destination is not None
        name = route.destination if route.destination is not None else literal_text(route.topic)
        if rule is None or not (explicit or name):
            continue
        try:
            problem = rule(name, explicit)
        except Exception as exc:  # a third party's rule: say so, do not crash the check
            problem = f"its adapter's check_destination raised {first_line(exc)!r}"
        if problem:
            ok = False
            where = f"routes[{index}] {route.topic!r} -> {route.broker} ({kind})"
            if explicit:
                echo(f"route     FAIL  {where}: destination {name!r}: {problem}")
            else:
                echo(
                    f"route     FAIL  {where}: no destination, so each message goes to its own topic's name, "
                    f"and for every topic this pattern matches: {problem} (give the route a destination)"
                )
    return ok
