"""`outbox-relay inbox ...`: the consumer inbox's commands."""

from __future__ import annotations

import click


@click.group("inbox")
def inbox_group() -> None:
    """The consumer inbox: exactly-once effects in the consumer's own database."""
