"""The relay engine: claim a batch, publish it, record what the brokers said.

- ``store``: the claim and outcome SQL, per batch, in one transaction;
- ``dispatch``: routes a batch to its brokers, in per-key waves, and turns broker
  answers into outcomes (dispatched, retry later, dead letter);
- ``wakeup``: the LISTEN connection and the poll timer that wake the workers;
- ``maintenance``: retention and the relay heartbeat;
- ``relay``: the process: workers, side tasks, startup and graceful shutdown.
"""
