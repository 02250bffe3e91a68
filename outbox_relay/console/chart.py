"""The last hour as charts, drawn on the server as SVG: no script, no inline style (the
console's CSP allows neither), readable by a screen reader through its title.

One bar per minute for the messages published (failures stacked on top in the failure
colour), and a line for the lag (the oldest pending message's age, as the relays saw
it). Minutes without a sample are gaps: no relay reported, which is itself news.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from outbox_relay.console.read_model import Sample

WIDTH, HEIGHT, PAD = 600, 120, 4
MINUTES = 60


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    y: float
    height: float
    kind: str  # published or failed


@dataclass(frozen=True)
class Chart:
    """What the template draws: bars, a polyline, the scale, and a sentence that says
    it all to someone who cannot see it."""

    bars: list[Bar]
    line: str  # SVG polyline points ("" when there is no lag sample)
    dots: list[tuple[float, float]]  # the line's points, drawn too: one sample is a dot
    peak: float
    label: str  # the scale, written in the chart's corner
    summary: str
    width: int = WIDTH
    height: int = HEIGHT


def _slot_of(samples: list[Sample], now: datetime) -> dict[int, Sample]:
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=MINUTES - 1)
    slots = {}
    for sample in samples:
        index = int((sample.minute - start).total_seconds() // 60)
        if 0 <= index < MINUTES:
            slots[index] = sample
    return slots


def rates(samples: list[Sample], now: datetime) -> Chart:
    slots = _slot_of(samples, now)
    peak = max((s.published + s.failed for s in slots.values()), default=0)
    step = (WIDTH - 2 * PAD) / MINUTES
    bars: list[Bar] = []
    for index, s in slots.items():
        x = PAD + index * step
        scale = (HEIGHT - 2 * PAD) / peak if peak else 0.0
        ok = s.published * scale
        bad = s.failed * scale
        bars.append(Bar(round(x, 1), round(step * 0.8, 1), round(HEIGHT - PAD - ok, 1), round(ok, 1), "published"))
        if bad:
            bars.append(
                Bar(round(x, 1), round(step * 0.8, 1), round(HEIGHT - PAD - ok - bad, 1), round(bad, 1), "failed")
            )
    published = sum(s.published for s in slots.values())
    failed = sum(s.failed for s in slots.values())
    summary = (
        f"Last hour: {published:,} published, {failed:,} failed; the busiest minute {peak:,} messages; "
        f"{MINUTES - len(slots)} of {MINUTES} minutes without a relay's sample."
    )
    return Chart(bars, "", [], float(peak), f"busiest minute: {peak:,} messages", summary)


def lag(samples: list[Sample], now: datetime) -> Chart:
    slots = {i: s for i, s in _slot_of(samples, now).items() if s.lag_s is not None}
    peak = max((s.lag_s or 0.0 for s in slots.values()), default=0.0)
    step = (WIDTH - 2 * PAD) / MINUTES
    dots = []
    for index in sorted(slots):
        value = slots[index].lag_s or 0.0
        y = HEIGHT - PAD - (value / peak * (HEIGHT - 2 * PAD) if peak else 0.0)
        dots.append((round(PAD + (index + 0.4) * step, 1), round(y, 1)))
    latest = slots[max(slots)].lag_s if slots else None
    summary = (
        "Last hour: no lag sample."
        if latest is None
        else f"Last hour: the lag was at most {peak:.1f} s; now {latest:.1f} s."
    )
    line = " ".join(f"{x},{y}" for x, y in dots)
    return Chart([], line, dots, peak, f"top: {peak:.1f} s", summary)
