"""Where a command connects (`cli.common.resolve`): one rule for every command, and
click's errors as one line (`cli.output.usage_line`). No database: the DSNs are text."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from outbox_relay.cli import main
from outbox_relay.cli.common import resolve
from outbox_relay.cli.output import usage_line
from outbox_relay.errors import CommandLineError, ConfigError


def _config(path: Path, dsn: str, schema: str = "outbox") -> Path:
    path.write_text(
        f"database: {{dsn: '{dsn}', schema: {schema}}}\n"
        "brokers: {a: {type: stdout}}\nroutes: [{topic: '*', broker: a}]\n"
    )
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory without a relay.yaml."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_dsn_alone_connects_to_the_default_schema(elsewhere: Path) -> None:
    target = resolve(command="status", dsn="host=a", config_path=None, schema=None, env={})
    assert (target.dsn, target.schema, target.config) == ("host=a", "outbox", None)
    named = resolve(command="status", dsn="host=a", config_path=None, schema="events", env={})
    assert named.schema == "events"


def test_database_url_is_read_when_no_config_is_found(elsewhere: Path) -> None:
    target = resolve(command="status", dsn=None, config_path=None, schema=None, env={"DATABASE_URL": "host=env"})
    assert (target.dsn, target.config) == ("host=env", None)


def test_a_config_names_the_database_and_the_schema(elsewhere: Path) -> None:
    path = _config(elsewhere / "other.yaml", "host=cfg", "events")
    env = {"DATABASE_URL": "host=env"}
    target = resolve(command="status", dsn=None, config_path=path, schema=None, env=env)
    assert (target.dsn, target.schema) == ("host=cfg", "events"), "the config's DSN, not DATABASE_URL's"
    assert target.config is not None
    # --dsn beside --config: connect with it, the rest from the config.
    other = resolve(command="status", dsn="host=cli", config_path=path, schema=None, env=env)
    assert (other.dsn, other.schema) == ("host=cli", "events")
    assert other.full_config().database.dsn.get_secret_value() == "host=cli"


def test_the_environments_config_and_relay_yaml_are_read_when_they_exist(elsewhere: Path) -> None:
    named = _config(elsewhere / "named.yaml", "host=named", "named")
    _config(elsewhere / "relay.yaml", "host=here", "here")
    from_env = resolve(
        command="status", dsn=None, config_path=None, schema=None, env={"OUTBOX_RELAY_CONFIG": str(named)}
    )
    assert (from_env.dsn, from_env.schema) == ("host=named", "named")
    here = resolve(command="status", dsn=None, config_path=None, schema=None, env={"DATABASE_URL": "host=env"})
    assert (here.dsn, here.schema) == ("host=here", "here")
    # A --dsn on the command line reads no config it was not given.
    given = resolve(command="status", dsn="host=cli", config_path=None, schema=None, env={})
    assert (given.dsn, given.schema, given.config) == ("host=cli", "outbox", None)


def test_a_config_the_environment_names_that_does_not_exist_falls_through_to_database_url(elsewhere: Path) -> None:
    # The image sets OUTBOX_RELAY_CONFIG in every container; a schema-install Job mounts no config.
    env = {"OUTBOX_RELAY_CONFIG": "/etc/outbox-relay/relay.yaml", "DATABASE_URL": "host=ddl"}
    target = resolve(command="schema install", dsn=None, config_path=None, schema="outbox", env=env)
    assert (target.dsn, target.config) == ("host=ddl", None)
    with pytest.raises(CommandLineError) as nothing:
        resolve(command="status", dsn=None, config_path=None, schema=None, env={**env, "DATABASE_URL": ""})
    assert "no database given: --dsn DSN (or set DATABASE_URL), or --config FILE" in str(nothing.value)
    assert "OUTBOX_RELAY_CONFIG names /etc/outbox-relay/relay.yaml, which does not exist" in str(nothing.value)


def test_a_config_given_on_the_command_line_must_load(elsewhere: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file \(check the path\)$"):
        resolve(command="status", dsn="host=a", config_path=elsewhere / "nope.yaml", schema=None, env={})
    # The inbox's commands never read OUTBOX_RELAY_CONFIG: not named to them either.
    with pytest.raises(ConfigError) as inbox:
        resolve(
            command="inbox prune",
            dsn=None,
            config_path=elsewhere / "nope.yaml",
            schema=None,
            implicit_config=False,
            env={"OUTBOX_RELAY_CONFIG": "/etc/relay.yaml"},
        )
    assert "OUTBOX_RELAY_CONFIG" not in str(inbox.value) and "--config" not in str(inbox.value)
    with pytest.raises(CommandLineError) as no_database:
        resolve(command="inbox prune", dsn=None, config_path=None, schema=None, implicit_config=False, env={})
    assert "OUTBOX_RELAY_CONFIG" not in str(no_database.value)


def test_a_command_that_needs_a_config_says_why_and_how(elsewhere: Path) -> None:
    with pytest.raises(CommandLineError) as refused:
        resolve(command="replay", dsn="host=a", config_path=None, schema=None, needs_config="its routes", env={})
    assert str(refused.value).startswith("`outbox-relay replay` needs a config (its routes): give --config FILE")
    # It reads the environment's config even beside --dsn (it cannot work without one).
    path = _config(elsewhere / "named.yaml", "host=cfg")
    found = resolve(
        command="replay",
        dsn="host=cli",
        config_path=None,
        schema=None,
        needs_config="its routes",
        env={"OUTBOX_RELAY_CONFIG": str(path)},
    )
    assert found.dsn == "host=cli" and found.config is not None


def test_a_schema_that_contradicts_the_config_is_refused(elsewhere: Path) -> None:
    path = _config(elsewhere / "c.yaml", "host=cfg", "events")
    same = resolve(command="status", dsn=None, config_path=path, schema="events", env={})
    assert same.schema == "events"
    with pytest.raises(CommandLineError, match=r"--schema other differs from database\.schema 'events'"):
        resolve(command="status", dsn=None, config_path=path, schema="other", env={})


def test_the_inbox_reads_a_config_only_when_given_one(elsewhere: Path) -> None:
    _config(elsewhere / "relay.yaml", "host=outbox", "events")
    inbox = {"implicit_config": False, "schema_from_config": False, "default_schema": "inbox"}
    target = resolve(
        command="inbox prune", dsn=None, config_path=None, schema=None, env={"DATABASE_URL": "host=consumer"}, **inbox
    )
    assert (target.dsn, target.schema, target.config) == ("host=consumer", "inbox", None)
    given = resolve(command="inbox prune", dsn=None, config_path=elsewhere / "relay.yaml", schema=None, env={}, **inbox)
    assert (given.dsn, given.schema) == ("host=outbox", "inbox"), "the config's database, the inbox's schema"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            click.NoSuchOption("--idd", possibilities=["--id"]),
            "no such option '--idd' (did you mean '--id'?)",
        ),
        (
            click.NoSuchOption("--to", possibilities=["--topic", "--top"]),
            "no such option '--to' (did you mean one of: '--top', '--topic'?)",
        ),
        (click.BadParameter("0 is not in the range", param_hint="'--limit'"), "invalid value for '--limit': 0 is not"),
        (
            click.UsageError("Got unexpected extra arguments (a b)\nand more"),
            "got unexpected extra arguments (a b) and more",
        ),
    ],
)
def test_click_errors_become_one_line_naming_the_option(error: click.ClickException, line: str) -> None:
    text = usage_line(error)
    assert text.startswith(line) and "\n" not in text and not text.endswith("."), text
    with click.Context(click.Command("list"), info_name="outbox-relay") as ctx:
        error.ctx = ctx  # type: ignore[attr-defined]
        assert usage_line(error).endswith("; see 'outbox-relay --help'")


def test_help_names_each_variable_an_option_reads_as_click_shows_it() -> None:
    def helped(*args: str) -> str:
        out = CliRunner().invoke(main, [*args, "--help"], terminal_width=400)
        assert out.exit_code == 0, out.output
        return " ".join(out.output.split())

    status = helped("status")
    assert "[env var: DATABASE_URL]" in status and "[env var: OUTBOX_RELAY_CONFIG]" in status
    assert "DATABASE_URL comes after a config found (--config, OUTBOX_RELAY_CONFIG, ./relay.yaml)" in status
    assert "(env:" not in status
    inbox = helped("inbox", "prune")
    assert "OUTBOX_RELAY_CONFIG" not in inbox and "[env var: DATABASE_URL]" in inbox
    assert "[env var: OUTBOX_DEMO_DSN]" in helped("demo")


def test_finishing_another_roles_record_prints_none_of_its_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A replay or backfill recorded by another role names what it copies in that role's
    # words (a key, a topic, a quoted table name may hold ESC): asked about, not obeyed.
    from outbox_relay.cli.common import confirm_finish

    confirm_finish(
        "backfill",
        3,
        created_by="intruder\x1b]0;owned\x07",
        own=False,
        acts="copy public.\x1b[2Jorders to topic o\x9bx",
        dry_run=True,
        yes=False,
    )
    said = capsys.readouterr().out
    assert "backfill #3 was recorded by role 'intruder?]0;owned?'" in said
    assert not any(c in said for c in "\x1b\x07\x9b"), repr(said)


def test_a_refused_switch_to_wal_says_the_slot_it_created_remains(monkeypatch: pytest.MonkeyPatch) -> None:
    # The refusal says "Nothing changed" of the source; a slot this run created before
    # it keeps WAL: one line says so, and how to drop it.
    import importlib

    from outbox_relay.cli.common import Target
    from outbox_relay.errors import SchemaError

    def refused(*args: object, **kwargs: object) -> bool:
        raise SchemaError("schema source: transactions ... stayed open for 1s. Nothing changed")

    class Conn:
        autocommit = False

    schema_cli = importlib.import_module("outbox_relay.cli.schema")  # the module, not its click group
    monkeypatch.setattr(schema_cli.wal_slot, "create", lambda conn, slot, publication: True)
    monkeypatch.setattr(schema_cli.schema_manager, "set_source", refused)
    said: list[str] = []
    with pytest.raises(SchemaError):
        schema_cli._switch_source(Conn(), Target("", "outbox", None), "wal", "s1", 1.0, say=said.append)  # type: ignore[arg-type]
    assert said[0] == "created replication slot and publication 's1'"
    assert said[-1].startswith("the replication slot and publication 's1' created above remain")
