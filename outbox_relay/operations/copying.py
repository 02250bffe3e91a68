"""What `replay` and `backfill` share: both copy rows into the outbox in chunks, as
operations someone asked for, one process at a time."""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from collections.abc import Iterator
from typing import Any

import psycopg

from outbox_relay.errors import DatabaseError


def requester() -> str:
    """Who asks: the operating-system user and host, as this process knows them. The
    database role is not written here: the database records it (created_by), where no
    role can name another."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@contextlib.contextmanager
def only_copier(conn: psycopg.Connection[Any], lock_class: int, number: int, what: str) -> Iterator[None]:
    """Hold a session advisory lock (lock_class, number) for a whole copy: two
    `--resume N` never copy one replay or backfill in turns."""
    locked = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (lock_class, number)).fetchone()
    conn.commit()
    if not locked or not locked[0]:
        raise DatabaseError(f"{what} #{number} is being copied by another process right now")
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (lock_class, number))
        conn.commit()
