"""The `outbox-relay` command line: one module per command (group), sharing `common`.

- ``run``: ``run`` and ``check``;
- ``schema``: ``schema install|sql|notify``;
- ``status``, ``dead_letters``, ``replay``, ``backfill``, ``audit``, ``claim_check``: the
  operator's commands
  (their work is done in ``outbox_relay.operations``);
- ``inbox``: ``inbox schema install|sql`` and ``inbox prune``, for consumers;
- ``console``: ``console``, the operator console's own process;
- ``demo``: ``demo``;
- ``common``: where the database is (``--dsn``/``--config``, one rule for every
  command) and the options that mean the same everywhere;
- ``output``: errors as one line and the exit codes (0 done, 1 not there or failed,
  2 a usage or config error), ``--json``.
"""

from __future__ import annotations

import click

from outbox_relay.cli.audit import audit_command
from outbox_relay.cli.backfill import backfill
from outbox_relay.cli.claim_check import claim_check_group
from outbox_relay.cli.console import console_command
from outbox_relay.cli.dead_letters import dead_letters_group
from outbox_relay.cli.demo import demo
from outbox_relay.cli.inbox import inbox_group
from outbox_relay.cli.output import OneLineGroup
from outbox_relay.cli.replay import replay
from outbox_relay.cli.run import check, run
from outbox_relay.cli.schema import schema
from outbox_relay.cli.status import status_command


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="outbox-relay")
def main() -> None:
    """Transactional outbox relay for PostgreSQL."""


# `outbox-relay --help` lists them by name (click sorts them).
for command in (
    audit_command,
    backfill,
    check,
    claim_check_group,
    console_command,
    dead_letters_group,
    demo,
    inbox_group,
    replay,
    run,
    schema,
    status_command,
):
    main.add_command(command)

__all__ = ["main"]
