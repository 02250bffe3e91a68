"""Every error outbox-relay raises derives from :class:`OutboxRelayError`, except
the producer API's argument checks (``enqueue``: an invalid topic, key, header or
payload), which raise ``ValueError`` as Python's own functions do for a bad argument.

The CLI turns these into one line and an exit code; their messages never carry a
secret (DSNs are redacted before they reach an error).
"""

from __future__ import annotations


class OutboxRelayError(Exception):
    """Base class: something outbox-relay can explain in one line."""

    exit_code = 1


class ConfigError(OutboxRelayError):
    """The configuration file is missing, malformed or invalid.

    The message names the file, the key path and what is wrong.
    """

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source = source
        self.path = path
        self.reason = message
        prefix = "".join(f"{part}: " for part in (source, path) if part)
        super().__init__(prefix + message)


class AdapterOptionsError(ConfigError):
    """An adapter rejected its options; `path` is relative to the broker's block."""


class InvalidDsn(ConfigError):
    """A DSN (from --dsn, a variable or the config) that libpq cannot parse. Its text is
    never shown: libpq's message quotes a piece of it, which may be the password. Exit 2,
    as any config that is wrong: nothing was read or changed."""


class CommandLineError(OutboxRelayError):
    """A command was given options that cannot go together, or too few to say what to
    do (`dead-letters requeue --topic GLOB --all`). Raised before any row is touched."""

    exit_code = 2


class NotFound(OutboxRelayError):
    """What a command was asked for by name is not there: a replay or backfill number,
    a message or dead letter id (exit 1, as a selection that took nothing)."""


class Declined(OutboxRelayError):
    """A question a command asked before changing anything was answered no: nothing
    was changed (exit 1, as a check that did not hold)."""


class SchemaError(OutboxRelayError):
    """The outbox schema is missing, too old, or could not be installed."""


class DatabaseError(OutboxRelayError):
    """The database could not be reached or refused a statement."""


def first_line(what: BaseException | str) -> str:
    """The first line of an exception's message (its type name when it has none), or of
    a text (a client library's message): what a one-line error or log field shows."""
    text = str(what).strip()
    if not text:
        return type(what).__name__ if isinstance(what, BaseException) else ""
    return text.splitlines()[0]
