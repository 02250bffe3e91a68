"""Whether this relay may feed outcomes back to the application (schema.sql, outcomes).

A relay role granted before schema version 10 may not write `outbox.outcomes`, and
`schema install` (the chart's upgrade hook) grants nothing. A statement that writes
outcomes would then fail its whole batch, again and again. So the relay asks once, at
start: with `outcomes.delivered` set it refuses to start, in one line (what was asked
for cannot be done); dead letters are then recorded without their outcome, with a
warning that says how to grant it.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog

from outbox_relay.config import Config
from outbox_relay.errors import ConfigError

log = structlog.get_logger("outbox_relay.outcomes")

_GRANTED = """
SELECT has_table_privilege(c.oid, 'INSERT')
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = 'outcomes'
"""

GRANT_HINT = (
    "run the relay role's GRANTs again (outbox-relay schema sql --grants-only --relay-role ROLE),"
    " then restart the relay"
)


async def outcomes_granted(conn: psycopg.AsyncConnection[Any], schema: str) -> bool:
    """Whether this connection's role may write `schema`.outcomes."""
    cur = await conn.execute(_GRANTED, {"schema": schema})
    row = await cur.fetchone()
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
        await conn.rollback()
    return bool(row and row[0])


async def feeds_dead_letters(conn: psycopg.AsyncConnection[Any], config: Config, *, report: bool = True) -> bool:
    """Whether dead letters get their outcome row. With `report` (once per relay: the
    table source's start), raise ConfigError when outcomes.delivered is set and the
    relay's role may not write outcomes, and warn when dead letters go without."""
    outcomes = config.outcomes
    if not outcomes.dead_lettered and not outcomes.delivered:
        return False
    if await outcomes_granted(conn, config.database.schema_name):
        return outcomes.dead_lettered
    if not report:
        return False
    if outcomes.delivered:
        raise ConfigError(f"outcomes.delivered: the relay's role may not write outbox.outcomes; {GRANT_HINT}")
    log.warning("outcomes_not_granted", written="dead letters without their outcome row", hint=GRANT_HINT)
    return False
