"""What the WAL source is doing and how far behind its slot is: its metrics and its
part of ``/readyz`` (issue 18, point 7: a slot that no relay confirms keeps WAL until
the disk is full).

One ``WalWatch`` per WAL source. The runner tells it its state, the relay what it reads,
confirms, pauses and parks; ``run_watched`` binds it to the relay's metrics and reads the
slot beside the stream.

- State (``outbox_relay_wal_source_state{state}``): ``starting``; ``streaming`` (also
  while a relay in table mode drains a slot a switch left); ``paused`` (the relay holds a
  part for a broker that is away and reads nothing more: relay.py's outage pause, until
  the broker answers or ``park_after`` has passed and it parks instead); ``standby``
  (another relay streams the slot); ``restarting`` (a database or replication error, with
  its line); ``stopped`` (the relay cannot go on, with its line, or is shutting down);
  ``off`` (table mode, no slot: nothing to stream).
- Slot lag in bytes, read from ``pg_replication_slots`` every ``poll_interval`` seconds
  by every relay watching the slot, standbys and restarting ones included: the slot is
  the cluster's, so each reports the same figure, and it is still reported while the
  streaming relay is gone or cannot stream (when the stream alone could not say it).
  Two figures, both from the server's current WAL position:
  - ``lag_bytes``, minus ``confirmed_flush_lsn``: WAL written since the last position the
    relay confirmed, its backlog (``status`` shows the same);
  - ``retained_bytes``, minus ``restart_lsn``: the WAL the slot keeps on disk, the hazard
    itself and what ``max_slot_wal_keep_size`` measures. Never below ``lag_bytes``: decoding
    restarts from the oldest transaction running at the last position confirmed, so a
    long open transaction (any, in the cluster) keeps WAL while the relay is caught up.
    The alert watches this one.
- Slot lag in seconds: the age of the oldest committed transaction the relay has read and
  not confirmed, from its commit time (the stream's Begin); 0 when everything read is
  confirmed. The slot records a position, not a time, so only the streaming relay knows
  it (a standby says 0; ``status`` cannot show it). The commit time is the server's
  clock: skew between the hosts shifts it (never below 0).
- ``outbox_relay_wal_messages_parked_total{reason}``: messages parked into the table,
  by the outcome that parked them: ``transient``, ``unavailable`` (waited past
  ``park_after``), ``permanent`` (refused: a dead letter in the table), ``held`` (not
  attempted: its key is held by the table).

Readiness: not ready while ``restarting`` or ``stopped`` (the source cannot stream; the
line says why). Ready while ``standby``: a standby replica is healthy, doing its job
(ready to take over within ``standby_interval``; its table workers drain parked
messages), and a replica never ready would stall every rolling update (a Deployment
waits for the new pods to be ready) and count against the PodDisruptionBudget. Ready
while ``paused`` as far as the source goes: the broker that is away already makes the
relay unready. In table mode with no slot (``off``) it adds nothing to ``/readyz``.

Lifecycle: the methods are called from the relay's event loop (no locking);
``run_watched`` once per source.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from typing import Any

import psycopg
import structlog

from outbox_relay.connections import PREPARE_THRESHOLD, connect_once
from outbox_relay.errors import DatabaseError, first_line
from outbox_relay.models import RecordKind
from outbox_relay.observability.metrics import WAL_STATES, RelayMetrics
from outbox_relay.sources.wal import pgoutput, slot
from outbox_relay.sources.wal.outcomes import Parked

log = structlog.get_logger("outbox_relay.wal")

LAG_POLL_S = 5.0  # as the relay's heartbeat, which reads the table's gauges
NOT_READY = frozenset({"restarting", "stopped"})
_PARK_REASONS = {RecordKind.RETRY: "transient", RecordKind.WAIT: "unavailable", RecordKind.DEAD: "permanent"}


class WalWatch:
    """The WAL source's state and lag; see the module docstring."""

    def __init__(self, slot_name: str, *, poll_interval: float = LAG_POLL_S):
        self.slot = slot_name
        self.state = "starting"
        self.reason: str | None = None
        self._poll_interval = poll_interval
        self._metrics: RelayMetrics | None = None
        self._unconfirmed_since: int | None = None  # commit time (pgoutput's microseconds)

    # -- the runner ---------------------------------------------------------------------

    def set_state(self, state: str, reason: str | None = None) -> None:
        if state not in WAL_STATES:
            raise ValueError(f"unknown WAL source state {state!r}")
        if state in {"standby", "off"}:
            # Another relay has the slot, or there is none: what this one read and did
            # not confirm is not its to report (the slot hands it out again).
            self._unconfirmed_since = None
        self.state, self.reason = state, reason
        if self._metrics is not None:
            self._metrics.wal_state(state)

    # -- the relay ----------------------------------------------------------------------

    def reading(self, commit_time: int) -> None:
        """A part of a committed transaction is in hand (the oldest one counts)."""
        if self._unconfirmed_since is None:
            self._unconfirmed_since = commit_time

    def confirmed(self) -> None:
        """Everything read is confirmed."""
        self._unconfirmed_since = None

    def paused(self, paused: bool) -> None:
        """The relay holds its part for a broker that is away (True), or goes on (False)."""
        if paused and self.state == "streaming":
            self.set_state("paused", "a broker is away: the part in hand waits, the slot keeps the WAL")
        elif not paused and self.state == "paused":
            self.set_state("streaming")

    def parked(self, parked: Sequence[Parked]) -> None:
        if self._metrics is None:
            return
        counts: dict[str, int] = {}
        for _, record in parked:
            reason = "held" if record is None else _PARK_REASONS.get(record.kind, "held")
            counts[reason] = counts.get(reason, 0) + 1
        for reason, n in counts.items():
            self._metrics.wal_parked.labels(reason).inc(n)

    def transaction(self, broker: str, outcome: str) -> None:
        """An exactly-once Kafka transaction ended: committed, aborted, unsure or fenced."""
        if self._metrics is not None:
            self._metrics.kafka_transactions.labels(outcome).inc()

    # -- what it shows ------------------------------------------------------------------

    def lag_seconds(self) -> float:
        since = self._unconfirmed_since
        return 0.0 if since is None else max(0.0, (pgoutput.pg_now() - since) / 1e6)

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        """Whether the source lets the relay be ready, and its entry in /readyz's JSON;
        None when it has nothing to say (off)."""
        if self.state == "off":
            return None
        entry: dict[str, Any] = {"state": self.state, "slot": self.slot}
        if self.reason is not None:
            entry["reason"] = self.reason
        return self.state not in NOT_READY, {"wal": entry}

    def _show_slot(self, state: slot.SlotState | None) -> None:
        assert self._metrics is not None
        # No slot (dropped after a drain): nothing kept. A lost slot has no positions; the
        # relay stops on it, and the last figures stand.
        lag = 0 if state is None else state.lag_bytes
        retained = 0 if state is None else state.retained_bytes
        if lag is not None:
            self._metrics.wal_slot_lag_bytes.set(lag)
        if retained is not None:
            self._metrics.wal_slot_retained_bytes.set(retained)

    # -- running ------------------------------------------------------------------------

    async def run_watched(
        self,
        source: Coroutine[Any, Any, None],
        metrics: RelayMetrics,
        dsn: str,
        *,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
    ) -> None:
        """Run `source` (the runner's stream) with the slot read beside it, the state and
        lag shown in `metrics`; ``stopped`` with its line when it raises. If the slot
        reader fails unexpectedly, the source is stopped and that error raised: figures
        that silently stop moving would hide the very hazard they watch."""
        self._metrics = metrics
        metrics.wal_state(self.state)
        metrics.wal_slot_lag_seconds.set_function(self.lag_seconds)
        stream = asyncio.create_task(source, name="wal-stream")
        reader = asyncio.create_task(self._read_slot(dsn, prepare_threshold), name="wal-slot-lag")
        try:
            await asyncio.wait({stream, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream
                raise reader.exception() or RuntimeError("the WAL slot's reader ended")
            await stream
        except Exception as exc:
            self.set_state("stopped", first_line(exc))
            raise
        finally:
            for task in (stream, reader):
                task.cancel()
            await asyncio.gather(stream, reader, return_exceptions=True)
        self.set_state("stopped", "the relay is stopping")

    async def _read_slot(self, dsn: str, prepare_threshold: int | None) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        failing = False
        try:
            while True:
                if self.state == "off":
                    if conn is not None:  # nothing to watch until the relay restarts
                        await conn.close()
                        conn = None
                    self._show_slot(None)
                else:
                    try:
                        if conn is None or conn.closed:
                            conn = await connect_once(dsn, autocommit=True, prepare_threshold=prepare_threshold)
                        self._show_slot(await slot.read_state_async(conn, self.slot))
                        failing = False
                    except (psycopg.Error, DatabaseError, OSError) as exc:
                        # The database is away: the runner says so; keep the last figures.
                        if not failing:
                            log.warning("wal_slot_lag_unread", slot=self.slot, error=first_line(exc))
                            failing = True
                        if conn is not None:
                            with contextlib.suppress(Exception):
                                await conn.close()
                            conn = None
                await asyncio.sleep(self._poll_interval)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
