"""A broker that answers nothing is skipped until it answers again (a circuit breaker).

Why: a broker in outage rarely fails fast. Kafka's idempotent producer retries a
record forever, a black-holed TCP connection never answers, so a publish to it ends
only at `relay.publish_timeout`. Counted as a failure, every such timeout would spend
an attempt of each message in the call, and an outage of a few minutes would
dead-letter traffic that was never wrong; the messages of healthy brokers in the same
batch would wait a publish timeout, every batch.

So a call that ends in the timeout, or whose every answer is "unavailable", opens the
broker's circuit: its messages wait (no attempt spent) and, while the circuit is open,
are answered "unavailable" at once without calling the adapter, so no new copy is
queued in a client that holds them, and the other brokers' messages go on. The
adapter's ``ready()`` is probed in the background with a growing interval (the
relay's retry backoff).

``ready()`` answering is not proof that the broker acks: a Kafka broker can serve
metadata and still refuse every write (a partition without enough in-sync replicas),
and the client then keeps each record until it is acked. Were the circuit to close on
``ready()``, every probe cycle would hand the client another full batch per worker,
copies that are all delivered once the broker acks again. So a probe that succeeds
only half-opens the circuit: the next call carries one message (the trial), every other
message still waits; the circuit closes when the trial is acked or answered at all, and
opens again if it times out. An outage therefore duplicates at most the calls that were
in flight when it began, plus one trial message per probe cycle; the relay marks
nothing it did not see acked.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from prometheus_client import Gauge

from outbox_relay.adapter import Adapter
from outbox_relay.engine.retry import Backoff

log = structlog.get_logger("outbox_relay.circuit")


class Circuit:
    """The open/closed state of one broker, and its background probe."""

    def __init__(
        self,
        broker: str,
        adapter: Adapter,
        backoff: Backoff,
        probe_timeout: float,
        gauge: Gauge | None = None,
        *,
        group: list[Circuit] | None = None,
    ):
        self.broker = broker
        self._gauge = gauge  # outbox_relay_broker_circuit_open{broker}
        # Every circuit of this broker, one per connection to it (joined()): each gates
        # its own connection's calls, and the broker is reported open while any is.
        self._group = group if group is not None else []
        self._group.append(self)
        self._adapter = adapter
        self._backoff = backoff
        self._probe_timeout = probe_timeout
        self.reason: str | None = None  # None: closed (the broker is called)
        self._half_open = False  # a probe answered: one trial message may go
        self._trial_running = False
        self._opened_at = 0.0
        self._failures = 0
        self._next_probe = 0.0
        self._probe: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.reason is not None

    @property
    def broker_open(self) -> bool:
        """Whether any connection to this broker has its circuit open: what /readyz,
        the heartbeat (the console) and the gauge report."""
        return any(circuit.open for circuit in self._group)

    def joined(self, adapter: Adapter) -> Circuit:
        """A circuit of its own for another connection to the same broker (an
        exactly-once relay's transactional producer): it gates that connection's calls
        only, and is reported with this one (broker_open, the gauge) until it leaves."""
        return Circuit(self.broker, adapter, self._backoff, self._probe_timeout, self._gauge, group=self._group)

    def leave(self) -> None:
        """This connection is done: stop its probe and report the broker without it (a
        circuit it left open would otherwise say the broker is away, with nothing left
        to probe it)."""
        self.cancel()
        if self in self._group:
            self._group.remove(self)
        self._report()

    def _report(self) -> None:
        if self._gauge is not None:
            self._gauge.set(1 if self.broker_open else 0)

    def blocked(self) -> str | None:
        """Why the broker must not be called now, or None. Starts a probe when one is due."""
        if self.reason is None:
            return None
        if self._half_open:
            if not self._trial_running:
                return None
            return f"broker {self.broker!r} not answering ({self.reason}); a trial message is on its way"
        if (self._probe is None or self._probe.done()) and time.monotonic() >= self._next_probe:
            self._probe = asyncio.create_task(self._run_probe(), name=f"probe-{self.broker}")
        return f"broker {self.broker!r} not answering ({self.reason}); waiting for it to come back"

    def take_trial(self) -> bool:
        """True if this call is the trial of a half-open circuit: it may carry one message."""
        if self._half_open and not self._trial_running:
            self._trial_running = True
            log.info("broker_circuit_trial", broker=self.broker)
            return True
        return False

    def end_trial(self, *, answered: bool) -> None:
        """The trial call ended without closing or tripping the circuit."""
        if not self._trial_running:
            return
        if answered:
            self.close()
        else:
            self._trial_running = False

    def trip(self, reason: str) -> None:
        """The broker answered nothing: open the circuit, or keep it open and probe later."""
        self._half_open = self._trial_running = False
        if self.reason is None:
            self.reason = reason
            self._opened_at = time.monotonic()
            self._failures = 0
            log.warning("broker_circuit_open", broker=self.broker, reason=reason)
            self._report()
        self._failures += 1
        self._next_probe = time.monotonic() + self._backoff.delay(self._failures)

    def close(self) -> None:
        """The broker acked or answered a message."""
        self._half_open = self._trial_running = False
        self._failures = 0
        if self.reason is None:  # called after every answered call: nothing to report
            return
        log.info("broker_circuit_closed", broker=self.broker, open_for_s=round(time.monotonic() - self._opened_at, 3))
        self.reason = None
        self._report()

    async def _run_probe(self) -> None:
        try:
            ready = await asyncio.wait_for(self._adapter.ready(), self._probe_timeout)
        except Exception:  # a failing probe is a "not yet", never the relay's end
            ready = False
        finally:
            if self._probe is asyncio.current_task():  # not a newer probe started after a cancel
                self._probe = None
        if self.reason is None:
            return
        if ready:
            self._half_open = True
            log.info("broker_circuit_half_open", broker=self.broker)
        else:
            self.trip(self.reason)

    def cancel(self) -> None:
        # Cleared here too: a probe cancelled before its first step never runs its
        # finally, and blocked() would wait for it forever.
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
