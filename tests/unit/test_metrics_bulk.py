"""observe_many: a batch's observations in one update per bucket, the same exposition
as one observe() each (it reads prometheus_client's private fields: this is the test
that notices when they change)."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from outbox_relay.observability.metrics import LATENCY_BUCKETS, observe_many


def exposition(amounts: list[float], bulk: bool) -> dict[str, float]:
    registry = CollectorRegistry()
    histogram = Histogram("latency", "", buckets=LATENCY_BUCKETS, registry=registry)
    if bulk:
        observe_many(histogram, amounts)
    else:
        for amount in amounts:
            histogram.observe(amount)
    # Each sample by name and labels; _created differs between two histograms: left out.
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_bulk_observations_give_the_same_buckets_count_and_sum_as_one_observe_each() -> None:
    rng = random.Random()
    # Every bound itself (a bucket takes what is at most its bound), values between and
    # beyond the last bound, zero.
    amounts = [*LATENCY_BUCKETS, 0.0, 1e6]
    amounts += [rng.uniform(0, 400) for _ in range(500)] + [rng.uniform(0, 0.02) for _ in range(500)]
    rng.shuffle(amounts)
    expected = exposition(amounts, bulk=False)
    got = exposition(amounts, bulk=True)
    assert 'latency_bucket{le="0.001"}' in expected and expected["latency_count"] == len(amounts)
    # Bucket counts and the count exactly; the sum as floats add up (one sum() against
    # one inc() each may differ in the last bits).
    assert {k: v for k, v in got.items() if k != "latency_sum"} == {
        k: v for k, v in expected.items() if k != "latency_sum"
    }
    assert math.isclose(got["latency_sum"], expected["latency_sum"], rel_tol=1e-12)


def test_no_observations_change_nothing() -> None:
    assert exposition([], bulk=True) == exposition([], bulk=False)


def test_a_histogram_without_the_private_fields_gets_one_observe_each() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    plain = Plain()
    observe_many(plain, [0.5, 2.0])  # type: ignore[arg-type]
    assert plain.seen == [0.5, 2.0]
