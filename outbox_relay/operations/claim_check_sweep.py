"""`outbox-relay claim-check sweep`: remove the objects `enqueue_large` uploaded for
transactions that rolled back.

An object under a store's uploads/ is an orphan when no message names it. The outbox
can only tell while a committed message's row is still there: rows are deleted by
retention after dispatch, so only objects written within `relay.retention` are judged;
older ones are left (counted as undecided) to the bucket's lifecycle rule, which the
README says to set. An upload whose transaction is still open is not referenced yet:
objects written after `--older-than` ago, or after the oldest transaction open on the
database began (less a minute: an upload comes right before the INSERT), are left too.
Objects the relay uploaded itself (named by message id, outside uploads/) are never
considered: they always belong to a committed message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.claim_check.envelope import CONTENT_TYPE, URL
from outbox_relay.claim_check.stores import Store
from outbox_relay.errors import ConfigError

# An upload precedes the INSERT of its envelope by moments, not by more than this.
UPLOAD_TO_BEGIN = timedelta(minutes=1)


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    referenced: int = 0
    too_young: int = 0
    undecided: int = 0  # older than relay.retention: left to the lifecycle rule

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": len(self.removed),
            "referenced": self.referenced,
            "too_young": self.too_young,
            "undecided": self.undecided,
            "removed_objects": self.removed[:100],
        }


def referenced(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    """Every object URL a message in the outbox or an outcome row names (one pass over
    the envelopes: an operator command, not the write path, pays for it)."""
    query = sql.SQL(
        "SELECT headers ->> {url} FROM {schema}.messages WHERE content_type = {ct}"
        " UNION SELECT headers ->> {url} FROM {schema}.outcomes WHERE content_type = {ct}"
    ).format(url=sql.Literal(URL), ct=sql.Literal(CONTENT_TYPE), schema=sql.Identifier(schema))
    return {row[0] for row in conn.execute(query) if row[0] is not None}


def oldest_open_transaction(conn: psycopg.Connection[Any]) -> datetime | None:
    row = conn.execute(
        "SELECT min(xact_start) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
    ).fetchone()
    return row[0] if row else None


def sweep(
    conn: psycopg.Connection[Any],
    schema: str,
    stores: Iterable[Store],
    *,
    older_than: float,
    retention: float,
    dry_run: bool = False,
    now: datetime | None = None,
) -> SweepReport:
    if retention <= older_than:
        raise ConfigError(
            f"--older-than ({older_than:g}s) must be shorter than relay.retention ({retention:g}s): a committed"
            " message's row is deleted by retention after dispatch, so an older object's owner cannot be told;"
            " remove those with a lifecycle rule on the bucket"
        )
    now = now or datetime.now(UTC)
    names = referenced(conn, schema)
    conn.commit()  # nothing held while the stores are listed
    cut = now - timedelta(seconds=older_than)
    oldest = oldest_open_transaction(conn)
    conn.commit()
    if oldest is not None:
        cut = min(cut, oldest - UPLOAD_TO_BEGIN)
    horizon = now - timedelta(seconds=retention)
    report = SweepReport()
    for store in stores:
        for url, written in store.uploads():
            if written >= cut:
                report.too_young += 1
            elif written <= horizon:
                report.undecided += 1
            elif url in names:
                report.referenced += 1
            else:
                if not dry_run:
                    store.delete(url)
                report.removed.append(url)
    return report


def render(report: SweepReport, *, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    return (
        f"{verb} {len(report.removed)} orphaned object(s); kept {report.referenced} referenced,"
        f" {report.too_young} too young to judge, {report.undecided} older than relay.retention"
        " (left to the bucket's lifecycle rule)"
    )
