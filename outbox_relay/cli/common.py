"""What every command shares: where the database is, the options with one meaning
everywhere, the connection, confirmations and progress.

Errors and exit codes are `output`'s (one line, 0/1/2); this module raises
OutboxRelayError for what it refuses, before any connection.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
import structlog
from pydantic import SecretStr

from outbox_relay import config as config_module
from outbox_relay import schema_version, sqlfiles
from outbox_relay.cli.output import interrupted, one_line_errors
from outbox_relay.connections import connect_sync
from outbox_relay.durations import parse_duration
from outbox_relay.errors import CommandLineError, ConfigError, Declined, SchemaError
from outbox_relay.observability.logging_setup import configure as configure_logging
from outbox_relay.operations.replay import TimeBound, parse_time
from outbox_relay.operations.status import printable

F = TypeVar("F", bound=Callable[..., Any])

DSN_ENV = "DATABASE_URL"
CONFIG_ENV = "OUTBOX_RELAY_CONFIG"
DEFAULT_CONFIG = Path("relay.yaml")


@dataclass(frozen=True)
class Target:
    """The database a command works on: how to connect, the schema, and the config
    when one was read (its routes, dead_letter_policy, relay settings)."""

    dsn: str
    schema: str
    config: config_module.Config | None

    def connect(self) -> psycopg.Connection[Any]:
        return connect(self.dsn)

    def full_config(self) -> config_module.Config:
        """The config, with --dsn in place of its database.dsn when one was given: for
        a command that needs one (`resolve` refused to go on without it)."""
        assert self.config is not None, "resolve() with needs_config returns a config"
        database = self.config.database
        if database.dsn.get_secret_value() == self.dsn:
            return self.config
        return self.config.model_copy(update={"database": database.model_copy(update={"dsn": SecretStr(self.dsn)})})


def resolve(
    *,
    command: str,
    dsn: str | None,
    config_path: Path | None,
    schema: str | None,
    needs_config: str | None = None,
    implicit_config: bool = True,
    schema_from_config: bool = True,
    default_schema: str = sqlfiles.DEFAULT_SCHEMA,
    env: dict[str, str] | None = None,
) -> Target:
    """Where `command` connects, the same way for every command (docs/reference/cli.md, "Where a command connects").

    `dsn` and `config_path` are what the command line gave; the environment is read
    here. A config given on the command line is always read. Otherwise, unless a
    `--dsn` was given to a command that can do without one, the config is
    $OUTBOX_RELAY_CONFIG or ./relay.yaml when that file exists (the image sets the
    variable for every container, and a schema-install Job mounts no config: it then
    falls through to DATABASE_URL). The DSN is `--dsn`, else the config's, else
    $DATABASE_URL: a config names its database fully, and a DATABASE_URL in the same
    environment is most often what its `${DATABASE_URL}` reads anyway.

    `needs_config`: why the command cannot work without one (its brokers, its routes);
    None for a command that needs only the database. `implicit_config` False: only a
    config given on the command line (the inbox's commands: a relay's config found
    beside them names the outbox's database, not the consumer's).
    """
    env = dict(os.environ) if env is None else env
    found, missing = _config_path(config_path, dsn, needs_config, implicit_config, env)
    if found is not None and not found.exists():
        # Only a path given with --config: one the environment names is read only when
        # it exists (else `missing` says so, naming the variable).
        raise ConfigError("no such config file (check the path)", source=str(found))
    config = config_module.load(found) if found is not None else None
    if needs_config and config is None:
        raise CommandLineError(
            f"`outbox-relay {command}` needs a config ({needs_config}): give --config FILE "
            f"(or set {CONFIG_ENV}; ./relay.yaml is read when present){missing}"
        )
    chosen = dsn or (config.database.dsn.get_secret_value() if config else None) or env.get(DSN_ENV) or None
    if chosen is None:
        implicit = f" (or set {CONFIG_ENV}; ./relay.yaml is read when present)" if implicit_config else ""
        raise CommandLineError(f"no database given: --dsn DSN (or set {DSN_ENV}), or --config FILE{implicit}{missing}")
    named = config.database.schema_name if config is not None and schema_from_config else None
    if schema is not None and named is not None and schema != named:
        raise CommandLineError(
            f"--schema {schema} differs from database.schema {named!r} in the config: "
            "drop --schema, or give --dsn without a config to work on another schema"
        )
    return Target(chosen, schema or named or default_schema, config)


def _config_path(
    given: Path | None, dsn: str | None, needs_config: str | None, implicit: bool, env: dict[str, str]
) -> tuple[Path | None, str]:
    """The config file to read (None: none), and a note for an error naming a config
    the environment points at that does not exist."""
    if given is not None:
        return given, ""
    if not implicit or (dsn and not needs_config):
        return None, ""
    named = env.get(CONFIG_ENV)
    if named:
        if Path(named).is_file():
            return Path(named), ""
        missing = f"; {CONFIG_ENV} names {named}, which does not exist"
    else:
        missing = ""
    return (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None), missing


def database_options(
    *, needs_config: str | None = None, inbox: bool = False, dsn_env: str | None = DSN_ENV
) -> Callable[[F], F]:
    """--dsn and --config (and --schema, for a command that can work from a DSN alone),
    resolved by `resolve` into one `target: Target` argument.

    `needs_config`: why the command needs a config (see `resolve`). `inbox`: the
    consumer's database (a config only from --config, the schema `inbox` unless
    --schema). `dsn_env`: the variable --dsn also comes from. A command that needs a
    config takes --dsn only to connect as another role than the config's (backfill's
    from OUTBOX_RELAY_BACKFILL_DSN too), never from DATABASE_URL."""
    default_schema = sqlfiles.DEFAULT_INBOX_SCHEMA if inbox else sqlfiles.DEFAULT_SCHEMA

    def decorate(func: F) -> F:
        @functools.wraps(func)
        @one_line_errors  # what resolve refuses (a config that does not load) is one line too
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            dsn = kwargs.pop("dsn")
            if dsn_env == DSN_ENV and ctx.get_parameter_source("dsn") is not click.core.ParameterSource.COMMANDLINE:
                dsn = None  # DATABASE_URL: `resolve` reads it, after a config
            config_path = kwargs.pop("config_path")
            if ctx.get_parameter_source("config_path") is not click.core.ParameterSource.COMMANDLINE:
                # OUTBOX_RELAY_CONFIG (named in --help): `resolve` reads it by its own
                # rule (beside --dsn not at all; a file it names that is missing is said
                # in the error that follows, not an error of its own).
                config_path = None
            kwargs["target"] = resolve(
                command=ctx.command_path.partition(" ")[2],
                dsn=dsn or None,
                config_path=config_path,
                schema=kwargs.pop("schema_name", None),
                needs_config=needs_config,
                implicit_config=not inbox,
                schema_from_config=not inbox,
                default_schema=default_schema,
            )
            # A bad --schema is refused before any connection.
            (sqlfiles.validate_inbox_schema_name if inbox else sqlfiles.validate_schema_name)(kwargs["target"].schema)
            return func(*args, **kwargs)

        env_note = "; prefer the environment variable for passwords" if dsn_env else ""
        if dsn_env != DSN_ENV:
            order = ""
        elif inbox:
            order = f" {DSN_ENV} comes after a --config's database.dsn."
        else:
            order = (
                f" {DSN_ENV} comes after a config found (--config, {CONFIG_ENV}, ./relay.yaml): its database.dsn"
                " is read first."
            )
        options = [
            click.option(
                "--dsn",
                envvar=dsn_env,
                # Named in --help: a newcomer told only of --dsn puts the password on the command line.
                show_envvar=dsn_env is not None,
                help=f"PostgreSQL connection string{env_note}; beside a config, used instead of its database.dsn."
                + order,
            ),
            click.option(
                "--config",
                "config_path",
                type=click.Path(dir_okay=False, path_type=Path),
                envvar=None if inbox else CONFIG_ENV,
                show_envvar=not inbox,
                help="YAML config file " + ("(its database.dsn)." if inbox else "(default: ./relay.yaml if present)."),
            ),
        ]
        if not needs_config:
            whence = "default: inbox" if inbox else "default: the config's database.schema, else outbox"
            holds = "inbox" if inbox else "outbox"
            options.append(click.option("--schema", "schema_name", help=f"Schema that holds the {holds} ({whence})."))
        decorated: Any = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated  # type: ignore[no-any-return]

    return decorate


def connect(dsn: str) -> psycopg.Connection[Any]:
    return connect_sync(dsn, application_name="outbox-relay-cli")


def require_schema(conn: psycopg.Connection[Any], schema_name: str) -> None:
    problem = schema_version.why_unusable(conn, schema_name)
    if problem:
        raise SchemaError(problem)


def confirm(dry_run: bool, yes: bool, would: str, question: str, *, err: bool = False) -> None:
    """Nothing to ask on a dry run; otherwise --yes, or a yes at a terminal. `err`:
    ask on stderr (under --json, stdout holds the JSON alone)."""
    if dry_run or yes:
        return
    if not sys.stdin.isatty():
        raise CommandLineError(f"{would}; pass --yes to confirm")
    ask(question, err=err)


def ask(question: str, *, err: bool = False) -> None:
    """A yes-or-no question at the terminal, asked before anything is changed: a no is
    Declined (exit 1); Ctrl-C at it is an interruption (exit 130), as anywhere else."""
    try:
        answered = click.confirm(question, err=err)
    except click.Abort:  # click's word for Ctrl-C (or the end of input) at a prompt
        interrupted("; nothing was changed")
    if not answered:
        raise Declined("aborted; nothing was changed")


def confirm_finish(
    what: str,
    number: int,
    *,
    created_by: str | None,
    own: bool,
    acts: str,
    dry_run: bool,
    yes: bool,
    err: bool = False,
) -> None:
    """Before `--resume N`: finishing a replay or backfill does what its record says
    with this role's privileges. A record another role made (or an unknown one, from
    before schema version 7) may name what that role could not copy itself: it is named
    and asked about at a terminal, --yes or not, and refused without one."""
    if own:
        confirm(dry_run, yes, f"{what} #{number} would be finished", f"Finish {what} #{number}?", err=err)
        return
    # The record's text is another role's: no terminal control sequence of it is printed.
    acts = printable(acts)
    created_by = None if created_by is None else printable(created_by)
    creator = f"role {created_by!r}" if created_by else "an unknown role (before schema version 7)"
    foreign = f"{what} #{number} was recorded by {creator}, not by the role you connect as"
    if dry_run:
        click.echo(f"{foreign}: finishing it would {acts}, and asks first", err=err)
        return
    if not sys.stdin.isatty():
        instead = f", or resume it as {created_by!r}" if created_by else ""
        raise CommandLineError(
            f"{foreign}: finishing it would {acts} with your privileges; confirm at a terminal{instead}"
        )
    ask(f"{what.capitalize()}{foreign[len(what) :]}: {acts} with your privileges?", err=err)


def run_with_progress(what: str, number: int, total: int, work: Callable[[Callable[[int], None]], int]) -> int:
    """A progress bar on a terminal; otherwise a JSON log line at most every 5 s. Ctrl-C
    meanwhile says how to finish the work (its chunks done so far stay done)."""
    try:
        return _with_progress(what, number, total, work)
    except KeyboardInterrupt:
        interrupted(f"; {what} #{number} is not done: finish it with --resume {number}")


def _with_progress(what: str, number: int, total: int, work: Callable[[Callable[[int], None]], int]) -> int:
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=f"{what} #{number}", file=sys.stderr) as bar:
            shown = 0

            def advance(copied: int) -> None:
                nonlocal shown
                bar.update(copied - shown)
                shown = copied

            return work(advance)
    configure_logging("info")
    log = structlog.get_logger(f"outbox_relay.{what}")
    started = last = time.monotonic()

    def report(copied: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 5 or copied >= total:
            last = now
            log.info(
                f"{what}_progress",
                **{f"{what}_id": number},
                copied=copied,
                total=total,
                rows_per_s=round(copied / max(now - started, 1e-6)),
            )

    return work(report)


# The options that mean the same in every command, parsed the same way: a value that
# does not parse is click's BadParameter (one line naming the option, exit 2), before
# any connection.


def positive_duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    """A click callback: a duration option ("90s", "1h") as seconds, more than 0."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter(f"must be longer than 0, got {value!r}")
    return seconds


