"""Fixtures of the inbox tests: a consumer database with the inbox and an accounts table."""

from __future__ import annotations

import psycopg
import pytest

from outbox_relay import inbox
from tests.inbox.helpers import create_accounts


@pytest.fixture
def consumer_db(empty_db: str) -> str:
    """DSN of a fresh consumer database: inbox schema `inbox` installed, `accounts` created."""
    with psycopg.connect(empty_db) as conn:
        inbox.install(conn)
        create_accounts(conn)
        conn.commit()
    return empty_db
