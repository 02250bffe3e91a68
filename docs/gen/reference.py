"""The reference pages' generated parts, written from the code so they cannot drift.

- configuration keys from the pydantic model (outbox_relay/config.py): every field, its
  type, default and ``description``;
- the command line from the click commands' help (outbox_relay/cli/), walked
  recursively from ``outbox-relay``;
- the metrics from the registry of ``RelayMetrics`` (outbox_relay/observability/metrics.py):
  name, type, help and labels;
- each built-in adapter's options from its pydantic model (adapters/): key, type,
  default, and what it means from the field's description or its comment;
- the SQL functions' signatures from the schema's files (schema/schema.sql, schema/inbox.sql);
- the Python API's functions (their signatures and docstrings) from the modules an
  application imports.

A page holds each part between two markers, ``<!-- generated: NAME -->`` and
``<!-- end generated: NAME -->``, so GitHub shows it too. ``mkdocs build`` writes the
parts afresh (docs/gen/hooks.py), and tests/docs/test_reference_pages.py fails when the
committed part differs from the code's. After changing a config key, a command or a
metric, rewrite them with:

    .venv/bin/python docs/gen/reference.py
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import annotated_types  # noqa: E402  (a pydantic dependency)
import click  # noqa: E402
from pydantic import BaseModel, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

# ---------------------------------------------------------------- regions in pages

_REGION = re.compile(
    r"(<!-- generated: (?P<name>[a-z-]+)[^>]*-->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
    re.DOTALL,
)


def regions(text: str) -> dict[str, str]:
    """The generated parts a page holds, by name."""
    return {match["name"]: match["body"] for match in _REGION.finditer(text)}


def fill(text: str) -> str:
    """The page with each generated part written afresh from the code."""

    def body(match: re.Match[str]) -> str:
        return match.group(1) + GENERATORS[match["name"]]() + match.group(4)

    return _REGION.sub(body, text)


# ---------------------------------------------------------------- configuration


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _docs_link(text: str, page: str) -> str:
    """Links written relative to docs/ in a description, made relative to `page`."""
    depth = page.count("/")
    return re.sub(r"\]\((?!https?://|#|\.\./)", "](" + "../" * depth, text)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
        return typing.Union[tuple(rest)], True  # noqa: UP007
    return annotation, False


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation is (one, or a union of several)."""
    annotation, _ = _unwrap_optional(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(annotation) if inspect.isclass(a) and issubclass(a, BaseModel)]
        if len(found) == len(typing.get_args(annotation)):
            return found
    return []


def _blocks_in(annotation: Any) -> list[type[BaseModel]]:
    """The models among a union's members (`tls: TlsOptions | bool`: the block form)."""
    annotation, _ = _unwrap_optional(annotation)
    return [a for a in typing.get_args(annotation) if inspect.isclass(a) and issubclass(a, BaseModel)]


def _bounds(metadata: list[Any]) -> str:
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.MinLen) and item.min_length:
            low = f"length {item.min_length}"
    if low is not None and high is not None:
        return f" ({low:,} to {high:,})" if isinstance(low, int) else ""
    if isinstance(low, int):
        return f" (at least {low:,})"
    return ""


def _kind(field: FieldInfo) -> str:
    """What a value of this field is, in words."""
    from outbox_relay.durations import parse_duration

    annotation, optional = _unwrap_optional(field.annotation)
    metadata = list(field.metadata)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += extra
    validators = [getattr(m, "func", None) for m in metadata]
    origin = typing.get_origin(annotation)
    if parse_duration in validators:
        kind = "duration"
    elif any(getattr(f, "__name__", "") == "_byte_count" for f in validators):
        kind = "size (bytes, or `256KiB`, `5MB`...)"
    elif annotation is bool:
        kind = "boolean"
    elif annotation is int:
        kind = "integer" + _bounds(metadata)
    elif annotation is SecretStr:
        kind = "string (secret)"
    elif annotation is str:
        kind = "string"
    elif origin is typing.Literal:
        kind = " | ".join(f"`{value}`" for value in typing.get_args(annotation))
    elif origin is list:
        kind = "list of strings"
    elif origin is dict:
        kind = "map of strings"
    elif _models_in(annotation):
        return "a block"
    elif origin in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {str, list[str]}:
        kind = "string or list of strings"
    elif origin in (typing.Union, types.UnionType) and bool in typing.get_args(annotation) and _blocks_in(annotation):
        return "`true`, `false` or a block"
    else:
        kind = str(annotation)
    return kind + (" or `null`" if optional and kind != "string" else "")


