"""Message field rules, checked in Python before any SQL runs.

The same rules are enforced by ``{schema}.enqueue_binary`` and the table's CHECK
constraints (schema/schema.sql); tests/integration/test_validation_sql.py keeps the two in
step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,249}")  # use with fullmatch
# In UTF-8 bytes, not characters: the key is in the claim's btree index entry (key, id),
# which PostgreSQL caps at 2,704 bytes, compression not guaranteed (a key of 1,024 CJK
# characters is 3,072 bytes: its INSERT failed and aborted the application's transaction).
# 2,048 leaves room in the entry, and still takes 1,024 characters of any 1- or 2-byte
# script (Latin, Greek, Cyrillic, Hebrew, Arabic); 682 CJK characters, 512 emoji.
MAX_KEY_BYTES = 2048
MAX_HEADER_NAME_LENGTH = 255
RESERVED_HEADERS = frozenset({"message-id"})


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not TOPIC_PATTERN.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}: use 1 to 249 letters, digits or . _ - : /")
    return topic


def check_key(key: object) -> str | None:
    if key is None:
        return None
    size = _utf8_size(key) if isinstance(key, str) and "\x00" not in key else None
    if not isinstance(key, str) or size is None or not 1 <= size <= MAX_KEY_BYTES:
        raise ValueError(
            f"invalid key {_shown(key, size)}: must be a string of 1 to {MAX_KEY_BYTES} bytes of UTF-8 "
            "without NUL, or None"
        )
    return key


def _utf8_size(text: str) -> int | None:
    """Bytes of `text` in UTF-8 (what PostgreSQL stores), or None when it has none."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return None


def _shown(key: object, size: int | None) -> str:
    # A key too long is shown by its start and its size: the message stays one short line.
    if isinstance(key, str) and len(key) > 40:
        return f"{key[:40]!r}..." + ("" if size is None else f" ({size} bytes)")
    return repr(key)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ValueError(f"invalid headers: expected a mapping of str to str, got {type(headers).__name__}")
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_HEADER_NAME_LENGTH or "\x00" in name:
            raise ValueError(f"invalid header name {name!r}: must be a string of 1 to 255 characters")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"invalid header name {name!r}: reserved, the relay sets it")
        if not isinstance(value, str):
            raise ValueError(f"invalid header {name!r}: value must be a str, got {type(value).__name__}")
        if "\x00" in value:
            raise ValueError(f"invalid header {name!r}: value must not contain NUL")  # Postgres text cannot
        if not _utf8(name) or not _utf8(value):
            # A lone surrogate has no UTF-8: it would abort the caller's transaction in SQL.
            raise ValueError(f"invalid header {name!r}: not valid Unicode text (a lone surrogate?)")
        checked[name] = value
    return checked
