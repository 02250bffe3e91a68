"""What the soak samples while it runs, every few seconds: each relay's RSS (from
/proc), the outbox's lag (pending messages, the oldest one's age), the table's rows
and dead tuples (pg_stat_user_tables), and how many messages the writers committed.
A value that cannot be read (PostgreSQL restarting) is None."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from soak.environment import Replicas
from tests.support.outbox import lag, table_stats


@dataclass
class Sample:
    t: float  # seconds since the soak began
    committed: int
    pending: int | None
    oldest_pending_s: float | None
    rows: int | None
    dead_tuples: int | None
    rss_kb: dict[str, int | None]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sampler(threading.Thread):
    def __init__(self, dsn: str, replicas: Replicas, committed: Callable[[], int], started: float, interval: float):
        super().__init__(daemon=True)
        self.dsn, self.replicas, self.committed = dsn, replicas, committed
        self.started, self.interval = started, interval
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.samples.append(self.take())

    def take(self) -> Sample:
        t = time.monotonic() - self.started
        self.replicas.restart_the_dead(t)
        pending = oldest = rows = dead = None
        with contextlib.suppress(psycopg.Error):
            pending, oldest = lag(self.dsn, connect_timeout=2)
            rows, dead, _ = table_stats(self.dsn, connect_timeout=2)
        return Sample(round(t, 2), self.committed(), pending, oldest, rows, dead, self.replicas.rss())

    def stop(self) -> list[Sample]:
        self._halt.set()
        self.join(30)
        return self.samples
