"""`outbox-relay claim-check sweep`: remove the objects `enqueue_large` uploaded for
transactions that rolled back.

An object under a store's uploads/ is an orphan when no message names it. The outbox
can only tell while a committed message's row is still there: rows are deleted by
retention after dispatch, so only objects written within `relay.retention` are judged;
older ones are left (counted as undecided) to the bucket's lifecycle rule, which
docs/how-to/claim-check.md says to set. An upload whose transaction is still open is not referenced yet:
objects written after `--older-than` ago, or after the oldest transaction open on the
database began (less a minute: an upload comes right before the INSERT), are left too.
Objects the relay uploaded itself (named by message id, outside uploads/) are never
considered: they always belong to a committed message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.claim_check.envelope import CONTENT_TYPE, URL, ClaimCheckError
from outbox_relay.claim_check.stores import Store
from outbox_relay.errors import ConfigError, first_line

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


def _refusal(conn: psycopg.Connection[Any], schema: str, retention: float) -> str | None:
    """Why the outbox cannot tell an orphan here, or None.

    A message the WAL source streams has no row: while the outbox is in WAL mode, or was
    within relay.retention, an object a committed message names may have no row naming
    it. And the open transactions of other roles (the application's) are visible only
    to a role that may read all statistics."""
    # A switch, not the install: the settings row is made (source_changed_at = now()) by
    # the transaction that records version 8 or, on a fresh install, the current one.
    row = conn.execute(
        sql.SQL(
            "SELECT s.source, s.source_changed_at > now() - make_interval(secs => %s)"
            " AND s.source_changed_at > (SELECT min(installed_at) FROM {schema}.schema_version WHERE version >= 8)"
            " FROM {schema}.settings AS s"
        ).format(schema=sql.Identifier(schema)),
        (retention,),
    ).fetchone()
    if row is not None and (row[0] == "wal" or row[1]):
        return (
            "the outbox writes to the WAL, or did within relay.retention: a streamed message has no row"
            " naming its object, so an orphan cannot be told; remove uploads with a lifecycle rule on the bucket"
        )
    seen = conn.execute(
        "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') FROM pg_roles"
        " WHERE rolname = current_user"
    ).fetchone()
    if not seen or not seen[0]:
        return (
            "the sweep must see every open transaction (an upload whose transaction is still open is not"
            " an orphan): GRANT pg_read_all_stats TO the role of database.dsn, or run it as one that has it"
        )
    return None


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
    problem = _refusal(conn, schema, retention)
    conn.commit()
    if problem is not None:
        raise ClaimCheckError(problem)
    # The oldest open transaction first, then the references in a later snapshot: a
    # transaction that commits in between is either still open (and guards) or seen.
    row = conn.execute(
        "SELECT now(), min(xact_start) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
    ).fetchone()
    conn.commit()
    assert row is not None
    clock, oldest = row
    names = referenced(conn, schema)
    conn.commit()  # nothing held while the stores are listed
    now = now or clock  # the database's clock, as the rows' times
    cut = now - timedelta(seconds=older_than)
    if oldest is not None:
        cut = min(cut, oldest - UPLOAD_TO_BEGIN)
    horizon = now - timedelta(seconds=retention)
    report = SweepReport()
    try:
        _judge(stores, names, cut=cut, horizon=horizon, dry_run=dry_run, report=report)
    except ClaimCheckError:
        raise
    except Exception as exc:  # a store's own error (botocore, OSError): one line, no traceback
        raise ClaimCheckError(f"claim-check store: {first_line(exc)}") from exc
    return report


def _judge(
    stores: Iterable[Store], names: set[str], *, cut: datetime, horizon: datetime, dry_run: bool, report: SweepReport
) -> None:
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


def render(report: SweepReport, *, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    return (
        f"{verb} {len(report.removed)} orphaned object(s); kept {report.referenced} referenced,"
        f" {report.too_young} too young to judge, {report.undecided} older than relay.retention"
        " (left to the bucket's lifecycle rule)"
    )
