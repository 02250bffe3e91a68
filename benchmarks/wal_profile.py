"""Where the relay's CPU goes while it drains in WAL mode: py-spy's collapsed stacks
(samples of Python threads on CPU) summed by part of the path a message takes.

Each sample is charged to the innermost frame that belongs to a known part (so time
inside aiokafka called by the adapter is the client's, and the adapter's own lines are
the adapter's); the inclusive table shows how much of the time runs under each of the
relay's main functions, whatever they call.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

# (part, a substring of the frame's file) in no particular order: the innermost match wins.
PARTS = [
    ("decode: pgoutput protocol", "sources/wal/pgoutput.py"),
    ("decode: outbox frame", "sources/wal/framing.py"),
    ("decode: transaction parts", "sources/wal/transactions.py"),
    ("stream: COPY reads, status updates, confirm", "sources/wal/stream.py"),
    ("WAL relay: Message objects, held keys, rounds", "sources/wal/relay.py"),
    ("WAL relay: outcomes", "sources/wal/outcomes.py"),
    ("WAL relay: parking, held-keys query", "sources/wal/parking.py"),
    ("table engine: claim and outcome statements", "engine/store.py"),
    ("engine: dispatch, waves, routing", "outbox_relay/engine/"),
    ("models (Message)", "outbox_relay/models.py"),
    ("adapter: outbox-relay's Kafka adapter, rounds", "outbox_relay_adapters/"),
    ("adapter: outbox-relay's Kafka adapter, rounds", "/adapters/"),
    ("Kafka client: aiokafka", "aiokafka/"),
    ("Kafka client: librdkafka (confluent_kafka)", "confluent_kafka/"),
    ("psycopg / libpq", "psycopg/"),
    ("logging", "structlog/"),
    ("logging", "logging/"),
    ("asyncio event loop", "asyncio/"),
    ("selectors (the loop's epoll)", "selectors.py"),
]

# Functions whose inclusive share is worth knowing: (label, function name, file substring).
INCLUSIVE = [
    ("stream: reading the slot (WalStream.__anext__)", "WalStream.__anext__", "sources/wal/stream.py"),
    ("stream: standby status updates (send_status)", "WalStream.send_status", "sources/wal/stream.py"),
    ("stream: confirm", "WalStream.confirm", "sources/wal/stream.py"),
    ("decode: pgoutput.decode", "decode", "sources/wal/pgoutput.py"),
    ("decode: framing.decode", "decode", "sources/wal/framing.py"),
    ("relay: frames to Messages (WalRelay._messages)", "WalRelay._messages", "sources/wal/relay.py"),
    ("relay: held keys (Parking.held_keys)", "Parking.held_keys", "sources/wal/parking.py"),
    ("relay: one part, all of it (WalRelay._handle)", "WalRelay._handle", "sources/wal/relay.py"),
    ("engine: Dispatcher.dispatch", "Dispatcher.dispatch", "engine/dispatch.py"),
    ("adapter: publish", "publish", "adapters/"),
    ("relay's observers (metrics, the benchmark's)", "batch_recorded", "outbox_relay/"),
    ("Kafka client: aiokafka sender task", "Sender._sender_routine", "aiokafka/"),
]


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def _file(frame: str) -> str:
    return frame.rsplit("(", 1)[-1] if "(" in frame else frame


def _function(frame: str) -> str:
    return frame.split(" (", 1)[0].strip()


def _part(frames: list[str]) -> str:
    for frame in reversed(frames):
        where = _file(frame)
        for part, needle in PARTS:
            if needle in where:
                return part
    return "other (interpreter, stdlib, startup)"


def read(collapsed: Path) -> list[tuple[list[str], int]]:
    samples = []
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((_frames(stack), int(count)))
    return samples


def summary(collapsed: Path, run: dict[str, Any]) -> str:
    samples = read(collapsed)
    total = sum(n for _, n in samples) or 1
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in samples:
        parts[_part(frames)] += n
        if frames:
            leaves[frames[-1]] += n
        for label, function, needle in INCLUSIVE:
            if any(_function(f).endswith(function) and needle in _file(f) for f in frames):
                inclusive[label] += n
    lines = [
        f"### {run['workload']}",
        "",
        f"py-spy, 200 samples/s of the relay process's Python threads on CPU, while it drained them to Kafka "
        f"in {run['drain_s']} s ({run['msgs_per_s']:,} msg/s under the profiler): {total} samples "
        f"({100 * total / max(1.0, 200 * run['drain_s']):.0f}% of the drain's wall time on CPU).",
        "",
        "| part (innermost frame that belongs to one) | share of samples |",
        "|---|---|",
    ]
    lines += [f"| {part} | {100 * n / total:.1f}% |" for part, n in parts.most_common()]
    lines += ["", "| under (inclusive) | share of samples |", "|---|---|"]
    # Only the functions this drain ran: the table source has no WAL stream to show.
    lines += [f"| {label} | {100 * inclusive[label] / total:.1f}% |" for label, _, _ in INCLUSIVE if inclusive[label]]
    lines += ["", "| innermost frame (self time), top 25 | share |", "|---|---|"]
    lines += [f"| `{leaf}` | {100 * n / total:.1f}% |" for leaf, n in leaves.most_common(25)]
    return "\n".join(lines) + "\n"
