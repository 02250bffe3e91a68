"""Helpers the tests share; fixtures stay in the conftest.py files, and no test module
imports from another test module.

- factories: `message` and `outgoing`, one Message factory with keyword defaults.
- configs: `config_tree`, the one relay configuration builder; `make_config` renders it
  as a Config, `write_config` as a YAML file (QUICK and PATIENT timings).
- waiting: `wait_until` (async) and `wait_for` (blocking): wait for a positive signal,
  never a fixed sleep, before asserting.
- relay: `running_relay`, a Relay in the test's event loop; `wakeups`, what it counts.
- cli: `run_cli`, `RelayProcess` (`outbox-relay run` in the background), `read_jsonl`.
- http: `HttpReceiver`, a local endpoint for the webhook tests.
- outbox: counts of the outbox table (`count`, `pending`, `dispatched`, `dead_letters`),
  concurrent writers (`write`) and `sequence_by_key`.
- databases: a fresh database per test, cloned from a template (the conftest's fixtures).
- toxiproxy: a client for toxiproxy's API (`Toxiproxy`, `Proxy`): latency, bandwidth,
  black holes, resets, sliced or cut streams, a stall that heals, between the relay and
  any service (the conftest's `toxiproxy` and `proxy` fixtures). It replaced a hand-written
  TCP proxy (tests/support/proxy.py) everywhere: each use (cut, refuse, stall then heal,
  stall then cut) is one toxiproxy does.
- kafka_cluster: `kafka_cluster()`, a 3-node Kafka cluster (scripts/services/kafka.sh cluster-start)
  with its nodes, partition leaders, active controller and RF 3 / min ISR 2 topics.

Brokers and PostgreSQL themselves come from tests/services.py, the independent broker
consumers from tests/consumers.py (benchmarks/ imports it too).
"""
