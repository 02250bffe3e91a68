"""CPU time read from /proc, for CPU per message: a process (this one, the Kafka
broker's JVM), a whole PostgreSQL server, and a `Window` that reads them all at its
start and end. Linux only; a service that is not a local process (a DSN or bootstrap
from the environment, a container) gives None: not measurable here."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (index 0: field 3), or None if gone."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()
    return None


class PgCpu:
    """CPU time of one PostgreSQL server's processes, read from /proc: the postmaster
    and every child (backends, walsenders, background workers). A child that exits
    between two readings is not lost: the postmaster reaps it, and the kernel adds its
    time to the postmaster's cutime/cstime. Available only for a server on this machine."""

    def __init__(self, dsn: str):
        with psycopg.connect(dsn, autocommit=True) as conn:
            fields = _stat(conn.info.backend_pid)  # while the backend lives
        self.postmaster = int(fields[1]) if fields else None

    @property
    def available(self) -> bool:
        return self.postmaster is not None

    def total(self) -> float:
        """Seconds of CPU the server has spent so far (children reaped included)."""
        if self.postmaster is None:
            return float("nan")
        own = _stat(self.postmaster)
        ticks = sum(int(own[i]) for i in (11, 12, 13, 14)) if own else 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            fields = _stat(int(entry.name))
            if fields and fields[1] == str(self.postmaster):
                ticks += int(fields[11]) + int(fields[12])
        return ticks / CLOCK_TICKS

    @staticmethod
    def of(pid: int) -> float:
        """Seconds of CPU of one process (a backend), 0 if gone."""
        fields = _stat(pid)
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0


def micros_per_message(seconds: float, count: int) -> float | None:
    return None if seconds != seconds else round(seconds * 1e6 / count, 1)  # NaN: not measurable here


def process_cpu(pid: int | None) -> float:
    """Seconds of CPU of a whole process (all its threads); NaN without one."""
    return PgCpu.of(pid) if pid is not None else float("nan")


@dataclass
class Window:
    """CPU spent between `start()` and `stop()`: by this process (the relay or the raw
    producer under test: `time.process_time` counts every thread, librdkafka's too),
    by the PostgreSQL server (`pg`, all its processes) and by the broker process
    (`broker_pid`), and the wall time."""

    pg: PgCpu | None = None
    broker_pid: int | None = None
    _start: tuple[float, float, float, float] = field(default=(0.0, 0.0, 0.0, 0.0), init=False)
    _end: tuple[float, float, float, float] | None = field(default=None, init=False)

    def _read(self) -> tuple[float, float, float, float]:
        pg = self.pg.total() if self.pg is not None and self.pg.available else float("nan")
        return time.perf_counter(), time.process_time(), pg, process_cpu(self.broker_pid)

    def start(self) -> None:
        self._start, self._end = self._read(), None

    def stop(self) -> None:
        self._end = self._read()

    def per_message(self, count: int) -> dict[str, float | None]:
        """µs of CPU per message for each part, msg/s, and cores in use (all parts' CPU
        over the wall time: 2.0 is both cores of a 2-core machine busy throughout)."""
        if self._end is None:
            raise RuntimeError("the window was never closed")
        wall, own, pg, broker = (end - start for end, start in zip(self._end, self._start, strict=True))
        parts = [x for x in (own, pg, broker) if x == x]
        return {
            "msgs_per_s": round(count / wall),
            "process_cpu_us": micros_per_message(own, count),
            "pg_cpu_us": micros_per_message(pg, count),
            "broker_cpu_us": micros_per_message(broker, count),
            "cores_in_use": round(sum(parts) / wall, 2),
        }
