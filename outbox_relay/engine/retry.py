"""Backoff between publish attempts of one message, with tenacity's wait strategy.

The delay is stored with the row (next_attempt_at), not slept in memory: a message
waiting for its retry holds back only its own key, and the wait survives a restart.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential, wait_random

from outbox_relay.config import RelayConfig


class Backoff:
    """Exponential backoff with jitter and a cap: initial * 2^(n-1) + jitter, at most `max`."""

    def __init__(self, initial: float, maximum: float):
        self._wait = wait_exponential(multiplier=initial, max=maximum, exp_base=2) + wait_random(0, initial)
        self.maximum = maximum

    @classmethod
    def from_config(cls, relay: RelayConfig) -> Backoff:
        return cls(relay.retry.initial, relay.retry.max)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the `attempt`-th failed attempt (1-based)."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(1, attempt)
        return min(float(self._wait(state)), self.maximum)