def time_bound(_ctx: click.Context, param: click.Parameter, value: str | None) -> TimeBound | None:
    """A click callback: --since/--until as an ISO 8601 time or a duration ago ("2h")."""
    if value is None:
        return None
    try:
        return parse_time(value, f"--{param.name}")
    except ConfigError:
        raise click.BadParameter(
            f"invalid time or duration {value!r}: give an ISO 8601 time (2026-11-22T08:00:00+00:00) "
            "or a duration ago (2h)"
        ) from None


def per_second(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    """A click callback: --rate as messages per second, "500" or "500/s"."""
    if value is None:
        return None
    number = value[:-2] if value.endswith("/s") else value
    try:
        rate = float(number)
    except ValueError:
        rate = 0.0
    if not (rate > 0 and rate != float("inf")):
        raise click.BadParameter(f"{value!r}: give messages per second, e.g. 500 or 500/s")
    return rate


# What a --topic glob takes, as in routes (dead_letters.glob_to_regex), in every help.
TOPIC_GLOB = "glob (*, ?, [seq], [!seq], as in routes)"

RATE_OPTION = click.option("--rate", callback=per_second, help="At most this many messages per second (500 or 500/s).")


def old_name(old: str, new: str, dest: str, **option: Any) -> Callable[[F], F]:
    """`old` as a hidden alias of the option `new` (stored in `dest`): a documented name
    keeps working after its rename; given both, one line says to use `new`."""
    hidden = f"old_{dest}"

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(hidden)
            if value is None or value == ():
                return func(*args, **kwargs)
            given = click.get_current_context().get_parameter_source(dest)
            if given is click.core.ParameterSource.COMMANDLINE and not option.get("multiple"):
                raise CommandLineError(f"{old} is the old name of {new}: give {new} alone")
            kwargs[dest] = (*kwargs[dest], *value) if option.get("multiple") else value
            return func(*args, **kwargs)

        return click.option(old, hidden, hidden=True, default=None, **option)(wrapper)  # type: ignore[return-value]

    return decorate


def chunk_option(default: int, old: str | None = None) -> Callable[[F], F]:
    """--chunk N: rows per transaction, in every command that works in chunks."""
    option = click.option(
        "--chunk",
        default=default,
        show_default=True,
        type=click.IntRange(1, 100_000),
        help="Rows per transaction.",
    )
    if old is None:
        return option
    alias = old_name(old, "--chunk", "chunk", type=click.IntRange(1, 100_000))
    return lambda func: option(alias(func))


def message_ids_option(help: str, old: str | None = None) -> Callable[[F], F]:
    """--message-id ID (repeatable), a message's UUID, in every command that takes one."""
    option = click.option("--message-id", "message_ids", multiple=True, type=click.UUID, help=help)
    if old is None:
        return option
    alias = old_name(old, "--message-id", "message_ids", multiple=True, type=click.UUID)
    return lambda func: option(alias(func))
