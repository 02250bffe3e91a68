"""Relay configurations: one builder, `config_tree`, rendered as a validated Config for a
relay in the test's event loop (`make_config`) or as a YAML file for `outbox-relay`
run as a process (`write_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from outbox_relay.config import Config, parse

# The relay settings every test starts from: quick polls and retries.
QUICK: Mapping[str, Any] = {"poll_interval": "200ms", "retry": {"initial": "50ms", "max": "500ms"}}
# The fault scenarios' relays run as processes under load and across outages: calmer.
PATIENT: Mapping[str, Any] = {"poll_interval": "500ms", "retry": {"initial": "100ms", "max": "2s"}}


def config_tree(
    dsn: str | None,
    *,
    brokers: Mapping[str, Mapping[str, Any]] | None = None,
    routes: list[Mapping[str, Any]] | None = None,
    schema: str | None = None,
    timing: Mapping[str, Any] = QUICK,
    outcomes: Mapping[str, Any] | None = None,
    dead_letters: Mapping[str, Any] | None = None,
    claim_check: Mapping[str, Any] | None = None,
    **relay: Any,
) -> dict[str, Any]:
    """The configuration as a tree. `dsn` None: ``${DATABASE_URL}``. `brokers`: a stdout
    broker `main` unless given; `routes`: every topic to the first broker unless given;
    `outcomes`, `dead_letters`, `claim_check`: the blocks of those names, when given; `relay` settings as keyword
    arguments (durations as strings) over `timing`."""
    brokers = dict(brokers or {"main": {"type": "stdout"}})
    database: dict[str, Any] = {"dsn": dsn if dsn is not None else "${DATABASE_URL}"}
    if schema is not None:
        database["schema"] = schema
    tree = {
        "database": database,
        "relay": {**timing, **relay},
        "http": {"host": "127.0.0.1", "port": 0},
        "brokers": brokers,
        "routes": routes or [{"topic": "*", "broker": next(iter(brokers))}],
    }
    if outcomes is not None:
        tree["outcomes"] = dict(outcomes)
    if dead_letters is not None:
        tree["dead_letters"] = dict(dead_letters)
    if claim_check is not None:
        tree["claim_check"] = dict(claim_check)
    return tree


def make_config(dsn: str, *, schema: str = "outbox", env: Mapping[str, str] | None = None, **settings: Any) -> Config:
    """A validated Config of `config_tree(dsn, **settings)`; `env` for its ${VARIABLES}."""
    return parse(yaml.safe_dump(config_tree(dsn, schema=schema, **settings)), source="test.yaml", env=dict(env or {}))


def write_config(
    path: Path,
    dsn: str | None,
    *,
    sink: Path | None = None,
    brokers: Mapping[str, Mapping[str, Any]] | None = None,
    **settings: Any,
) -> Path:
    """`config_tree(dsn, **settings)` as YAML at `path`. The broker, unless `brokers` are
    given: a file sink `sink` (default: `path` with the suffix .jsonl)."""
    brokers = brokers or {"sink": {"type": "file", "path": str(sink or path.with_suffix(".jsonl"))}}
    path.write_text(yaml.safe_dump(config_tree(dsn, brokers=brokers, **settings)))
    return path
