"""Message field rules, checked in Python before any SQL runs.

The same rules are enforced by ``{schema}.enqueue_binary`` and the table's CHECK
constraints (schema/schema.sql); tests/integration/test_validation_sql.py keeps the two in
step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._:/-]{1,249}")  # use with fullmatch
MAX_KEY_LENGTH = 1024
MAX_HEADER_NAME_LENGTH = 255
RESERVED_HEADERS = frozenset({"message-id"})


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not TOPIC_PATTERN.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}: use 1 to 249 letters, digits or . _ - : /")
    return topic


def check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH or "\x00" in key or not _utf8(key):
        raise ValueError(
            f"invalid key {key!r}: must be a string of 1 to {MAX_KEY_LENGTH} characters without NUL, or None"
        )
    return key


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
