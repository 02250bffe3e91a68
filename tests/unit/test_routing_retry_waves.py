"""Router (first match wins), retry.Backoff, and engine.dispatch.waves (per-key order)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox_relay.config import RouteConfig
from outbox_relay.engine.dispatch import waves
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router, Target
from outbox_relay.models import Message
from tests.support.factories import message

# --- routing ------------------------------------------------------------------------


def router(*routes: tuple[str, str] | tuple[str, str, str]) -> Router:
    configs = []
    for route in routes:
        topic, broker, *rest = route
        destination = rest[0] if rest else None
        configs.append(RouteConfig(topic=topic, broker=broker, destination=destination))
    return Router(configs)


def test_first_matching_route_wins() -> None:
    r = router(("orders.created", "special"), ("orders.*", "orders"), ("*", "catchall"))
    assert r.resolve("orders.created") == Target("special", "orders.created")
    assert r.resolve("orders.cancelled") == Target("orders", "orders.cancelled")
    assert r.resolve("users.created") == Target("catchall", "users.created")


def test_order_of_routes_decides_not_specificity() -> None:
    r = router(("*", "catchall"), ("orders.*", "orders"))
    assert r.resolve("orders.created") == Target("catchall", "orders.created")


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("orders.*", "orders.created", True),
        ("orders.*", "orders.", True),
        ("orders.*", "orders", False),
        ("orders.*", "xorders.created", False),
        ("*.created", "users.created", True),
        ("*.created", "users.created.v2", False),
        ("orders.?", "orders.a", True),
        ("orders.?", "orders.ab", False),
        ("orders.[ab]", "orders.b", True),
        ("orders.[ab]", "orders.c", False),
        ("Orders.*", "orders.created", False),  # case-sensitive
        ("a/*", "a/b/c", True),  # * crosses / and . alike
        ("exact", "exact", True),
        ("exact", "exactly", False),
    ],
)
def test_glob_matching(pattern: str, topic: str, matches: bool) -> None:
    assert (router((pattern, "b")).resolve(topic) is not None) is matches


def test_destination_defaults_to_topic_and_can_be_set() -> None:
    r = router(("orders.*", "kafka", "orders-v2"), ("users.*", "kafka"))
    assert r.resolve("orders.created") == Target("kafka", "orders-v2", explicit=True)
    assert r.resolve("users.created") == Target("kafka", "users.created", explicit=False)


def test_no_match_gives_none() -> None:
    r = router(("orders.*", "b"), ("users.*", "b"))
    assert r.resolve("payments.settled") is None
    assert r.resolve("") is None


def test_resolve_is_stable_across_calls() -> None:
    r = router(("a.*", "x"), ("*", "y"))
    assert [r.resolve(t) for t in ("a.1", "b", "a.1", "b")] == [
        Target("x", "a.1"),
        Target("y", "b"),
        Target("x", "a.1"),
        Target("y", "b"),
    ]


def test_brokers_in_use() -> None:
    assert router(("a", "x"), ("b", "y"), ("c", "x")).brokers_in_use() == {"x", "y"}


# --- retry.Backoff -------------------------------------------------------------------


def bounds(initial: float, maximum: float, attempt: int) -> tuple[float, float]:
    base = initial * 2 ** (max(attempt, 1) - 1)
    return min(base, maximum), min(base + initial, maximum)


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_grows_exponentially_with_jitter_up_to_initial(attempt: int) -> None:
    backoff = Backoff(0.1, 1000.0)
    low, high = bounds(0.1, 1000.0, attempt)
    for _ in range(50):
        delay = backoff.delay(attempt)
        assert low - 1e-9 <= delay <= high + 1e-9, (attempt, delay)


def test_backoff_doubles_between_attempts() -> None:
    backoff = Backoff(1.0, 10_000.0)
    # Jitter is at most `initial` (1s), so the lower edges of attempts n+1 and n differ by 2x.
    lows = [min(backoff.delay(n) for _ in range(30)) for n in range(1, 8)]
    for n in range(1, 7):
        assert lows[n] >= 2 * lows[n - 1] - 1.0


def test_backoff_jitter_is_random_and_within_initial() -> None:
    backoff = Backoff(0.5, 100.0)
    delays = [backoff.delay(3) for _ in range(200)]
    jitters = [d - 0.5 * 4 for d in delays]
    assert all(0.0 <= j <= 0.5 + 1e-9 for j in jitters)
    assert len({round(j, 6) for j in jitters}) > 10  # really random, not a constant


@pytest.mark.parametrize("attempt", [9, 10, 20, 100, 10_000])
def test_backoff_is_capped_at_max(attempt: int) -> None:
    backoff = Backoff(0.2, 30.0)  # 0.2 * 2**8 = 51.2 > 30 from attempt 9 on
    for _ in range(20):
        assert backoff.delay(attempt) == 30.0


def test_backoff_never_exceeds_max_near_the_cap() -> None:
    backoff = Backoff(1.0, 5.0)
    # attempt 3: 4s + up to 1s jitter could pass 5s; the cap still holds.
    assert all(backoff.delay(n) <= 5.0 for n in range(1, 10) for _ in range(50))


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_backoff_attempt_below_one_counts_as_first(attempt: int) -> None:
    backoff = Backoff(0.2, 30.0)
    for _ in range(50):
        assert 0.2 - 1e-9 <= backoff.delay(attempt) <= 0.4 + 1e-9


def test_backoff_from_config() -> None:
    from outbox_relay.config import RelayConfig

    relay = RelayConfig.model_validate({"retry": {"initial": "50ms", "max": "500ms"}})
    backoff = Backoff.from_config(relay)
    assert backoff.maximum == 0.5
    assert 0.05 - 1e-9 <= backoff.delay(1) <= 0.1 + 1e-9
    assert backoff.delay(50) == 0.5


@given(
    st.floats(min_value=0.001, max_value=10.0),
    st.floats(min_value=1.0, max_value=100.0),
    st.integers(min_value=-5, max_value=200),
)
def test_backoff_property(initial: float, factor: float, attempt: int) -> None:
    maximum = initial * factor
    low, high = bounds(initial, maximum, attempt)
    delay = Backoff(initial, maximum).delay(attempt)
    assert low * (1 - 1e-9) <= delay <= high * (1 + 1e-9)
    assert delay <= maximum


# --- engine.dispatch.waves -----------------------------------------------------------


def batch(keys: list[str | None]) -> list[Message]:
    return [message(i + 1, key=key) for i, key in enumerate(keys)]


def ids(result: list[list[Message]]) -> list[list[int]]:
    return [[m.id for m in wave] for wave in result]


def test_waves_example() -> None:
    result = waves(batch(["a", "b", "a", None, "a", "b", None, "c"]))
    assert ids(result) == [[1, 2, 4, 7, 8], [3, 6], [5]]


def test_waves_empty() -> None:
    assert waves([]) == []


def test_waves_distinct_keys_are_one_wave() -> None:
    assert ids(waves(batch(["a", "b", "c"]))) == [[1, 2, 3]]


def test_waves_keyless_all_in_wave_zero() -> None:
    result = waves(batch([None, "a", None, "a", None, "a", None]))
    assert [m.id for m in result[0] if m.key is None] == [1, 3, 5, 7]
    assert all(m.key is not None for wave in result[1:] for m in wave)


def test_waves_one_key_is_one_message_per_wave() -> None:
    assert ids(waves(batch(["k"] * 4))) == [[1], [2], [3], [4]]


def check_waves(messages: list[Message]) -> None:
    result = waves(messages)
    # Nothing lost or duplicated.
    assert sorted(m.id for wave in result for m in wave) == sorted(m.id for m in messages)
    assert all(wave for wave in result)
    for wave in result:
        keys = [m.key for m in wave if m.key is not None]
        assert len(keys) == len(set(keys)), "a wave holds two messages of one key"
        # Within a wave, batch order is kept.
        assert [m.id for m in wave] == sorted(m.id for m in wave)
    # Per key: the i-th message of a key is in wave i, so order is preserved across waves.
    position = {m.id: index for index, wave in enumerate(result) for m in wave}
    by_key: dict[str, list[int]] = {}
    for m in messages:
        if m.key is None:
            assert position[m.id] == 0
        else:
            by_key.setdefault(m.key, []).append(m.id)
    for key_ids in by_key.values():
        assert [position[i] for i in key_ids] == list(range(len(key_ids)))


@given(st.lists(st.one_of(st.none(), st.sampled_from("abcde"), st.text(max_size=3)), max_size=60))
def test_waves_property(keys: list[str | None]) -> None:
    check_waves(batch(keys))
