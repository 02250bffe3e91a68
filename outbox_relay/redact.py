"""Keeps secrets out of logs, errors and `check` output, and what a message carries
out of a reader's terminal or page unless asked for: its headers' values, control
characters of its payload."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):[^@\s]*@", re.I)
UNPARSEABLE = "<DSN not shown: it could not be parsed>"
MASK = "***"
# Header values shown unless asked for (the console's reader who is not an operator,
# `dead-letters show` without --headers): trace context, and the numbers replay and
# backfill stamp on what they make (what ties a dead copy to its replay); an
# application's own headers may carry an email address or a key, a claim check's URL
# a signature.
SHOWN_HEADERS = frozenset({"traceparent", "tracestate", "outbox-replay-id", "outbox-backfill-id"})
REDACTED = "(redacted)"
# C0 and C1 control characters but newline and tab: ESC starts the sequences a terminal
# obeys (colours, titles, OSC 8 links, clipboard writes); C1's CSI (\x9b) does too.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


UNPARSEABLE_REASON = "the DSN could not be parsed (its text is not shown: it may hold a password)"
AMBIGUOUS = "<DSN not shown: its password could not be told apart>"
AMBIGUOUS_REASON = (
    "the DSN's password could not be told apart from the rest of it (percent-encode '/', '@', ':' and '?'"
    " in a password: %2F %40 %3A %3F); the DSN and the server's answer are not shown"
)
# A URI's user information: everything up to the last '@' (greedy), as a reader means it.
_URI_USERINFO = re.compile(r"(?i)^[a-z][a-z0-9+.-]*://(?P<userinfo>[^\s]*)@")


def _ambiguous(dsn: str, params: Mapping[str, Any]) -> bool:
    """Whether libpq read a URI's password otherwise than its writer meant: a '/' or
    '@' left unencoded in it ends the user information early, and the rest of the
    password becomes the host, the port or the database name, shown as such."""
    found = _URI_USERINFO.match(dsn.strip())
    if found is None or ":" not in found["userinfo"]:
        return False
    meant = unquote(found["userinfo"].split(":", 1)[1])
    return params.get("password") != meant


def shown_dsn(dsn: str) -> tuple[str, str | None]:
    """The DSN as it may be shown, and, if nothing of the server's answer may be shown
    beside it either (it would quote the part that holds the password), why not."""
    shown = redact_dsn(dsn)
    if shown == UNPARSEABLE:
        return shown, UNPARSEABLE_REASON
    if shown == AMBIGUOUS:
        return shown, AMBIGUOUS_REASON
    return shown, None


def redact_dsn(dsn: str) -> str:
    """The DSN with its passwords replaced by ``***`` (URI or key=value form)."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        # We cannot tell where a password would be in it: show none of it.
        return UNPARSEABLE
    if _ambiguous(dsn, params):
        return AMBIGUOUS
    for name in params:
        if "password" in name:  # password, and sslpassword (the client key's passphrase)
            params[name] = MASK
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def redact_text(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of each non-empty secret masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return _URI_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", text)


def payload_text(payload: bytes) -> str:
    """A payload shown on request (the console's dead letter, `dead-letters show
    --payload`): JSON indented, other UTF-8 text as it is but its control characters
    (newline and tab excepted) written as ``\\x1b``, other bytes as hex."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(payload)} bytes, not UTF-8) " + payload[:4096].hex()
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True)  # escapes them itself
    except ValueError:
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def redacted_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers as shown unless asked for: names kept, SHOWN_HEADERS whole, every other
    value `REDACTED`."""
    return {name: value if name.lower() in SHOWN_HEADERS else REDACTED for name, value in headers.items()}
