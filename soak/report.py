"""The soak's outputs: summary.json, and soak.png: throughput, lag, the relays' RSS and
the outbox table's dead tuples over time, with each fault's span shaded."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from soak.faults import Executed
from soak.sampling import Sample

BUCKET_S = 5.0  # throughput is counted over windows this long


def throughput(first_appended: list[float], wall_start: float, seconds: float) -> list[tuple[float, float]]:
    """(window start, messages first delivered per second in it), from the broker's
    append times: what reached Kafka, not what a relay claims it sent."""
    counts = Counter(int((t - wall_start) // BUCKET_S) for t in first_appended)
    windows = int(seconds // BUCKET_S) + 1
    return [(i * BUCKET_S, counts.get(i, 0) / BUCKET_S) for i in range(max(windows, max(counts, default=0) + 1))]


def committed_rate(samples: list[Sample]) -> list[tuple[float, float]]:
    return [(b.t, (b.committed - a.committed) / (b.t - a.t)) for a, b in itertools.pairwise(samples) if b.t > a.t]


def write_json(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def plot(
    path: Path,
    samples: list[Sample],
    delivered: list[tuple[float, float]],
    executed: list[Executed],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    tput, lag, rss, dead = axes
    tput.plot([t for t, _ in delivered], [r for _, r in delivered], label="first delivered to Kafka / s", lw=1)
    rate = committed_rate(samples)
    tput.plot([t for t, _ in rate], [r for _, r in rate], label="committed by the writers / s", lw=1, alpha=0.7)
    tput.set_ylabel("messages / s")
    tput.legend(loc="upper right", fontsize=8)

    ts = [s.t for s in samples]
    lag.plot(ts, [s.pending for s in samples], label="pending messages", color="tab:red", lw=1)
    lag.set_ylabel("pending")
    age = lag.twinx()
    age.plot(ts, [s.oldest_pending_s for s in samples], label="oldest pending (s)", color="tab:purple", lw=1)
    age.set_ylabel("oldest pending, s")
    lag.legend(loc="upper left", fontsize=8)
    age.legend(loc="upper right", fontsize=8)

    for name in sorted({n for s in samples for n in s.rss_kb}):
        values = [v / 1024 if (v := s.rss_kb.get(name)) else None for s in samples]
        rss.plot(ts, values, label=f"relay {name}", lw=1)
    rss.set_ylabel("RSS, MiB")
    rss.legend(loc="upper right", fontsize=8)

    dead.plot(ts, [s.dead_tuples for s in samples], label="dead tuples", lw=1)
    dead.plot(ts, [s.rows for s in samples], label="rows", lw=1, alpha=0.7)
    dead.set_ylabel("outbox.messages")
    dead.set_xlabel("seconds since the soak began")
    dead.legend(loc="upper right", fontsize=8)

    for fault in executed:
        end = fault.t_healed if fault.t_healed is not None else fault.t_injected + fault.hold
        for ax in axes:
            ax.axvspan(fault.t_injected, end, color="grey", alpha=0.15, lw=0)
        tput.annotate(
            fault.kind, (fault.t_injected, 1), xycoords=("data", "axes fraction"), fontsize=6, rotation=90, va="top"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
