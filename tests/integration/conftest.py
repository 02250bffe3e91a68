"""Fixtures of the integration tests beyond tests/conftest.py's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.wal import WalSlot, wal_slot


@pytest.fixture
def wal(empty_db: str) -> Iterator[WalSlot]:
    """A replication slot and publication of the WAL source's own in a fresh database
    (tests/support/wal.py), dropped afterwards."""
    with wal_slot(empty_db) as found:
        yield found
