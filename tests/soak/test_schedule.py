"""The soak's fault schedule, without services: the same seed draws the same schedule,
a kind whose services the soak lacks is never drawn, a fault that could not be healed
before the end is skipped, one that used up what it needs is not injected again, and
a failed heal stops the schedule."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from soak import faults
from soak.environment import Soak


class FakeSoak(Soak):
    """Only what the schedule asks of a soak: its capabilities."""

    def __init__(self, extra: dict[str, Any] | None = None, kafka: object = "broker"):
        self.extra = extra or {}
        self.kafka = kafka  # type: ignore[assignment]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A registry of test kinds only; what each inject and heal did, in order."""
    done: list[str] = []
    monkeypatch.setattr(faults, "REGISTRY", {})

    def kind(name: str, needs: set[str], heals_in: float = 0.0, heal_fails: bool = False) -> None:
        def inject(soak: Soak, rng: random.Random) -> faults.Injected:
            done.append(f"inject {name}")
            if "standby" in needs:
                soak.extra.pop("standby")

            def heal() -> None:
                done.append(f"heal {name}")
                if heal_fails:
                    raise RuntimeError("did not come back")

            return faults.Injected(name, heal)

        faults.fault(name, needs=needs, hold=(0, 0), heals_in=heals_in, in_flight="relay")(inject)

    kind("quick", {"relays"})
    kind("slow", {"kafka"}, heals_in=3600)
    kind("once", {"standby"})
    kind("broken", {"broken"}, heal_fails=True)
    return done


def test_the_same_seed_draws_the_same_schedule_of_available_kinds(registry: list[str]) -> None:
    kinds = faults.available(FakeSoak())
    assert sorted(k.name for k in kinds) == ["quick", "slow"], "no standby, nothing broken: never drawn"
    first = faults.plan(kinds, 7, 600, (5, 15))
    assert first == faults.plan(kinds, 7, 600, (5, 15))
    assert first != faults.plan(kinds, 8, 600, (5, 15))
    assert sum(p.gap + p.hold for p in first) <= 600
    with pytest.raises(ValueError, match="unknown fault kinds: nope"):
        faults.available(FakeSoak(), ["quick", "nope"])


def run(soak: Soak, kinds: list[str], seconds: float = 60) -> faults.Schedule:
    planned = [faults.Planned(kind, 0.0, 0.0) for kind in kinds]
    started = time.monotonic()
    schedule = faults.Schedule(soak, planned, started, started + seconds, lambda: 0, seed=1)
    schedule.run(lambda gap: False, lambda message: None)
    return schedule


def test_a_fault_that_would_outlast_the_soak_is_skipped_and_one_used_up_is_not_injected_again(
    registry: list[str],
) -> None:
    schedule = run(FakeSoak({"standby": object()}), ["slow", "once", "quick", "once"])
    assert registry == ["inject once", "heal once", "inject quick", "heal quick"]
    assert [e.kind for e in schedule.executed] == ["once", "quick"]
    assert all(e.t_healed is not None and not e.error for e in schedule.executed)


def test_a_failed_heal_stops_the_schedule(registry: list[str]) -> None:
    schedule = run(FakeSoak({"broken": object()}), ["broken", "quick"])
    assert registry == ["inject broken", "heal broken"]
    assert schedule.executed[0].error == "heal: RuntimeError: did not come back"


def test_every_registered_kind_says_what_it_needs_and_has_in_flight() -> None:
    assert {"relay_sigkill", "relay_sigterm", "kafka_kill", "postgres_immediate"} <= set(faults.REGISTRY)
    for kind in faults.REGISTRY.values():
        assert kind.needs and kind.in_flight in faults.IN_FLIGHT and kind.heals_in > 0, kind
        assert kind.inject.__doc__, f"{kind.name}: say what the fault is"


def test_soak_capabilities() -> None:
    assert FakeSoak().capabilities() == {"relays", "postgres", "kafka"}
    assert FakeSoak({"kafka_cluster": object()}, kafka=None).capabilities() == {"relays", "postgres", "kafka_cluster"}
