"""outbox_relay.config: parse/load, defaults, one-line ConfigErrors (file, key path, problem)."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox_relay.assembly import build_adapters
from outbox_relay.config import Config, load, parse
from outbox_relay.errors import AdapterOptionsError, ConfigError

EXAMPLE = """\
database:
  dsn: ${DATABASE_URL}
  schema: outbox
  connect_timeout: 5s

relay:
  batch_size: 200
  poll_interval: 500ms
  notify: false
  max_attempts: 5
  retry:
    initial: 100ms
    max: 1m
  retention: 7d
  shutdown_timeout: 10s
  publish_timeout: 15s
  workers: 4
  dead_letter_policy: hold

brokers:
  events:
    type: webhook
    url: ${WEBHOOK_URL:-http://localhost:8080/events}
    timeout: 2s
  audit:
    type: file
    path: ${AUDIT_DIR:-/var/log/outbox}/audit.jsonl

routes:
  - topic: "orders.*"
    broker: events
    destination: orders-v1
  - topic: "*"
    broker: audit
"""

MINIMAL: dict[str, Any] = {
    "database": {"dsn": "postgresql://relay@localhost/app"},
    "brokers": {"events": {"type": "stdout"}},
    "routes": [{"topic": "*", "broker": "events"}],
}


def dump(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=False)


def with_changes(**sections: Any) -> str:
    """The minimal config with top-level sections replaced (None removes one)."""
    tree = copy.deepcopy(MINIMAL)
    for name, value in sections.items():
        if value is None:
            tree.pop(name, None)
        else:
            tree[name] = value
    return dump(tree)


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, source="relay.yaml", env=env or {})
    message = str(info.value)
    assert len(message.splitlines()) == 1, f"message is not one line: {message!r}"
    return message


# --- a valid config ------------------------------------------------------------


def test_full_example_parses_with_env_and_defaults_substituted() -> None:
    env = {"DATABASE_URL": "postgresql://relay:pw@db.internal/app", "AUDIT_DIR": "/data/audit"}
    config = parse(EXAMPLE, source="relay.yaml", env=env)

    assert config.source == "relay.yaml"
    assert config.database.dsn.get_secret_value() == "postgresql://relay:pw@db.internal/app"
    assert config.database.schema_name == "outbox"
    assert config.database.connect_timeout == 5.0
    relay = config.relay
    assert relay.batch_size == 200
    assert relay.poll_interval == 0.5
    assert relay.notify is False
    assert relay.max_attempts == 5
    assert relay.retry.initial == pytest.approx(0.1)
    assert relay.retry.max == 60.0
    assert relay.retention == 7 * 86400.0
    assert relay.shutdown_timeout == 10.0
    assert relay.publish_timeout == 15.0
    assert relay.workers == 4
    assert relay.dead_letter_policy == "hold"
    assert set(config.brokers) == {"events", "audit"}
    assert config.brokers["events"].type == "webhook"
    # WEBHOOK_URL is unset: the default applies; AUDIT_DIR is set: its value applies.
    assert config.brokers["events"].options == {
        "url": "http://localhost:8080/events",
        "timeout": "2s",
    }
    assert config.brokers["audit"].options == {"path": "/data/audit/audit.jsonl"}
    assert [(r.topic, r.broker, r.destination) for r in config.routes] == [
        ("orders.*", "events", "orders-v1"),
        ("*", "audit", None),
    ]


def test_full_example_builds_its_adapters() -> None:
    config = parse(EXAMPLE, source="relay.yaml", env={"DATABASE_URL": "postgresql://x/app"})
    adapters = build_adapters(config)
    assert set(adapters) == {"events", "audit"}
    assert adapters["events"].name == "events"
    assert adapters["audit"].name == "audit"


def test_dsn_is_secret_in_repr() -> None:
    config = parse(EXAMPLE, source="relay.yaml", env={"DATABASE_URL": "postgresql://u:hunter2@h/app"})
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.database)


def test_defaults() -> None:
    config = parse(dump(MINIMAL), source="relay.yaml", env={})
    relay = config.relay
    assert relay.batch_size == 1000
    assert relay.workers == 4
    assert relay.poll_interval == 1.0
    assert relay.notify is True
    assert relay.max_attempts == 10
    assert relay.retry.initial == pytest.approx(0.2)
    assert relay.retry.max == 30.0
    assert relay.retention == 24 * 3600.0
    assert relay.shutdown_timeout == 30.0
    assert relay.dead_letter_policy == "release"
    assert config.database.schema_name == "outbox"
    assert config.routes[0].destination is None


def test_partial_retry_block_keeps_other_default() -> None:
    config = parse(with_changes(relay={"retry": {"max": "5s"}}), source="relay.yaml", env={})
    assert config.relay.retry.initial == pytest.approx(0.2)
    assert config.relay.retry.max == 5.0


def test_load_reads_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    config = load(path, env={"DATABASE_URL": "postgresql://x/app"})
    assert isinstance(config, Config)
    assert config.source == "relay.yaml"
    assert config.database.dsn.get_secret_value() == "postgresql://x/app"


def test_load_uses_process_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    monkeypatch.setenv("DATABASE_URL", "postgresql://from-env/app")
    monkeypatch.delenv("WEBHOOK_URL", raising=False)
    assert load(path).database.dsn.get_secret_value() == "postgresql://from-env/app"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(with_changes(relay={"pol_interval": "1s"}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value).startswith("relay.yaml: relay.pol_interval: ")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "relay.yaml"
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{path}: ")
    assert "cannot read config file" in message
    assert "No such file" in message


# --- every bad input: one line naming file, key path, problem --------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("database: [\n", r"^relay\.yaml: line 2, column 1: invalid YAML: "),
        (
            "a: b: c\n",
            r"^relay\.yaml: line 1, column 5: invalid YAML: mapping values are not allowed",
        ),
        ("a:\n\tb: 1\n", r"^relay\.yaml: line 2, column 1: invalid YAML: .*cannot start any token"),
    ],
)
def test_malformed_yaml_gives_line_and_column(text: str, expected: str) -> None:
    assert re.match(expected, error_of(text))


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert error_of(text) == "relay.yaml: expected a mapping with database, brokers and routes"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            with_changes(relay={"pol_interval": "1s"}),
            "relay.yaml: relay.pol_interval: unknown key 'pol_interval' (did you mean 'poll_interval'?)",
        ),
        (
            with_changes(routes=[{"topic": "*", "broker": "events", "destinaton": "x"}]),
            "relay.yaml: routes.0.destinaton: unknown key 'destinaton' (did you mean 'destination'?)",
        ),
        (
            with_changes(relay={"retry": {"inital": "1s"}}),
            "relay.yaml: relay.retry.inital: unknown key 'inital' (did you mean 'initial'?)",
        ),
        (
            with_changes(database={"dsn": "host=x", "shema": "outbox"}),
            "relay.yaml: database.shema: unknown key 'shema' (did you mean 'schema'?)",
        ),
        (
            with_changes(rleay={"batch_size": 1}),
            "relay.yaml: rleay: unknown key 'rleay' (did you mean 'relay'?)",
        ),
        (with_changes(zzz=1), "relay.yaml: zzz: unknown key 'zzz'"),
    ],
)
def test_unknown_key_with_did_you_mean(text: str, expected: str) -> None:
    assert error_of(text) == expected


def test_unknown_key_is_reported_before_the_missing_key_it_hides() -> None:
    # `dns` is a typo of `dsn`: the missing `dsn` is a consequence; say the typo.
    message = error_of(with_changes(database={"dns": "postgresql://x"}))
    assert message == "relay.yaml: database.dns: unknown key 'dns' (did you mean 'dsn'?)"


def test_internal_source_field_is_not_a_config_key() -> None:
    error_of(with_changes(source="other.yaml"))


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (with_changes(relay={"batch_size": "lots"}), "relay.batch_size", "(got 'lots')"),
        (with_changes(relay={"batch_size": 0}), "relay.batch_size", "greater than or equal to 1"),
        (with_changes(relay={"batch_size": 10_001}), "relay.batch_size", "less than or equal to"),
        (with_changes(relay={"notify": "maybe"}), "relay.notify", "(got 'maybe')"),
        (with_changes(relay={"max_attempts": [1]}), "relay.max_attempts", "(got [1])"),
        (with_changes(database={"dsn": 5}), "database.dsn", "Input should be a valid string"),  # never echoed
        (with_changes(database=["dsn"]), "database", "(got ['dsn'])"),
        (with_changes(relay=[1]), "relay", "(got [1])"),
        (with_changes(routes={"a": 1}), "routes", "(got {'a': 1})"),
        (with_changes(brokers=None), "brokers", "required key is missing"),
        (with_changes(database={"schema": "outbox"}), "database.dsn", "required key is missing"),
        (
            with_changes(brokers={"events": {"path": "x"}}),
            "brokers.events.type",
            "required key is missing",
        ),
        (with_changes(routes=[{"broker": "events"}]), "routes.0.topic", "required key is missing"),
    ],
)
def test_wrong_types_and_missing_keys(text: str, path: str, fragment: str) -> None:
    message = error_of(text)
    assert message.startswith(f"relay.yaml: {path}: ")
    assert fragment in message


def test_numbers_and_booleans_from_variables_are_coerced() -> None:
    # ${VAR} always yields a string: numeric and boolean keys must accept their text form.
    text = with_changes(relay={"batch_size": "${BATCH}", "notify": "${NOTIFY}"})
    relay = parse(text, source="relay.yaml", env={"BATCH": "250", "NOTIFY": "false"}).relay
    assert relay.batch_size == 250
    assert relay.notify is False


@pytest.mark.parametrize("key", ["batch_size", "max_attempts", "workers"])
def test_boolean_for_integer_key_is_a_wrong_type(key: str) -> None:
    assert error_of(with_changes(relay={key: True})).startswith(f"relay.yaml: relay.{key}: ")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("poll_interval", 5),
        ("poll_interval", "5"),
        ("poll_interval", 1.5),
        ("shutdown_timeout", "5x"),
        ("retention", "1 day"),
        ("publish_timeout", "-1s"),
        ("poll_interval", ""),
        ("poll_interval", True),
    ],
)
def test_invalid_and_bare_number_durations(key: str, value: object) -> None:
    message = error_of(with_changes(relay={key: value}))
    assert message.startswith(f"relay.yaml: relay.{key}: invalid duration {value!r}: ")
    assert "e.g. 500ms, 1s" in message


def test_nested_duration_error_names_full_path() -> None:
    message = error_of(with_changes(relay={"retry": {"initial": "10"}}))
    assert message.startswith("relay.yaml: relay.retry.initial: invalid duration '10'")
    message = error_of(with_changes(database={"dsn": "host=x", "connect_timeout": 3}))
    assert message.startswith("relay.yaml: database.connect_timeout: invalid duration 3")


@pytest.mark.parametrize("key", ["poll_interval", "shutdown_timeout", "publish_timeout"])
def test_zero_durations_rejected_where_they_must_be_positive(key: str) -> None:
    assert error_of(with_changes(relay={key: "0s"})) == (f"relay.yaml: relay.{key}: must be greater than 0")


def test_database_query_timeout_must_be_positive_and_defaults_to_a_minute() -> None:
    assert error_of(with_changes(database={"dsn": "host=x", "query_timeout": "0s"})) == (
        "relay.yaml: database.query_timeout: must be greater than 0"
    )
    assert parse(with_changes(), source="r", env={}).database.query_timeout == 60.0


def test_zero_retention_is_allowed() -> None:
    assert parse(with_changes(relay={"retention": "0s"}), source="r", env={}).relay.retention == 0


def test_unset_variable_names_key_holding_it() -> None:
    text = with_changes(database={"dsn": "${DATABASE_URL}"})
    assert error_of(text) == ("relay.yaml: database.dsn: environment variable DATABASE_URL is not set")


def test_unset_variable_in_list_and_broker_option_names_key_path() -> None:
    text = with_changes(
        brokers={"events": {"type": "file", "path": "/x/${LOG_DIR}/a"}},
        routes=[{"topic": "${TOPIC}", "broker": "events"}],
    )
    message = error_of(text, env={"TOPIC": "t"})
    assert message == "relay.yaml: brokers.events.path: environment variable LOG_DIR is not set"
    message = error_of(text, env={"LOG_DIR": "d"})
    assert message == "relay.yaml: routes.0.topic: environment variable TOPIC is not set"


@pytest.mark.parametrize("value", ["${DATABASE_URL", "${}", "${1X}", "${A-b}", "x${"])
def test_malformed_variable_reference(value: str) -> None:
    message = error_of(with_changes(database={"dsn": value}), env={"DATABASE_URL": "x", "A": "a"})
    assert message.startswith("relay.yaml: database.dsn: malformed variable reference ")
    assert "use ${NAME} or ${NAME:-default}" in message


def test_route_names_unknown_broker() -> None:
    text = with_changes(routes=[{"topic": "a.*", "broker": "events"}, {"topic": "*", "broker": "evnts"}])
    assert error_of(text) == "relay.yaml: routes.1.broker: unknown broker 'evnts' (defined: events)"


def test_empty_brokers_and_routes() -> None:
    message = error_of(with_changes(brokers={}))
    assert message.startswith("relay.yaml: brokers: ")
    assert "at least 1 item" in message
    message = error_of(with_changes(routes=[]))
    assert message.startswith("relay.yaml: routes: ")
    assert "at least 1 item" in message


def test_empty_route_topic() -> None:
    assert error_of(with_changes(routes=[{"topic": "", "broker": "events"}])).startswith("relay.yaml: routes.0.topic: ")


@pytest.mark.parametrize("schema", ["Outbox", "1outbox", "out-box", "a" * 64, "", "out box"])
def test_bad_schema_name(schema: str) -> None:
    message = error_of(with_changes(database={"dsn": "host=x", "schema": schema}))
    assert message.startswith(f"relay.yaml: database.schema: invalid schema name {schema!r}: ")


def test_dead_letter_policy_must_be_release_or_hold() -> None:
    message = error_of(with_changes(relay={"dead_letter_policy": "drop"}))
    assert message == ("relay.yaml: relay.dead_letter_policy: Input should be 'release' or 'hold' (got 'drop')")


def test_retry_initial_greater_than_max() -> None:
    message = error_of(with_changes(relay={"retry": {"initial": "1m", "max": "1s"}}))
    assert message == "relay.yaml: relay.retry: need 0 < initial <= max"


def test_retry_initial_equal_to_max_is_fine() -> None:
    text = with_changes(relay={"retry": {"initial": "2s", "max": "2s"}})
    config = parse(text, source="r", env={})
    assert config.relay.retry.initial == config.relay.retry.max == 2.0


def test_key_with_line_break_one_line() -> None:
    error_of(with_changes(**{"a\nb": 1}))


def test_recursive_yaml_alias_is_a_config_error() -> None:
    error_of("database: &a [*a]\n")


def test_deeply_nested_yaml_is_a_config_error() -> None:
    error_of("relay: " + "[" * 3000 + "]" * 3000 + "\n")


# --- adapters: type and options validated through assembly.build_adapters -----------


def build_error(brokers: dict[str, Any]) -> ConfigError:
    first = next(iter(brokers))
    config = parse(
        with_changes(brokers=brokers, routes=[{"topic": "*", "broker": first}]),
        source="relay.yaml",
        env={},
    )
    with pytest.raises(ConfigError) as info:
        build_adapters(config)
    assert len(str(info.value).splitlines()) == 1
    return info.value


def test_unknown_adapter_type_spec_example() -> None:
    error = build_error({"events": {"type": "kafak"}})
    message = str(error)
    prefix = "relay.yaml: brokers.events.type: unknown adapter 'kafak' (installed: "
    assert message.startswith(prefix)
    assert message.endswith(")")
    installed = message[len(prefix) : -1].split(", ")
    # Other adapters (kafka, rabbitmq) may be installed too; the built-ins come in order.
    builtins = [name for name in installed if name in {"file", "stdout", "webhook"}]
    assert builtins == ["file", "stdout", "webhook"]
    assert installed == sorted(installed)


def test_unknown_adapter_exact_message_lists_every_installed_adapter() -> None:
    from outbox_relay.adapter import installed

    message = str(build_error({"events": {"type": "kafak"}}))
    names = ", ".join(sorted(installed()))
    assert {"file", "stdout", "webhook"} <= set(installed())
    assert message == f"relay.yaml: brokers.events.type: unknown adapter 'kafak' (installed: {names})"


def without(monkeypatch: pytest.MonkeyPatch, library: str, *adapter_modules: str) -> None:
    """As if `library` were not installed: importing it fails, and so does (re)loading
    the adapter modules that import it."""
    monkeypatch.setitem(sys.modules, library, None)
    for module in adapter_modules:
        monkeypatch.delitem(sys.modules, f"outbox_relay_adapters.{module}", raising=False)


def test_an_adapter_without_its_client_library_says_once_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "httpx", "webhook")
    message = str(build_error({"hook": {"type": "webhook", "url": "http://h/"}}))
    assert message == (
        "relay.yaml: brokers.hook: adapter 'webhook' cannot be loaded: "
        "the webhook adapter needs httpx: pip install 'outbox-relay[webhook]'"
    )


def test_a_kafka_client_it_imports_on_use_is_a_config_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # client: librdkafka imports confluent-kafka only in create(): it was a traceback.
    without(monkeypatch, "confluent_kafka", "kafka_librdkafka")
    message = str(build_error({"k": {"type": "kafka", "bootstrap_servers": "h:1", "client": "librdkafka"}}))
    assert message == (
        "relay.yaml: brokers.k: adapter 'kafka' cannot be loaded: the kafka adapter's librdkafka client "
        "needs confluent-kafka: pip install 'outbox-relay[librdkafka]'"
    )


def test_an_unknown_type_lists_an_adapter_without_its_library_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    from outbox_relay.adapter import installed

    without(monkeypatch, "httpx", "webhook")
    usable = ", ".join(sorted(set(installed()) - {"webhook"}))
    assert str(build_error({"events": {"type": "kafak"}})) == (
        f"relay.yaml: brokers.events.type: unknown adapter 'kafak' (installed: {usable}; "
        "needing an extra: webhook, pip install 'outbox-relay[webhook]')"
    )


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ({"type": "file"}, "relay.yaml: brokers.out.path: required option is missing"),
        ({"type": "file", "path": "  "}, "relay.yaml: brokers.out.path: must not be empty"),
        (
            {"type": "file", "path": "/tmp/x", "fsynk": False},
            "relay.yaml: brokers.out.fsynk: unknown option 'fsynk' (did you mean 'fsync'?)",
        ),
        (
            {"type": "stdout", "colour": True},
            "relay.yaml: brokers.out.colour: unknown option 'colour'",
        ),
        ({"type": "webhook"}, "relay.yaml: brokers.out.url: required option is missing"),
        (
            {"type": "webhook", "url": "ftp://example.com"},
            "relay.yaml: brokers.out.url: must be an http:// or https:// URL (got 'ftp'; the URL is not shown)",
        ),
        (
            {"type": "webhook", "url": "http://x", "timout": "1s"},
            "relay.yaml: brokers.out.timout: unknown option 'timout' (did you mean 'timeout'?)",
        ),
    ],
)
def test_adapter_option_errors_name_broker_and_option(broker: dict[str, Any], expected: str) -> None:
    assert str(build_error({"out": broker})) == expected


def test_adapter_option_wrong_type_names_option() -> None:
    error = build_error({"hook": {"type": "webhook", "url": "http://x", "timeout": 5}})
    assert str(error).startswith("relay.yaml: brokers.hook.timeout: invalid duration 5")
    error = build_error({"hook": {"type": "webhook", "url": "http://x", "max_concurrency": 0}})
    assert str(error).startswith("relay.yaml: brokers.hook.max_concurrency: ")


def test_second_broker_error_names_that_broker() -> None:
    error = build_error({"ok": {"type": "stdout"}, "bad": {"type": "file"}})
    assert str(error) == "relay.yaml: brokers.bad.path: required option is missing"
    assert error.path == "brokers.bad.path"


def test_adapter_create_raises_adapter_options_error() -> None:
    from outbox_relay import adapter as registry

    with pytest.raises(AdapterOptionsError) as info:
        registry.create("file", "b", {"path": "x", "fsynk": True})
    assert info.value.path == "fsynk"
    assert info.value.reason == "unknown option 'fsynk' (did you mean 'fsync'?)"


def test_typo_of_required_adapter_option_suggests_it() -> None:
    error = build_error({"out": {"type": "file", "pth": "/tmp/x"}})
    assert str(error) == "relay.yaml: brokers.out.pth: unknown option 'pth' (did you mean 'path'?)"


# --- fuzz: nothing but a one-line ConfigError ever escapes ------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(
        [
            "1s",
            "200ms",
            "5",
            "${X}",
            "${UNSET}",
            "${X:-d}",
            "${",
            "$$",
            "release",
            "hold",
            "stdout",
            "file",
            "webhook",
            "kafak",
            "*",
            "events",
            "outbox",
            "Bad-Schema",
            "a\nb",
        ]
    ),
)
_keys = st.one_of(
    st.sampled_from(
        [
            "database",
            "dsn",
            "schema",
            "relay",
            "brokers",
            "routes",
            "type",
            "topic",
            "broker",
            "destination",
            "retry",
            "initial",
            "max",
            "batch_size",
            "poll_interval",
            "notify",
            "events",
            "retention",
            "dead_letter_policy",
            "path",
            "url",
        ]
    ),
    st.text(max_size=8),  # line breaks included: key paths must still fit on one line
    st.integers(),
)
_trees = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=25,
)
_mutated = st.fixed_dictionaries(
    {},
    optional={
        "database": st.one_of(_trees, st.fixed_dictionaries({"dsn": _scalars}, optional={"schema": _scalars})),
        "relay": st.one_of(_trees, st.dictionaries(_keys, _trees, max_size=4)),
        "brokers": st.one_of(_trees, st.dictionaries(_keys, st.dictionaries(_keys, _scalars))),
        "routes": st.one_of(_trees, st.lists(st.dictionaries(_keys, _scalars), max_size=3)),
    },
)


def _only_one_line_config_error(text: str) -> None:
    from outbox_relay.assembly import build_adapters

    try:
        # As `run` and `check` do: parse, then every broker block's adapter options.
        build_adapters(parse(text, source="relay.yaml", env={"X": "value"}))
    except ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1, repr(message)
        assert message.startswith("relay.yaml: ")
    # Any other exception type propagates and fails the test.


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_trees, _mutated))
def test_fuzz_nested_structures_only_raise_config_error(tree: Any) -> None:
    _only_one_line_config_error(yaml.safe_dump(tree))


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(alphabet="ab:-_ \n\t[]{}$#&*!?,'\"|>%@`0123456789.", max_size=80),
    )
)
def test_fuzz_yaml_text_only_raises_config_error(text: str) -> None:
    _only_one_line_config_error(text)


@pytest.mark.parametrize("broker", [{"type": "nope"}, {"type": "file"}, {"type": "file", "path": "x", "o\nq": 1}])
def test_a_broker_name_with_a_line_break_still_gives_a_one_line_error(broker: dict[str, Any]) -> None:
    # The fuzz test above found it: adapter errors joined the broker name into the key path as is.
    text = yaml.safe_dump(
        {"database": {"dsn": "host=x"}, "brokers": {"a\nb": broker}, "routes": [{"topic": "*", "broker": "a\nb"}]}
    )
    _only_one_line_config_error(text)
    with pytest.raises(ConfigError, match=r"^relay\.yaml: brokers\.'a\\nb'\."):
        from outbox_relay.assembly import build_adapters

        build_adapters(parse(text, source="relay.yaml", env={}))


# --- the WAL source ---------------------------------------------------------------


def test_the_wal_source_defaults_derive_the_slot_from_the_schema() -> None:
    config = parse(with_changes(database={"dsn": "host=x", "schema": "events"}), source="relay.yaml", env={})
    wal = config.relay.wal
    assert (wal.slot, wal.park_after, wal.status_interval, wal.standby_interval) == (None, 60.0, 10.0, 1.0)
    assert config.wal_slot == "outbox_relay_events"
    named = parse(with_changes(relay={"wal": {"slot": "orders_outbox"}}), source="relay.yaml", env={})
    assert named.wal_slot == "orders_outbox"


@pytest.mark.parametrize(
    ("wal", "expected"),
    [
        ({"slot": "Orders"}, "relay.yaml: relay.wal.slot: invalid slot or publication name 'Orders'"),
        ({"slot": "x" * 64}, "relay.yaml: relay.wal.slot: invalid slot or publication name"),
        ({"park_after": "0s"}, "relay.yaml: relay.wal.park_after: must be greater than 0"),
        ({"status_interval": "0s"}, "relay.yaml: relay.wal.status_interval: must be greater than 0"),
        ({"standby_interval": "-1s"}, "relay.yaml: relay.wal.standby_interval: invalid duration"),
        ({"sloot": "x"}, "relay.yaml: relay.wal.sloot: unknown key 'sloot' (did you mean 'slot'?)"),
    ],
)
def test_the_wal_source_settings_are_validated(wal: dict[str, Any], expected: str) -> None:
    assert error_of(with_changes(relay={"wal": wal})).startswith(expected)


def test_console_enabled_needs_the_health_port() -> None:
    message = error_of(with_changes(console={"enabled": True}, http={"enabled": False}))
    assert "console.enabled" in message and "http.enabled: false" in message


def test_a_trusted_user_header_on_a_relay_port_open_to_all_is_refused() -> None:
    text = with_changes(console={"enabled": True, "trusted_user_header": "X-Forwarded-User"})
    message = error_of(text)  # http.host defaults to 0.0.0.0
    assert "console.trusted_user_header" in message and "could send that header itself" in message
    loopback = with_changes(
        console={"enabled": True, "trusted_user_header": "X-Forwarded-User"}, http={"host": "127.0.0.1"}
    )
    assert parse(loopback, env={}).console.trusted_user_header == "X-Forwarded-User"
