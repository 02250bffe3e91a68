"""What every command shares: the common options, one-line errors, the connection.

Exit codes: 0 all well; 1 a runtime failure (database or broker unreachable in
`check`, a failed install); 2 a usage or configuration error. User errors print one
line, never a traceback: `one_line_errors` is the only place that turns errors into
exit codes.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
import structlog

from outbox_relay import config as config_module
from outbox_relay import schema_version, sqlfiles
from outbox_relay.connections import connect_sync
from outbox_relay.durations import parse_duration
from outbox_relay.errors import ConfigError, OutboxRelayError, SchemaError, first_line
from outbox_relay.observability.logging_setup import configure as configure_logging

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="OUTBOX_RELAY_CONFIG",
    default="relay.yaml",
    show_default=True,
    help="YAML config file (env: OUTBOX_RELAY_CONFIG).",
)


def dsn_option(whose: str) -> Callable[[F], F]:
    """--dsn, from DATABASE_URL by default (where passwords belong)."""
    return click.option(
        "--dsn",
        envvar="DATABASE_URL",
        # Named in the help and in "Missing option '--dsn' (env var: 'DATABASE_URL')":
        # a newcomer told only of --dsn puts the password on the command line.
        show_envvar=True,
        required=True,
        help=f"{whose}; prefer the environment variable for passwords.",
    )


def schema_option(default: str, holds: str) -> Callable[[F], F]:
    return click.option(
        "--schema", "schema_name", default=default, show_default=True, help=f"Schema that holds the {holds}."
    )


DSN_OPTION = dsn_option("PostgreSQL connection string")
SCHEMA_OPTION = schema_option(sqlfiles.DEFAULT_SCHEMA, "outbox")


def one_line_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OutboxRelayError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except psycopg.Error as exc:
            click.echo(f"error: database: {first_line(exc)}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def connect(dsn: str) -> psycopg.Connection[Any]:
    return connect_sync(dsn, application_name="outbox-relay-cli")


def load(config_path: Path) -> config_module.Config:
    if not config_path.exists():
        # Most often the default, ./relay.yaml: say how to name the file instead.
        raise ConfigError("no such config file; pass --config PATH or set OUTBOX_RELAY_CONFIG", source=str(config_path))
    return config_module.load(config_path)


def require_schema(conn: psycopg.Connection[Any], schema_name: str) -> None:
    problem = schema_version.why_unusable(conn, schema_name)
    if problem:
        raise SchemaError(problem)


def confirm(dry_run: bool, yes: bool, would: str, question: str) -> None:
    """Nothing to ask on a dry run; otherwise --yes, or a yes at a terminal."""
    if dry_run or yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{would}; pass --yes to confirm")
    click.confirm(question, abort=True)


def confirm_finish(
    what: str, number: int, *, created_by: str | None, own: bool, acts: str, dry_run: bool, yes: bool
) -> None:
    """Before `--resume N`: finishing a replay or backfill does what its record says
    with this role's privileges. A record another role made (or an unknown one, from
    before schema version 7) may name what that role could not copy itself: it is named
    and asked about at a terminal, --yes or not, and refused without one."""
    if own:
        confirm(dry_run, yes, f"{what} #{number} would be finished", f"Finish {what} #{number}?")
        return
    creator = f"role {created_by!r}" if created_by else "an unknown role (before schema version 7)"
    foreign = f"{what} #{number} was recorded by {creator}, not by the role you connect as"
    if dry_run:
        click.echo(f"{foreign}: finishing it would {acts}, and asks first")
        return
    if not sys.stdin.isatty():
        instead = f", or resume it as {created_by!r}" if created_by else ""
        raise click.UsageError(
            f"{foreign}: finishing it would {acts} with your privileges; confirm at a terminal{instead}"
        )
    click.confirm(f"{what.capitalize()}{foreign[len(what) :]}: {acts} with your privileges?", abort=True)


def run_with_progress(what: str, number: int, total: int, work: Callable[[Callable[[int], None]], int]) -> int:
    """A progress bar on a terminal; otherwise a JSON log line at most every 5 s."""
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


def positive_duration(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    """A click callback: a duration option ("90s", "1h") as seconds, more than 0."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter(f"must be longer than 0, got {value!r}")
    return seconds
