"""The relay engine: claim a batch, publish it, record what the brokers said.

- ``store``: the claim and outcome SQL, per batch, in one transaction;
- ``dispatch``: routes a batch to its brokers, in per-key waves, and turns broker
  answers into outcomes (dispatched, retry later, dead letter);
- ``routing``: which broker and destination take a topic (the config's routes);
- ``retry``: the backoff between attempts;
- ``circuit``: a broker's circuit: opened by an outage, closed by a probe, with one
  trial message while half-open;
- ``brokers``: each adapter's connection, made in the background until it succeeds;
- ``wakeup``: the LISTEN connection and the poll timer that wake the workers;
- ``maintenance``: retention and the relay heartbeat;
- ``stopping``: awaiting what may take forever unless the relay is told to stop;
- ``relay``: the process: workers, side tasks, startup and graceful shutdown.
"""
