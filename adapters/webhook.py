"""``type: webhook``: POSTs each message as its JSON-lines object (outbox_relay.json_lines).

2xx acks. 4xx is permanent (the receiver rejects the message itself: dead-lettered
with the status), except 408, 425 and 429 which ask to come back later. 5xx and
timeouts are transient. A refused connection means the receiver is down: the
message waits without spending an attempt.

A call starts requests (``max_concurrency`` at a time) only for ``timeout`` seconds;
what it has not started by then waits for a later batch, spending no attempt. Without
that, requests queue behind each other: the workers' four batches of 1,000 share the
adapter, and at 32 at a time to a receiver answering in 0.3 s they took 37 s, past
``relay.publish_timeout``: the engine took each call for an outage, threw away the acks
it had, and sent everything again, batch after batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import json
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, field_validator

from outbox_relay.durations import Duration
from outbox_relay.json_lines import json_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._options import Options, parse_options

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the webhook adapter needs httpx: pip install 'outbox-relay[webhook]'") from exc

RETRY_LATER = {408, 425, 429}
# The endpoint refuses the relay itself, not this message: a rotated token (401, 403), a
# moved or removed endpoint (404, 410), a proxy wanting credentials (407). Dead-lettering
# would empty the whole stream into dead letters; instead every message waits, spending
# no attempt, and the engine stops calling until the endpoint answers again.
REFUSES_THE_RELAY = {401, 403, 404, 407, 410}
# The endpoint says "later": it may say how long (Retry-After).
LATER = {429, 503}
MAX_RETRY_AFTER_S = 3600.0


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), at most an hour."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), MAX_RETRY_AFTER_S)


RESERVED_HEADERS = {"message-id", "content-type"}


class WebhookOptions(Options):
    # The http:// or https:// URL each message is POSTed to (HEAD probes it too). A token
    # in it comes from the environment; receipts leave out its user, password and query.
    url: str
    # Extra headers on every POST, e.g. `authorization: "Bearer ${TOKEN}"` (the secret
    # from the environment); message-id and content-type are the relay's own.
    headers: dict[str, str] = Field(default_factory=dict)
    # httpx's timeout for each phase of a request (connecting, sending, each read), and how
    # long a call keeps starting requests: keep it under half of relay.publish_timeout.
    timeout: Duration = 10.0
    # Requests in flight at once (and connections), over every call: the workers' batches.
    max_concurrency: int = Field(default=32, ge=1, le=1024)
    # false: no certificate check of an https:// receiver (a test receiver only);
    # ignored when ca_file is set.
    verify_tls: bool = True
    # A CA bundle (PEM) to verify the receiver's certificate with, in place of the
    # default one (certifi's, or SSL_CERT_FILE's).
    ca_file: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            # Not echoed: a webhook URL often carries its token in the path or query.
            scheme = value.split(":", 1)[0] if ":" in value else "no scheme"
            raise ValueError(f"must be an http:// or https:// URL (got {scheme[:10]!r}; the URL is not shown)")
        return value

    @field_validator("headers")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the relay and cannot be configured")
        return value


class _Slots:
    """`size` requests at a time, shared by every call (the workers' batches); a call's
    first request goes before other calls' later ones, so each call starts within about
    one request's time however many requests other calls queued (with `size` at least
    the number of workers)."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._firsts: collections.deque[asyncio.Future[None]] = collections.deque()
        self._others: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self, first: bool) -> AsyncIterator[None]:
        if self._free > 0 and not self._firsts and not self._others:
            self._free -= 1
        else:
            granted = asyncio.get_running_loop().create_future()
            (self._firsts if first else self._others).append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release()  # granted as the caller was cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for queue in (self._firsts, self._others):
            while queue:
                granted = queue.popleft()
                if not granted.done():  # a cancelled waiter is skipped
                    granted.set_result(None)
                    return
        self._free += 1


def url_without_secrets(url: str) -> str:
    """`url` with its scheme, host, port and path only: what a receipt may show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class WebhookAdapter:
    def __init__(self, name: str, options: WebhookOptions):
        self.name = name
        self._options = options
        self._client: httpx.AsyncClient | None = None
        self._slots = _Slots(options.max_concurrency)
        # The receipt's URL: no user, password, query or fragment (where tokens live).
        self._receipt_url = json.dumps(url_without_secrets(options.url))

    async def connect(self) -> None:
        verify: Any = self._options.ca_file or self._options.verify_tls
        self._client = httpx.AsyncClient(
            timeout=self._options.timeout,
            verify=verify,
            limits=httpx.Limits(max_connections=self._options.max_concurrency),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ready(self) -> bool:
        if self._client is None:
            return False
        try:
            await self._client.head(self._options.url)
        except httpx.HTTPError:
            return False
        return True

    async def _post(self, out: OutgoingMessage, start_by: float, first: bool) -> PublishResult:
        assert self._client is not None
        headers = {
            **self._options.headers,
            "content-type": "application/json",
            "message-id": str(out.message_id),
        }
        async with self._slots.slot(first):
            # A call's first request always starts: a call answered only "not sent" would
            # look like an outage to the engine, which stops calling the receiver.
            if not first and asyncio.get_running_loop().time() > start_by:
                return PublishResult.unavailable(
                    f"not sent: the receiver took this call's {self._options.timeout:g}s"
                    f" (timeout) for the requests before it, max_concurrency {self._options.max_concurrency}"
                )
            try:
                response = await self._client.post(self._options.url, content=json_line(out), headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The receiver is not there: wait for it without spending an attempt.
                return PublishResult.unavailable(f"cannot connect: {exc!r}")
            except httpx.TimeoutException:
                return PublishResult.transient(f"timed out after {self._options.timeout:g}s")
            except httpx.HTTPError as exc:
                return PublishResult.transient(f"HTTP error: {exc!r}")
        status = response.status_code
        if 200 <= status < 300:
            return PublishResult.acked(f'{{"url":{self._receipt_url},"status":{status}}}')
        reason = f"HTTP {status} {response.reason_phrase}".strip()
        if status in REFUSES_THE_RELAY:
            return PublishResult.unavailable(f"{reason}: the endpoint refuses the relay (credentials, URL?)")
        if status in LATER:
            return PublishResult.unavailable(reason, retry_after=retry_after(response.headers.get("retry-after")))
        if 400 <= status < 500 and status not in RETRY_LATER:
            return PublishResult.permanent(reason)
        return PublishResult.transient(reason)

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        if self._client is None:
            return [PublishResult.unavailable("not connected")] * len(batch)
        # Requests start for one request's timeout; the first waits for one slot at most
        # (_Slots): a call then lasts about twice timeout at most, inside publish_timeout
        # when timeout is under half of it (the defaults: 10 s and 30 s).
        start_by = asyncio.get_running_loop().time() + self._options.timeout
        return await asyncio.gather(*(self._post(out, start_by, index == 0) for index, out in enumerate(batch)))


def create(name: str, options: Mapping[str, Any]) -> WebhookAdapter:
    return WebhookAdapter(name, parse_options(WebhookOptions, options))