def _duration(seconds: float) -> str:
    """A default duration as the docs write it: `200ms`, `60s`, `24h`, `7d`."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds <= 60 or seconds % 60:
        return f"{seconds:g}s"
    if seconds > 2 * 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:g}d"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds / 60:g}m"


def _shown_default(field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown_default" in extra:
        return str(extra["shown_default"])
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    kind = _kind(field)
    if kind.startswith("duration"):
        return f"`{_duration(value)}`"
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value % size == 0:
                return f"`{value}` ({value // size} {unit})"
    if isinstance(value, list):
        return "`[]`" if not value else f"`{value}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


# Blocks that may be left out (`claim_check`, `dead_letters.publish_to`): a key
# required inside one is required only with it. Filled by config_keys().
OPTIONAL_BLOCKS: set[str] = set()


def config_keys() -> Iterator[tuple[str, FieldInfo]]:
    """Every key of the relay's configuration, as a dotted path, with its field.

    A block whose model was shown under another key (a route's `claim_check`) is one
    key, not its keys again. A block told apart by `type` (`claim_check.store`) has
    its `type` once, then each kind's keys, their description saying which kind."""
    from outbox_relay.config import Config

    yield from _walk(Config, "", set())


def _walk(
    model: type[BaseModel],
    prefix: str,
    seen: set[type[BaseModel]],
    only: str = "",
    optional_blocks: set[str] = OPTIONAL_BLOCKS,
) -> Iterator[tuple[str, FieldInfo]]:
    """The keys under `model`; the blocks that may be left out go into `optional_blocks`."""
    seen.add(model)
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        annotation, _ = _unwrap_optional(field.annotation)
        origin = typing.get_origin(annotation)
        if origin is dict and _models_in(typing.get_args(annotation)[1]):
            yield from _walk(_models_in(typing.get_args(annotation)[1])[0], key + ".NAME.", seen, "", optional_blocks)
        elif origin is list and _models_in(typing.get_args(annotation)[0]):
            yield from _walk(_models_in(typing.get_args(annotation)[0])[0], key + "[].", seen, "", optional_blocks)
        elif (models := _models_in(annotation)) and not seen.intersection(models):
            if not field.is_required() and field.get_default() is None:
                optional_blocks.add(key)
            if len(models) > 1:  # a union told apart by `type`
                kinds = [typing.get_args(member.model_fields["type"].annotation)[0] for member in models]
                yield f"{key}.type", _described(field, typing.Literal[tuple(kinds)])  # type: ignore[misc]
                for kind, member in zip(kinds, models, strict=True):
                    yield from _walk(member, key + ".", seen, kind, optional_blocks)
            else:
                yield from _walk(models[0], key + ".", seen, "", optional_blocks)
        elif (blocks := _blocks_in(annotation)) and not seen.intersection(blocks):
            # A key that is a value or a block (`tls: true`, `tls: {ca_file: ...}`): its
            # row, then the block's keys.
            yield key, field
            yield from _walk(blocks[0], key + ".", seen, "", optional_blocks)
        elif name == "type" and only:
            continue
        elif only:
            yield key, _described(field, field.annotation, f"`type: {only}`: {field.description or ''}")
        else:
            yield key, field


def _default_in(key: str, field: FieldInfo, optional_blocks: set[str]) -> str:
    """The default shown for `key`: a key required inside a block that may be left out
    is required only with that block."""
    default = _shown_default(field)
    blocks = [block for block in optional_blocks if key.startswith(block + ".")]
    if default == "required" and blocks:
        default = f"required with `{max(blocks, key=len)}`"
    return default


def _described(field: FieldInfo, annotation: Any, description: str | None = None) -> FieldInfo:
    """A copy of `field` with another annotation or description, for a row of its own."""
    copy = FieldInfo.merge_field_infos(field, annotation=annotation)
    copy.annotation = annotation
    if description is not None:
        copy.description = description
    return copy


def config_reference() -> str:
    page = "reference/configuration.md"
    lines: list[str] = []
    section = None
    for key, field in config_keys():
        top = key.split(".")[0].split("[")[0]
        if top != section:
            section = top
            lines += ["", f"### `{top}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        default = _default_in(key, field, OPTIONAL_BLOCKS)
        lines.append(
            f"| `{key}` | {_cell(_kind(field))} | {_cell(default)} | "
            f"{_cell(_docs_link(field.description or '', page))} |"
        )
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------- adapter options

# The built-in adapters (docs/reference/adapters.md), each with the model its
# `brokers.NAME` block is read into (adapters/_options.py parse_options).
ADAPTER_MODELS = (
    ("file", "outbox_relay_adapters.file", "FileOptions"),
    ("webhook", "outbox_relay_adapters.webhook", "WebhookOptions"),
    ("kafka", "outbox_relay_adapters._kafka_common", "KafkaOptions"),
    ("rabbitmq", "outbox_relay_adapters.rabbitmq", "RabbitOptions"),
    ("sqs", "outbox_relay_adapters.sqs", "SqsOptions"),
    ("redis", "outbox_relay_adapters.redis_streams", "RedisOptions"),
    ("nats", "outbox_relay_adapters.nats", "NatsOptions"),
)


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the model's source (the lines just above it and the one
    after it): the adapters describe their options there, for their readers too."""
    notes: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (inspect.isclass(cls) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines[1:]:
            if re.match(r"^ {4}#", line):
                above.append(line.strip()[1:].strip())
                continue
            field = re.match(r"^ {4}(\w+)\s*:", line)
            if field and field[1] in cls.model_fields:
                after = line.split("  # ", 1)[1] if "  # " in line else ""
                notes[field[1]] = " ".join([*above, after]).strip()
            above = []
    return notes


def adapter_options() -> Iterator[tuple[str, str, FieldInfo, str]]:
    """(adapter type, option key, its field, what it means) of every built-in adapter."""
    for kind, key, field, meaning, _ in _adapter_options():
        yield kind, key, field, meaning


def _adapter_options() -> Iterator[tuple[str, str, FieldInfo, str, str]]:
    """adapter_options() with each option's default as the page shows it."""
    import importlib

    for kind, module, name in ADAPTER_MODELS:
        model = getattr(importlib.import_module(module), name)
        notes: dict[int, str] = {}
        for block in _all_models(model):
            for field_name, text in _comments(block).items():
                notes[id(block.model_fields[field_name])] = text
        optional_blocks: set[str] = set()
        for key, field in _walk(model, "", set(), "", optional_blocks):
            meaning = (field.description or notes.get(id(field), "")).strip()
            yield kind, key, field, meaning, _default_in(key, field, optional_blocks)


def _all_models(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    yield model
    for field in model.model_fields.values():
        annotation, _ = _unwrap_optional(field.annotation)
        for block in _models_in(annotation) or _blocks_in(annotation):
            yield from _all_models(block)


def adapter_options_reference() -> str:
    page = "reference/adapters.md"
    lines: list[str] = []
    section = None
    for kind, key, field, meaning, default in _adapter_options():
        if kind != section:
            section = kind
            lines += ["", f"### `type: {kind}`", "", "| option | type | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | {_cell(_kind(field))} | {_cell(default)} | {_cell(_docs_link(meaning, page))} |")
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------- command line


def commands() -> Iterator[tuple[str, click.Command, click.Context]]:
    """Every command of `outbox-relay`, groups and subcommands: its full name, itself and
    its context (a child of its group's, as when it runs: settings are inherited)."""
    from outbox_relay.cli import main

    def walk(
        name: str, command: click.Command, ctx: click.Context
    ) -> Iterator[tuple[str, click.Command, click.Context]]:
        yield name, command, ctx
        if isinstance(command, click.Group):
            for sub in sorted(command.commands):
                child = command.commands[sub]
                yield from walk(f"{name} {sub}", child, click.Context(child, info_name=sub, parent=ctx))

    yield from walk("outbox-relay", main, click.Context(main, info_name="outbox-relay", **main.context_settings))


def _plain(text: str) -> str:
    """Help text shown as Markdown: what Markdown would take for markup, escaped."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")


def _help_text(command: click.Command) -> str:
    text = inspect.cleandoc(command.help or "")
    # click's \b marks a paragraph it must not rewrap; Markdown rewraps nothing that matters.
    return _plain("\n".join(line for line in text.splitlines() if line.strip() != "\b").strip())


def options(command: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    """(names, help) of each option as `--help` shows it, the help option included
    (arguments are the command's help text's to explain)."""
    return [
        record
        for param in command.get_params(ctx)
        if isinstance(param, click.Option) and (record := param.get_help_record(ctx)) is not None
    ]


def cli_reference() -> str:
    lines: list[str] = []
    for name, command, ctx in commands():
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += ["", f"### `{name}`", "", f"`{name} {usage}`", "", _help_text(command)]
        if isinstance(command, click.Group):
            lines += ["", "| command | what it does |", "|---|---|"]
            for sub in sorted(command.commands):
                short = command.commands[sub].get_short_help_str(limit=200)
                anchor = re.sub(r"[^a-z0-9 -]", "", f"{name} {sub}".lower()).replace(" ", "-")
                lines.append(f"| [`{sub}`](#{anchor}) | {_cell(_plain(short))} |")
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        if arguments:
            lines += ["", "Arguments: " + ", ".join(f"`{a.human_readable_name}`" for a in arguments) + "."]
        lines += ["", "| option | meaning |", "|---|---|"]
        lines += [
            f"| `{_cell(names)}` | {_cell(_plain(help_text)) or '(no help)'} |"
            for names, help_text in options(command, ctx)
        ]
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------- metrics


def metrics() -> list[tuple[str, str, str, list[str]]]:
    """(name as queried, type, help, label names) of every metric a relay serves."""
    from prometheus_client.metrics import MetricWrapperBase

    from outbox_relay.observability.metrics import RelayMetrics

    relay_metrics = RelayMetrics()
    labels = {
        collector._name: list(collector._labelnames)
        for collector in vars(relay_metrics).values()
        if isinstance(collector, MetricWrapperBase)
    }
    found = []
    for family in relay_metrics.registry.collect():
        shown = family.name + ("_total" if family.type == "counter" else "")
        found.append((shown, family.type, family.documentation, labels.get(family.name, [])))
    return sorted(found)


def metrics_reference() -> str:
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, documentation, label_names in metrics():
        shown_labels = ", ".join(f"`{label}`" for label in label_names) or "none"
        lines.append(f"| `{name}` | {kind} | {shown_labels} | {_cell(documentation)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- SQL functions

_FUNCTION = re.compile(r"^CREATE FUNCTION \{schema\}\.(?P<name>\w+)\((?P<rest>.*?)\n(?:LANGUAGE|AS)", re.M | re.S)
SQL_FILES = ("schema/schema.sql", "schema/inbox.sql")


def sql_functions() -> list[tuple[str, str, str]]:
    """(file, name, signature) of every function the schema files create."""
    found = []
    for file in SQL_FILES:
        text = (ROOT / file).read_text(encoding="utf-8")
        schema = "inbox" if file.endswith("inbox.sql") else "outbox"
        for match in _FUNCTION.finditer(text):
            signature = " ".join(f"{match['name']}({match['rest']}".split()).replace("{{}}", "{}")
            signature = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", signature)).replace("{schema}", schema)
            found.append((file, match["name"], f"{schema}.{signature}"))
    return found


def sql_reference() -> str:
    lines: list[str] = []
    for file, _name, signature in sql_functions():
        lines += [f"- `{signature}` ([`{file}`](../../{file}))"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Python API

# The modules an application imports, and what of them it calls: their __all__'s functions.
PYTHON_MODULES = ("outbox_relay", "outbox_relay.claim_check", "outbox_relay.inbox", "outbox_relay.tracing")


def python_functions() -> list[tuple[str, Callable[..., Any]]]:
    """(dotted name, function) of every public function of the application's API."""
    import importlib

    found = []
    for name in PYTHON_MODULES:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for attribute in public:
            value = getattr(module, attribute)
            if inspect.isfunction(value) and (hasattr(module, "__all__") or value.__module__ == name):
                found.append((f"{name}.{attribute}", value))
    return found


def _signature(name: str, function: Callable[..., Any]) -> str:
    """A function's signature as written in its source (annotations unquoted), one
    parameter a line."""
    signature = inspect.signature(function)
    params = []
    star = False
    for param in signature.parameters.values():
        if param.kind is param.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        shown = param.name
        if param.kind is param.VAR_POSITIONAL:
            shown, star = f"*{param.name}", True
        elif param.kind is param.VAR_KEYWORD:
            shown = f"**{param.name}"
        if param.annotation is not param.empty:
            shown += f": {param.annotation}"
        if param.default is not param.empty:
            shown += f" = {param.default!r}"
        params.append(shown)
    prefix = "async def" if inspect.iscoroutinefunction(function) else "def"
    returns = f" -> {signature.return_annotation}" if signature.return_annotation is not signature.empty else ""
    body = "".join(f"    {param},\n" for param in params)
    return f"{prefix} {name.rsplit('.', 1)[1]}(\n{body}){returns}"


def python_reference() -> str:
    lines: list[str] = []
    for name, function in python_functions():
        lines += ["", f"### `{name}`", "", "```python", _signature(name, function), "```", ""]
        lines.append(_plain(inspect.cleandoc(function.__doc__ or "")))
    return "\n".join(lines).lstrip("\n") + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "config": config_reference,
    "cli": cli_reference,
    "metrics": metrics_reference,
    "sql": sql_reference,
    "python": python_reference,
    "adapter-options": adapter_options_reference,
}

PAGES = (
    "reference/configuration.md",
    "reference/cli.md",
    "reference/metrics.md",
    "reference/sql.md",
    "reference/python-api.md",
    "reference/adapters.md",
)


def main() -> None:
    """Rewrite the generated parts of the reference pages in place."""
    for page in PAGES:
        path = DOCS / page
        text = path.read_text(encoding="utf-8")
        new = fill(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
