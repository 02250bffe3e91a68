"""The names of the WAL source's replication slot and publication: the rule a name
follows, and the default one an outbox's slot takes.

Pure rules, below the config (which validates relay.wal.slot with them) and the WAL
source (sources/wal/slot.py, which composes the names into its SQL): the config must
not reach up into a source to check a name.
"""

from __future__ import annotations

import re

from outbox_relay.sqlfiles import validate_schema_name

NAME_PREFIX = "outbox_relay_"
# PostgreSQL's rule for slot names (lower-case letters, digits, _; at most 63 bytes),
# which publication names also follow here so one name serves both.
_NAME = re.compile(r"[a-z0-9_]{1,63}")


def name_for(schema: str) -> str:
    """The slot's and the publication's name for the outbox in `schema` (the schema name
    rule leaves room for the prefix in 63 bytes)."""
    return NAME_PREFIX + validate_schema_name(schema)


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid slot or publication name {name!r}: use 1 to 63 lower-case letters, digits or _")
    return name
