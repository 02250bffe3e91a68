"""The generated reference pages match the code, and everything in the code is documented:
a config key, CLI option, metric or SQL function added without a description fails here."""

from __future__ import annotations

import re

import pytest

from tests.support.docs import DOCS, generator, hand_written, page

REGENERATE = "run `.venv/bin/python docs/gen/reference.py` and commit the pages it rewrites"


@pytest.mark.parametrize("name", generator().PAGES)
def test_the_generated_parts_are_what_the_code_says(name: str) -> None:
    reference = generator()
    text = (DOCS / name).read_text(encoding="utf-8")
    assert reference.regions(text), f"{name} holds no generated part"
    assert reference.regions(text) == reference.regions(reference.fill(text)), f"{name} is stale: {REGENERATE}"


def test_every_config_key_has_a_description_and_is_on_the_page() -> None:
    text = page("reference/configuration.md")
    undescribed = [key for key, field in generator().config_keys() if not (field.description or "").strip()]
    missing = [key for key, _ in generator().config_keys() if f"| `{key}` |" not in text]
    assert undescribed == [], "give these fields a description= in outbox_relay/config.py"
    assert missing == [], REGENERATE


def test_every_adapter_option_has_a_meaning_and_is_on_the_page() -> None:
    # A meaning: the field's description, or the comment above it in the adapter's model.
    text = page("reference/adapters.md")
    options = [(kind, key, meaning) for kind, key, _, meaning in generator().adapter_options()]
    assert {kind for kind, _, _ in options} == {"file", "webhook", "kafka", "rabbitmq", "sqs", "redis", "nats"}
    assert {"tls.key_password", "token", "creds_file"} <= {key for kind, key, _ in options if kind == "nats"}
    unexplained = [f"{kind}: {key}" for kind, key, meaning in options if not meaning]
    missing = [
        f"{kind}: {key}"
        for kind, key, _ in options
        if f"| `{key}` |" not in text.split(f"### `type: {kind}`", 1)[-1].split("\n### ", 1)[0]
    ]
    assert unexplained == [], "give these options a comment above their field in adapters/"
    assert missing == [], REGENERATE


def test_every_command_and_option_has_help_and_is_on_the_page() -> None:
    text = page("reference/cli.md")
    unhelped, missing = [], []
    for name, command, ctx in generator().commands():
        if not (command.help or "").strip():
            unhelped.append(name)
        if f"### `{name}`" not in text:
            missing.append(name)
        for names, help_text in generator().options(command, ctx):
            if not help_text.strip():
                unhelped.append(f"{name} {names}")
            if f"| `{generator()._cell(names)}` |" not in text.split(f"### `{name}`", 1)[-1]:
                missing.append(f"{name} {names}")
    assert unhelped == [], "give these commands and options help= in outbox_relay/cli/"
    assert missing == [], REGENERATE


def test_every_metric_has_help_and_is_on_the_page() -> None:
    text = page("reference/metrics.md")
    metrics = generator().metrics()
    assert len(metrics) >= 20
    assert [name for name, _, help_text, _ in metrics if not help_text.strip()] == []
    assert [name for name, *_ in metrics if f"| `{name}` |" not in text] == [], REGENERATE


def test_every_sql_function_is_described_by_hand() -> None:
    # The generated list has every signature; the tables above it must say what each is for.
    described = hand_written(page("reference/sql.md"))
    functions = generator().sql_functions()
    assert {name for _, name, _ in functions} >= {"enqueue", "enqueue_binary", "receipt", "first_time", "prune"}
    undescribed = [
        f"{file}: {name}" for file, name, _ in functions if not re.search(rf"`(outbox|inbox)\.{name}\(", described)
    ]
    assert undescribed == [], "add a row for these to docs/reference/sql.md"


def test_every_public_function_has_a_docstring_and_is_on_the_page() -> None:
    text = page("reference/python-api.md")
    functions = generator().python_functions()
    assert {"outbox_relay.enqueue", "outbox_relay.inbox.first_time"} <= {name for name, _ in functions}
    assert [name for name, function in functions if not (function.__doc__ or "").strip()] == []
    assert [name for name, _ in functions if f"### `{name}`" not in text] == [], REGENERATE


def test_the_enqueue_table_names_every_parameter() -> None:
    import inspect

    from outbox_relay import enqueue

    described = hand_written(page("reference/python-api.md"))
    assert [p for p in inspect.signature(enqueue).parameters if f"| `{p}` |" not in described] == []
