"""outbox_relay.durations and outbox_relay.envsubst."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from outbox_relay.config import parse
from outbox_relay.durations import EXAMPLES, format_duration, parse_duration
from outbox_relay.envsubst import UnsetVariable, substitute

# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("200ms", 0.2),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("0s", 0.0),
        (" 10s ", 10.0),
        ("1 h 30 m", 5400.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        5,
        1.5,
        "5",
        "1.5",
        "",
        "s",
        "ms",
        "-1s",
        "1S",
        "1sec",
        "1 day",
        "1s x",
        ".5s",
        "1e3s",
        "1h30",
        None,
        True,
        False,
        [1],
        {"s": 1},
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    message = str(info.value)
    assert message == f"invalid duration {value!r}: give a number with a unit, e.g. 500ms, 1s, 5m, 24h, 7d"


def test_every_example_in_the_duration_error_is_a_duration() -> None:
    # The CLI's own examples use days (`inbox prune --older-than 7d`): the error names them too.
    examples = EXAMPLES.split(", ")
    assert examples == ["500ms", "1s", "5m", "24h", "7d"]
    assert [parse_duration(example) for example in examples] == [0.5, 1.0, 300.0, 86400.0, 604800.0]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "200ms"),
        (0.0, "0ms"),
        (0.5, "500ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (30.0, "30s"),
        (90.0, "90s"),
        (60.0, "1m"),
        (300.0, "5m"),
        (5400.0, "90m"),
        (3600.0, "1h"),
        (86400.0, "1d"),
        (7 * 86400.0, "7d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=999_999))
def test_format_then_parse_round_trips_whole_milliseconds(millis: int) -> None:
    seconds = millis / 1000
    assert math.isclose(parse_duration(format_duration(seconds)), seconds, abs_tol=1e-9)


@given(st.integers(min_value=0, max_value=10_000), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_parse_single_unit(number: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}[unit]
    assert parse_duration(f"{number}{unit}") == pytest.approx(number * factor)


# --- envsubst -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": "x"}, "x"),
        ("${A:-}", {}, ""),
        ("${A:-a b:c/d}", {}, "a b:c/d"),
        ("no variables", {}, "no variables"),
        ("${_x1}", {"_x1": "v"}, "v"),
        # set but empty: an empty value, unless a default is given (":-" semantics)
        ("${A}", {"A": ""}, ""),
        ("[${A}]", {"A": ""}, "[]"),
        ("${A:-d}", {"A": ""}, "d"),
        # $$ is a literal $
        ("$$", {}, "$"),
        ("cost: $$5", {}, "cost: $5"),
        ("$${A}", {}, "${A}"),
        ("$$$${A}", {"A": "x"}, "$${A}"),
        ("$$${A}", {"A": "x"}, "$x"),
        # a lone $ not followed by { is left alone
        ("a$b", {}, "a$b"),
        ("$", {}, "$"),
    ],
)
def test_substitute(text: str, env: dict[str, str], expected: str) -> None:
    assert substitute(text, env) == expected


def test_substituted_value_is_not_substituted_again() -> None:
    assert substitute("${A}", {"A": "${B}", "B": "no"}) == "${B}"
    assert substitute("${A}", {"A": "$$"}) == "$$"


def test_unset_variable_raises_naming_it() -> None:
    with pytest.raises(UnsetVariable) as info:
        substitute("x-${MISSING_VAR}-y", {"OTHER": "1"})
    assert info.value.name == "MISSING_VAR"
    assert str(info.value) == "environment variable MISSING_VAR is not set"
    assert isinstance(info.value, ValueError)


def test_first_unset_variable_is_named() -> None:
    with pytest.raises(UnsetVariable) as info:
        substitute("${SET}${FIRST}${SECOND}", {"SET": "1"})
    assert info.value.name == "FIRST"


@pytest.mark.parametrize("text", ["${", "${A", "${A:-x", "${}", "${1A}", "${A-b}", "${A:b}", "${A B}", "x ${ y"])
def test_malformed_reference_raises(text: str) -> None:
    with pytest.raises(ValueError, match=r"^malformed variable reference .*use \$\{NAME\}"):
        substitute(text, {"A": "a"})


def test_nested_default_is_not_passed_through_literally() -> None:
    try:
        result = substitute("${A:-${B}}", {"B": "b"})
    except ValueError:
        return  # rejecting it as malformed is fine too
    assert result == "b"


YAML_LOOKING = [
    "{a: 1, b: [2, 3]}",
    "- item\n- other",
    "key: value",
    "&anchor *alias !!python/object:os.system",
    "true",
    "123",
    "null",
    "'quoted'",
    "# comment",
    "a\nb: c\n  d",
]


@pytest.mark.parametrize("value", YAML_LOOKING)
def test_value_with_yaml_syntax_stays_a_plain_string_in_config(value: str) -> None:
    tree = {
        "database": {"dsn": "${DSN}"},
        "brokers": {"b": {"type": "file", "path": "${P}"}},
        "routes": [{"topic": "*", "broker": "b", "destination": "${P}"}],
    }
    config = parse(yaml.safe_dump(tree), source="relay.yaml", env={"DSN": value, "P": value})
    assert config.database.dsn.get_secret_value() == value
    assert config.brokers["b"].options == {"path": value}
    assert config.routes[0].destination == value


def test_variable_cannot_add_keys_to_config() -> None:
    # Substituted after parsing: a value holding "x\nrelay:\n  batch_size: 1" is one string.
    text = "database:\n  dsn: ${DSN}\nbrokers:\n  b: {type: stdout}\nroutes:\n  - {topic: '*', broker: b}\n"
    injected = "x\nrelay:\n  batch_size: 1"
    config = parse(text, source="relay.yaml", env={"DSN": injected})
    assert config.relay.batch_size == 1000
    assert config.database.dsn.get_secret_value() == injected


@given(st.text(st.characters(blacklist_characters="$"), max_size=40))
def test_text_without_dollar_is_unchanged(text: str) -> None:
    assert substitute(text, {}) == text


@given(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.text(max_size=30),
)
def test_any_value_is_inserted_verbatim(name: str, value: str) -> None:
    assert substitute(f"<${{{name}}}>", {name: value}) == f"<{value}>"
