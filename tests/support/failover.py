"""A PostgreSQL primary with a streaming standby, from this machine's binaries, for the
failover scenarios (tests/clusters/test_postgres_failover.py) and anything else that
wants one (a soak script: no pytest in here).

    with replicated_pair(synchronous=True) as pair:
        pair.dsn          # both hosts, target_session_attrs=read-write: follows the primary
        pair.kill_primary()
        pair.promote()

The standby is a pg_basebackup of the primary (`-X stream -R`) streaming through a
physical replication slot, so the primary keeps every WAL segment the standby has not
received. Synchronous: the primary lists the standby in synchronous_standby_names, and
with synchronous_commit=on a COMMIT returns only once the standby has flushed it.
Asynchronous: a COMMIT returns at once, and what the standby had not received when the
primary died is gone after the promotion (`hold_replication` makes that window
deterministic). Both clusters run as the `postgres` user when root, as
outbox_relay.demo.local_postgres does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.demo import local_postgres
from outbox_relay.errors import OutboxRelayError
from tests.support.waiting import wait_for

STANDBY_NAME = "standby1"  # the standby's cluster_name, its walreceiver's application_name
SLOT = "standby1_slot"  # the standby's physical slot on the primary
# Logical decoding too (the WAL source's scenario); durability on: SIGKILL is the fault.
SETTINGS = {
    **local_postgres.LOGICAL_DECODING,
    "max_connections": "100",
    "wal_keep_size": "64MB",
    "hot_standby": "on",
    "synchronous_commit": "on",
}


@dataclass
class ReplicatedPair:
    """The two clusters; `primary` and `standby` keep their roles' names from the start
    (after a promotion `standby` is the read-write one)."""

    primary: local_postgres.LocalPostgres
    standby: local_postgres.LocalPostgres
    synchronous: bool

    def dsn_for(self, dbname: str = "postgres") -> str:
        """Both hosts, the primary first; libpq tries them in order and keeps the first
        that accepts writes, so a client that reconnects lands on whichever is primary."""
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.primary.port},{self.standby.port} "
            f"user=postgres dbname={dbname} target_session_attrs=read-write"
        )

    @property
    def dsn(self) -> str:
        return self.dsn_for()

    def replicating(self) -> bool:
        """Whether the standby streams from the primary now (and, synchronous, is the
        primary's synchronous standby)."""
        want = "sync" if self.synchronous else "async"
        with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                (STANDBY_NAME,),
            ).fetchall()
        return [r[0] for r in rows] == [want]

    def caught_up(self) -> bool:
        """Whether the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        with psycopg.connect(self.standby.dsn, autocommit=True) as conn:
            replayed = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)).fetchone()
        return bool(replayed and replayed[0])

    def walsender_pid(self) -> int:
        with psycopg.connect(self.primary.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pid FROM pg_stat_replication WHERE application_name = %s", (STANDBY_NAME,)
            ).fetchone()
        if row is None:
            raise OutboxRelayError("the standby is not connected to the primary")
        return int(row[0])

    @contextlib.contextmanager
    def hold_replication(self) -> Iterator[None]:
        """Freeze the primary's walsender (SIGSTOP): the primary goes on committing (an
        asynchronous standby is waited for by no one) and the standby receives nothing,
        as a standby that has fallen behind. SIGCONT at the end, if the walsender still
        exists (a SIGKILL of the primary ends it stopped or not)."""
        pid = self.walsender_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and every one of its processes at once: a
        crashed host, no shutdown checkpoint, no last WAL sent, every client's connection
        reset."""
        kill_cluster(self.primary)

    def cut_off_primary(self) -> contextlib.AbstractContextManager[None]:
        """The primary's host gone from the network (`cut_off`) while its processes run."""
        return cut_off(self.primary.port)

    def freeze_primary(self) -> None:
        """Every process of the primary stopped (SIGSTOP), its sockets left open: a hung
        server whose host's kernel still acknowledges, so no TCP timeout ever fires.
        `kill_primary` ends it (a SIGKILL reaches a stopped process)."""
        pid_file = self.primary.datadir / "data" / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        os.kill(postmaster, signal.SIGSTOP)
        for child in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)

    def stop_primary(self, mode: str = "fast") -> None:
        self.primary.stop(mode)

    def promote(self, timeout: float = 60) -> None:
        """Promote the standby (pg_ctl promote -w) and wait until it accepts writes."""
        self.standby._run(
            str(self.standby.bindir / "pg_ctl"), "-D", str(self.standby.datadir / "data"), "-w", "promote"
        )

        def writable() -> bool:
            with psycopg.connect(self.standby.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()
            return bool(row and row[0])

        wait_for(writable, timeout, "the promoted standby accepting writes")


def kill_cluster(cluster: local_postgres.LocalPostgres) -> None:
    """SIGKILL a cluster's postmaster and its children. The postmaster is stopped first so
    it cannot fork a new child between the listing and the kill."""
    pid_file = cluster.datadir / "data" / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    for child in _children(postmaster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    os.kill(postmaster, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{postmaster}").exists() or _zombie(postmaster), 30, "the primary gone")


@contextlib.contextmanager
def cut_off(port: int) -> Iterator[None]:
    """Drop every loopback packet to and from `port` (iptables, as root): a host that
    vanished, as a crashed machine or a network partition, with no reset and no answer,
    so a connection to it fails only by its own timeouts. The rules go at the end."""
    rules = [["INPUT", "-i", "lo", "-p", "tcp", side, str(port), "-j", "DROP"] for side in ("--dport", "--sport")]
    added: list[list[str]] = []
    try:
        for rule in rules:
            _iptables("-I", rule)
            added.append(rule)
        yield
    finally:
        for rule in added:
            _iptables("-D", rule)


def _iptables(action: str, rule: list[str]) -> None:
    try:
        result = subprocess.run(["iptables", "-w", "10", action, *rule], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise OutboxRelayError("cutting a server off the network needs iptables (apt-get install iptables)") from None
    if result.returncode != 0:
        raise OutboxRelayError(
            f"iptables {action} failed (cutting a server off the network needs root): {result.stderr.strip()}"
        )


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (2nd field) is in parentheses and may hold spaces.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
    return found


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def _standby_of(primary: local_postgres.LocalPostgres) -> local_postgres.LocalPostgres:
    """A pg_basebackup of `primary` (streamed WAL, a physical slot created for it,
    standby.signal and primary_conninfo written), not started."""
    datadir = Path(tempfile.mkdtemp(prefix="outbox-relay-pg-standby-"))
    if primary.run_as:
        entry = pwd.getpwnam(primary.run_as)
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
    standby = local_postgres.LocalPostgres(primary.bindir, datadir, local_postgres.free_port(), primary.run_as)
    try:
        standby._run(
            str(primary.bindir / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(datadir / "data"), "-X", "stream", "-R", "-C", "-S", SLOT, "--no-sync", "--checkpoint=fast"),
        )
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    return standby


@contextlib.contextmanager
def replicated_pair(
    *, synchronous: bool, setup: Callable[[psycopg.Connection[Any]], None] | None = None
) -> Iterator[ReplicatedPair]:
    """A primary and its streaming standby, both running; `setup` is called with a
    connection to the primary before the base backup (its commit then), so the standby
    starts with what it made (the outbox schema). Synchronous: the
    primary's synchronous_standby_names names the standby from when it streams (set with
    ALTER SYSTEM on the primary alone: the standby's copy of the configuration predates
    it, so after a promotion the new primary waits for no standby)."""
    primary = local_postgres.create(SETTINGS)
    standby: local_postgres.LocalPostgres | None = None
    try:
        if setup is not None:
            with psycopg.connect(primary.dsn) as conn:
                setup(conn)
        standby = _standby_of(primary)
        standby.start({**SETTINGS, "cluster_name": STANDBY_NAME})
        pair = ReplicatedPair(primary, standby, synchronous)
        if synchronous:
            with psycopg.connect(primary.dsn, autocommit=True) as conn:
                names = sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(STANDBY_NAME))
                conn.execute(names)
                conn.execute("SELECT pg_reload_conf()")
        wait_for(pair.replicating, 60, "the standby streaming from the primary")
        yield pair
    finally:
        if standby is not None:
            local_postgres.destroy(standby)
        local_postgres.destroy(primary)
