"""Who may act on the console, and the proof that a form was the console's own.

Reading needs nothing (the console binds to localhost by default, and shows no
payload or secret unless told to). Acting (requeue, purge) needs one of:

- the token, from the environment only (OUTBOX_RELAY_CONSOLE_TOKEN): signed in once
  on the page, it becomes a session cookie signed with a key derived from the token,
  so every console replica with the same token accepts it, and a new token ends every
  session; or sent by a script as ``Authorization: Bearer TOKEN``;
- the header a trusted proxy sets (``console.trusted_user_header``), naming the user.

Forms carry a CSRF token that must equal a cookie's (double submit): a page of
another origin can make the browser post, but it cannot read the cookie to copy it.
A page of the same site on another port could set that cookie, so a POST must also
come from the console's own origin (its Origin header, or Sec-Fetch-Site) when the
browser says where it comes from; and the token is new at each sign-in. The cookies
are SameSite=Strict on top of that.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

TOKEN_ENV = "OUTBOX_RELAY_CONSOLE_TOKEN"
SESSION_COOKIE = "outbox_console_session"
CSRF_COOKIE = "outbox_console_csrf"
SESSION_S = 8 * 3600  # a working day: an operator signs in again after it
MIN_TOKEN_CHARS = 16
# Headers every request carries or a client sets by itself: naming one of them as the
# proxy's user header would let anyone act.
UNTRUSTABLE_HEADERS = frozenset(
    {
        "host",
        "cookie",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "authorization",
        "content-type",
        "content-length",
        "origin",
        "referer",
        "connection",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
        "sec-fetch-site",
        "sec-fetch-mode",
    }
)


class TokenTooShort(ValueError):
    pass


class UntrustableHeader(ValueError):
    pass


@dataclass(frozen=True)
class Identity:
    """Who is asking: `user` (None: anonymous, read-only) and how they proved it."""

    user: str | None
    via: str  # anonymous, session, bearer, header

    @property
    def may_act(self) -> bool:
        return self.user is not None


ANONYMOUS = Identity(None, "anonymous")


class Authenticator:
    """Reads a request's identity; signs and checks session cookies."""

    def __init__(self, token: str | None, trusted_user_header: str | None):
        if trusted_user_header and trusted_user_header.lower() in UNTRUSTABLE_HEADERS:
            raise UntrustableHeader(
                f"console.trusted_user_header: {trusted_user_header!r} is sent by every client, not set by a proxy; "
                "name the header your proxy sets (X-Forwarded-User, X-Auth-Request-User)"
            )
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            # A short token is guessable by anyone who can reach the page.
            raise TokenTooShort(f"{TOKEN_ENV} must be at least {MIN_TOKEN_CHARS} characters")
        self._token = token
        self._header = trusted_user_header.lower() if trusted_user_header else None
        self._key = (
            hmac.new(token.encode(), b"outbox-relay console session v1", hashlib.sha256).digest() if token else None
        )

    @classmethod
    def from_environment(cls, trusted_user_header: str | None) -> Authenticator:
        # Stripped: a token mounted from a file-based secret often ends with a newline.
        return cls((os.environ.get(TOKEN_ENV) or "").strip() or None, trusted_user_header)

    @property
    def can_sign_in(self) -> bool:
        return self._token is not None

    @property
    def trusts_header(self) -> str | None:
        return self._header

    def identify(self, headers: Any, cookies: dict[str, str]) -> Identity:
        if self._header:
            given = headers.getlist(self._header) if hasattr(headers, "getlist") else [headers.get(self._header)]
            given = [value for value in given if value]
            # Twice: a proxy that appends rather than replaces left the client's own.
            if len(given) == 1:
                return Identity(_printable(given[0])[:200], "header")
            if len(given) > 1:
                return ANONYMOUS
        authorization = headers.get("authorization", "")
        if self._token and authorization.lower().startswith("bearer "):
            if hmac.compare_digest(authorization[7:].strip().encode(), self._token.encode()):
                return Identity("token", "bearer")
            return ANONYMOUS
        session = cookies.get(SESSION_COOKIE)
        if session and self._key:
            user = self._verify(session)
            if user is not None:
                return Identity(user, "session")
        return ANONYMOUS

    def check_token(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.strip().encode(), self._token.encode())

    def session_for(self, user: str) -> str:
        assert self._key is not None
        body = base64.urlsafe_b64encode(json.dumps({"u": user, "exp": int(time.time()) + SESSION_S}).encode())
        return body.decode() + "." + self._sign(body)

    def _verify(self, cookie: str) -> str | None:
        body, _, signature = cookie.partition(".")
        if not body.isascii():
            return None
        # Bytes: compare_digest refuses str with characters outside ASCII (a forged cookie).
        if not hmac.compare_digest(signature.encode(), self._sign(body.encode()).encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body.encode()))
        except ValueError:
            return None
        if not isinstance(data, dict) or int(data.get("exp", 0)) < time.time():
            return None
        user = data.get("u")
        return user if isinstance(user, str) else None

    def _sign(self, body: bytes) -> str:
        assert self._key is not None
        return base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).decode().rstrip("=")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(cookie: str | None, submitted: str | None) -> bool:
    if not cookie or not submitted:
        return False
    return hmac.compare_digest(str(cookie).encode(), str(submitted).encode())


def same_origin(headers: Any, own_origin: str) -> bool:
    """Whether a POST comes from the console's own pages, as far as the browser says:
    Sec-Fetch-Site (every current browser) or Origin. A client that sends neither (a
    script, curl) is judged by the token and the CSRF field alone."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = headers.get("origin")
    return origin is None or origin == own_origin


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)
