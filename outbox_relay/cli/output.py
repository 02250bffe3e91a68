"""What a command prints besides its own answer: errors as one line, and the exit code.

One style for every error, whoever raised it: ``error: <what>`` on stderr, one line,
never a traceback or click's usage block. `OneLineGroup` formats what click raises
while it parses (an unknown option, a bad value: still naming the option, with the
hint of where to read more); `one_line_errors` formats what a command raises.

Exit codes (docs/reference/cli.md):

- 0: done, or nothing was asked of it that is not there (a report, an empty list, a
  retention job that found nothing old enough);
- 1: what was asked for is not there or did not hold: a selection that took nothing
  (requeue, purge, replay, backfill), a message or dead letter that does not exist, a
  check or audit that failed, a question answered no; or the work failed at run time
  (the database or a broker unreachable, a statement refused);
- 2: the command line or the config is wrong; nothing was read or changed;
- 130: interrupted (Ctrl-C) while it worked: what it had done stays done (a replay or
  backfill says how to finish it).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from outbox_relay.errors import OutboxRelayError, first_line

F = TypeVar("F", bound=Callable[..., Any])

NOT_FOUND = 1  # the exit code of "nothing matched" and "no such ...", one place for it
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C

# click 8.2 and later raise this for a group given no command (8.1 printed its help).
_HELP_FOR_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
_SUGGESTION = re.compile(r"\.? \(?(Did you mean .*?\?)\)?$")


def usage_line(exc: click.ClickException) -> str:
    """A click error as one line of the project's style: lower-case, click's suggestion
    in brackets, and for a usage error the command whose --help says more."""
    text = " ".join(exc.format_message().split())
    text = _SUGGESTION.sub(lambda m: f" ({m.group(1)[0].lower()}{m.group(1)[1:]})", text).rstrip(".")
    if text[:1].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        text += f"; see '{ctx.command_path} --help'"
    return text


class OneLineGroup(click.Group):
    """A click group whose own errors (parsing the command line, Ctrl-C meanwhile)
    come out as one `error:` line with click's exit code, like the commands' errors."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # an embedding program handles errors itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _HELP_FOR_NO_ARGS as exc:  # a group given no command: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {usage_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            # Ctrl-C (click turns KeyboardInterrupt into Abort) before a command's own
            # handler could see it: while the command line was parsed. A question answered
            # no is the command's Declined, never an Abort.
            interrupted()
        # --help and --version end with click's Exit, returned here as its code.
        sys.exit(result if type(result) is int else 0)


def one_line_errors(func: F) -> F:
    """What a command raises, as one line and its exit code (OutboxRelayError says which)."""

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
        except KeyboardInterrupt:
            interrupted()

    return wrapper  # type: ignore[return-value]


def interrupted(how: str = "") -> NoReturn:
    """Ctrl-C while a command worked: one line (`how`: what to do about it), exit 130."""
    if sys.stderr.isatty():
        click.echo(err=True)  # past the ^C the terminal echoed
    click.echo(f"error: interrupted{how}", err=True)
    sys.exit(INTERRUPTED)


def print_json(value: Any) -> None:
    """A command's --json answer: one JSON document on stdout (times as ISO 8601)."""
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)  # UUIDs, paths


def notes(as_json: bool) -> Callable[[str], None]:
    """Where a command's lines for a reader go: stdout, or stderr under --json (stdout
    then holds the JSON document alone, for the script that reads it)."""
    return functools.partial(click.echo, err=as_json)


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one JSON document).")
