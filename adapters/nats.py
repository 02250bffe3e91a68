"""``type: nats``: publishes to NATS JetStream with nats-py, each message acknowledged by
the stream (a JetStream PubAck) before it counts as acked.

- A message becomes: subject = the ``subject`` template over the route's destination (or
  the topic when the route names none), the message's key and topic; payload = the
  payload; headers = the message's headers, then ``Nats-Msg-Id`` (the message id: the
  stream's duplicate window drops a re-send of a message it already stored, and the
  PubAck says ``duplicate``), ``Content-Type`` and ``Outbox-Key`` (when it has a key).
  A message header named ``Nats-...`` is JetStream's own vocabulary (expected sequences,
  TTLs, rollups: it would change how the stream stores the message), so such a message
  is refused for good rather than sent with a header dropped.
- A batch goes out at once (every message written with a reply subject of its own, then
  every PubAck awaited, up to ``timeout``), never one round trip per message. The PubAcks
  come to one subscription of the connection (not nats-py's ``publish_async``: in nats-py
  2.16 a PubAck carrying an error raises inside its reply handler, so that publish is never
  answered and would only time out).
- ``keeps_key_order`` is False by default: the server stores one connection's messages in
  the order sent, but judges each on its own, so a message refused in the middle of a
  key's run (over the stream's ``max_msg_size``, a full stream with ``discard: new``) is
  followed by the next one of the key being stored. The engine then hands this adapter
  one message per key per call. With ``key_rounds`` it is True: a call's messages go in
  rounds, each round the next message of every key (and, in the first, every keyless
  one) at once, and a key whose message was not acked sends nothing more in the call
  (``not_sent``); a key's run then costs one round trip per message inside one call,
  instead of one engine call per message. Rounds start for ``timeout`` only; what is
  left waits for the next call (``_in_rounds``).
- "No responders" and JetStream error 10060 (another stream's subject) are the message's
  subject's fault when JetStream is known to answer (``classify``), else ``unavailable``.
- With TLS the handshake comes first (``tls_handshake_first``): no credential goes out
  before TLS is up; the server needs ``handshake_first`` on its TLS listener.
- A message over the server's ``max_payload`` (payload and headers) is refused before it
  is sent: the server would close the connection on it, failing every other message.
- Reconnecting is ours, not the client's (``allow_reconnect`` off): while the connection
  is lost every message is ``unavailable`` (nothing buffered to go out later behind the
  relay's back), and publish/ready connect again, trying each server in turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from pydantic import Field, SecretStr, field_validator, model_validator

from outbox_relay.adapter import KeyStops
from outbox_relay.durations import Duration
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._options import Options, TlsOptions, parse_options, tls_context

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import PubAck, StreamConfig
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the nats adapter needs nats-py: pip install 'outbox-relay[nats]'") from exc

log = structlog.get_logger("outbox_relay.nats")

# JetStream's error codes (nats-server's errors.json) that say something about the message
# or the configuration rather than the moment.
MESSAGE_TOO_LARGE = 10054  # over the stream's max_msg_size
STREAM_MISMATCH = 10060  # the subject is stored by another stream than `stream`
# Characters NATS refuses in a subject token, and in a header name or value.
SUBJECT_FORBIDDEN = re.compile(r"[\s*>]")
HEADER_NAME_FORBIDDEN = re.compile(r"[\x00-\x20:\x7f]")
HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n]")
RESERVED_PREFIX = "nats-"
OURS = frozenset({"content-type", "outbox-key"})  # headers the adapter sets from the message


def subject_problem(subject: str) -> str | None:
    """Why NATS would refuse to publish on `subject`, or None."""
    if not subject:
        return "empty subject"
    if subject.startswith("$"):
        return f"subject {subject[:80]!r} starts with '$' (NATS's own subjects)"
    if any(token == "" for token in subject.split(".")):
        return f"subject {subject[:80]!r} has an empty token (a leading, trailing or doubled '.')"
    if SUBJECT_FORBIDDEN.search(subject):
        return f"subject {subject[:80]!r} holds whitespace or a wildcard ('*', '>')"
    return None


def _server_url(value: str) -> str:
    # Credentials go in user/password (the password from the environment), never in a
    # URL, where logs and errors would carry them.
    parts = urlsplit(value)
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise ValueError("each server must be a nats://host:port or tls://host:port URL")
    if parts.username or parts.password:
        raise ValueError("a server URL may not hold credentials: use user and password (the URL is not shown)")
    return value


class NatsOptions(Options):
    # nats://host:port or tls://host:port (TLS first), tried in turn from the one after
    # the server last lost; a comma-separated string works too. No credentials in them.
    servers: list[str] = Field(min_length=1)
    # Template over {destination}, {topic} and {key}: "orders.{destination}" is a prefix.
    subject: str = "{destination}"
    # The stream the subjects belong to: each publish then says so (Nats-Expected-Stream),
    # and ready() checks it exists. Null: whatever stream takes the subject.
    stream: str | None = Field(default=None, min_length=1)
    # Create `stream` at connect, over `stream_subjects`, when it does not exist. Off by
    # default: streams are the platform's (retention, replicas, limits).
    create_stream: bool = False
    # The subjects create_stream creates `stream` over (e.g. "events.>"); unused without it.
    stream_subjects: list[str] | None = None
    # The user of a user/password login. One way to authenticate at most: user and
    # password, token, nkey_seed_file or creds_file (none: no authentication).
    user: str | None = None
    # The user's password, from the environment (`${NATS_PASSWORD}`); needs user.
    password: SecretStr | None = None
    # A token the server's authorization block names, from the environment (`${NATS_TOKEN}`).
    token: SecretStr | None = None
    # A file holding an NKey seed: the relay signs the server's challenge with it, the seed
    # never sent. Needs nkeys (the nats-nkeys extra, not in the image).
    nkey_seed_file: str | None = None
    # A .creds file (a user JWT and its NKey seed, as nsc writes them) for an operator's
    # accounts (decentralized JWT auth). Needs nkeys too.
    creds_file: str | None = None
    # TLS settings: with them (or a tls:// server) the handshake comes first, before any
    # credential; the server's TLS listener needs handshake_first.
    tls: TlsOptions | None = None
    timeout: Duration = 5.0  # for a call's PubAcks, a probe, a stream request
    # How long connecting to one server may take before the next is tried (whole seconds,
    # at least 1: rounded for nats-py).
    connect_timeout: Duration = 5.0
    # How often the client pings the server: a server gone silent is found after two.
    ping_interval: Duration = 10.0
    # PubAcks awaited at once, over every call (the workers' batches).
    max_pending: int = Field(default=20_000, ge=1, le=1_000_000)
    # Take a key's run in one call, sent in rounds (module docstring): keeps_key_order.
    key_rounds: bool = False

    @field_validator("servers", mode="before")
    @classmethod
    def _servers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",")]
        if isinstance(value, list):
            return [_server_url(str(s)) for s in value]
        return value

    @field_validator("subject")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(destination="d", topic="t", key="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid template {value!r}: use {{destination}}, {{topic}} or {{key}} ({exc})") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NatsOptions:
        if self.password is not None and self.user is None:
            raise ValueError("password needs user")
        ways = [self.user is not None, self.token is not None, bool(self.nkey_seed_file), bool(self.creds_file)]
        if sum(ways) > 1:
            raise ValueError("give one way to authenticate: user/password, token, nkey_seed_file or creds_file")
        if self.create_stream and (self.stream is None or not self.stream_subjects):
            raise ValueError("create_stream needs stream and stream_subjects")
        if (self.nkey_seed_file or self.creds_file) and importlib.util.find_spec("nkeys") is None:
            raise ValueError("nkey_seed_file and creds_file need nkeys: pip install 'outbox-relay[nats-nkeys]'")
        return self


def where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 4222}"


def classify(exc: BaseException, subject: str, jetstream_answers: bool = False) -> PublishResult:
    """A publish that failed (its PubAck an error, or no PubAck), as the engine should count it.

    `jetstream_answers`: JetStream is known to answer now (another message of the call was
    acked, or the stream's or account's info came back). The subject is built per message,
    so "no responders" or "another stream's subject" is then that message's subject, not
    the broker: waiting as `unavailable` would hold it (and its key) forever and, alone in
    a call, trip the circuit."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        reason = f"no JetStream stream takes subject {subject[:80]!r} (no responders)"
        if jetstream_answers:
            # A stream may yet be made for it: retried, spending attempts, not dead-lettered at once.
            return PublishResult.transient(reason)
        # JetStream itself does not answer (not up yet on a restarting server): the
        # messages wait, spending no attempt, and the circuit opens.
        return PublishResult.unavailable(reason)
    if isinstance(exc, nats.js.errors.APIError):
        reason = f"JetStream refused: {exc.code} {exc.err_code} {exc.description}"
        if exc.err_code == MESSAGE_TOO_LARGE or (exc.code == 400 and "exceeds maximum" in str(exc.description)):
            return PublishResult.permanent(reason)
        if exc.err_code == STREAM_MISMATCH:
            # The message's subject belongs to another stream than `stream`.
            return PublishResult.permanent(reason) if jetstream_answers else PublishResult.unavailable(reason)
        if isinstance(exc, nats.js.errors.ServiceUnavailableError):
            # The stream cannot store now (no quorum, full with discard: new): nothing
            # about the message.
            return PublishResult.unavailable(reason)
        return PublishResult.transient(reason)
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.OutboundBufferLimitError | OSError):
        return PublishResult.unavailable(f"connection lost: {type(exc).__name__}")
    return PublishResult.transient(f"{type(exc).__name__}: {first_line(exc)}".rstrip(": "))


def about_the_subject(exc: BaseException) -> bool:
    """Whether `exc` may be the message's subject's fault rather than JetStream's absence."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code == STREAM_MISMATCH


def receipt_of(ack: PubAck) -> str:
    """Where the stream stored the message: its name and sequence; `duplicate` when the
    duplicate window recognised the message id (the sequence is then the first copy's)."""
    return json.dumps({"stream": ack.stream, "seq": ack.seq, "duplicate": bool(ack.duplicate)}, separators=(",", ":"))


API_ERRORS: dict[int, type[nats.js.errors.APIError]] = {
    400: nats.js.errors.BadRequestError,
    404: nats.js.errors.NotFoundError,
    500: nats.js.errors.ServerError,
    503: nats.js.errors.ServiceUnavailableError,
}


def pub_ack_of(msg: Msg) -> PubAck | BaseException:
    """The PubAck a reply carries, or the error it stands for."""
    if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
        return nats.js.errors.NoStreamResponseError()  # no responders: no stream takes the subject
    try:
        response = json.loads(msg.data)
    except ValueError:
        return nats.js.errors.APIError(description=f"not a PubAck: {msg.data[:80]!r}")
    error = response.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        kind = API_ERRORS.get(code, nats.js.errors.APIError) if isinstance(code, int) else nats.js.errors.APIError
        return kind(code=code, err_code=error.get("err_code"), description=error.get("description"))
    return PubAck.from_response(response)


def header_size(headers: Mapping[str, str]) -> int:
    """Bytes of the NATS header block (``NATS/1.0``, one line per header, a blank line)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


@dataclass
class Call:
    """What one publish call learned: whether JetStream answers (None: not known yet)."""

    jetstream_answers: bool | None = None


class NatsAdapter:
    def __init__(self, name: str, options: NatsOptions):
        self.name = name
        self.options = options
        # See the module docstring: PubAcks come back per message, after later ones were
        # sent, so a key's order holds only if its next message waits for the last PubAck.
        self.keeps_key_order = options.key_rounds
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._next_server = 0
        # PubAcks awaited on the current connection, by reply token: failed at once when
        # it closes. Replies go to `_reply_prefix` + token, one subscription for all.
        self._awaited: dict[str, asyncio.Future[PubAck]] = {}
        self._reply_prefix = ""
        self._next_token = 0

    # -- connection --------------------------------------------------------------------

    def _auth(self) -> dict[str, Any]:
        o = self.options
        if o.user is not None:
            return {"user": o.user, "password": o.password.get_secret_value() if o.password else None}
        if o.token is not None:
            return {"token": o.token.get_secret_value()}
        if o.nkey_seed_file:
            return {"nkeys_seed": o.nkey_seed_file}
        if o.creds_file:
            return {"user_credentials": o.creds_file}
        return {}

    async def connect(self) -> None:
        """Connect to the first server that takes the connection, each tried once from the
        one after the server last lost; else one ConnectionError naming each one's failure
        (host:port and the cause, no credentials)."""
        servers = self.options.servers
        failures: list[str] = []
        for step in range(len(servers)):
            index = (self._next_server + step) % len(servers)
            try:
                await self._connect_to(servers[index])
            except Exception as exc:
                failures.append(f"{where(servers[index])}: {first_line(exc)}")
                continue
            self._next_server = index
            return
        raise ConnectionError(f"cannot connect to NATS at {'; '.join(failures)}")

    async def _connect_to(self, url: str) -> None:
        errors: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)
            if nc.is_connected:
                log.warning("nats_error", broker=self.name, error=first_line(exc))

        async def on_closed() -> None:
            self._connection_closed(nc)

        nc = NatsClient()
        tls = tls_context(self.options.tls) if self.options.tls is not None else None
        # Without handshake_first nats-py reads the server's INFO in plain text and upgrades
        # to TLS only when it says tls_required: a server (or a man in the middle) that does
        # not say so would be sent CONNECT, credentials included, in plain text. With it, TLS
        # comes first and a server not speaking TLS gets nothing but a ClientHello. The
        # server needs `handshake_first` on its TLS listener (docs/how-to/nats.md).
        tls_first = tls is not None or url.startswith("tls://")
        try:
            await nc.connect(
                servers=[url],
                error_cb=on_error,
                closed_cb=on_closed,
                name=f"outbox-relay {self.name}",
                # One attempt here: the relay retries with its own backoff, and
                # reconnects itself after a loss (module docstring).
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=max(1, round(self.options.connect_timeout)),
                ping_interval=max(1, round(self.options.ping_interval)),
                max_outstanding_pings=2,
                tls=tls,
                tls_handshake_first=tls_first,
                **self._auth(),
            )
        except BaseException as exc:
            await self._discard(nc)
            if isinstance(exc, nats.errors.NoServersError) and errors:
                raise errors[-1] from None  # the cause, not "no servers available"
            raise
        try:
            js = nc.jetstream(timeout=self.options.timeout)
            if self.options.create_stream:
                await self._create_stream(js)
            prefix = nc.new_inbox() + "."
            await nc.subscribe(prefix + "*", cb=self._on_reply)
        except BaseException:
            await self._discard(nc)
            raise
        self._fail_awaited()  # a former connection's: their replies cannot come here
        self._nc, self._js, self._reply_prefix = nc, js, prefix

    async def _discard(self, nc: NatsClient) -> None:
        """Close a connection that failed to open, within connect_timeout: nats-py's close
        of a connection whose TLS handshake failed never returns (it waits for the
        transport's close, which the failed handshake never completes)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), self.options.connect_timeout)

    async def _create_stream(self, js: JetStreamContext) -> None:
        assert self.options.stream is not None and self.options.stream_subjects
        try:
            await js.stream_info(self.options.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        config = StreamConfig(name=self.options.stream, subjects=list(self.options.stream_subjects))
        await js.add_stream(config)
        log.info("nats_stream_created", broker=self.name, stream=self.options.stream)

    def _connection_closed(self, nc: NatsClient) -> None:
        if nc is not self._nc:
            return  # an older connection finishing its close
        self._nc = self._js = None
        self._next_server = (self._next_server + 1) % len(self.options.servers)
        self._fail_awaited()
        log.info("nats_connection_lost", broker=self.name)

    def _fail_awaited(self) -> None:
        awaited, self._awaited = self._awaited, {}
        for future in awaited.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())

    async def _on_reply(self, msg: Msg) -> None:
        if not msg.subject.startswith(self._reply_prefix):
            return  # a former connection's reply subject
        future = self._awaited.pop(msg.subject[len(self._reply_prefix) :], None)
        if future is None or future.done():
            return  # its call ended (timeout, cancellation) before it came
        answer = pub_ack_of(msg)
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)

    async def _give_up(self, nc: NatsClient) -> None:
        """Drop a connection that looks open but answers nothing: only the client's pings
        would close it, and meanwhile every call would wait on it."""
        self._connection_closed(nc)
        with contextlib.suppress(Exception):
            await nc.close()

    async def _ensure_connected(self) -> str | None:
        """Connect again if the connection was lost; the reason if it cannot."""
        if self._nc is not None and self._nc.is_connected:
            return None
        async with self._lock:
            if self._nc is not None and self._nc.is_connected:
                return None
            if self._nc is not None:
                await self._give_up(self._nc)
            try:
                await self.connect()
            except Exception as exc:
                return f"NATS unreachable: {first_line(exc)}"
        return None

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._fail_awaited()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def ready(self) -> bool:
        """One JetStream round trip (the stream's info when `stream` is set, else the
        account's), reconnecting first if the connection was lost. A connection that
        does not answer within `timeout` is given up, so the next probe connects again."""
        if await self._ensure_connected() is not None:
            return False
        nc, js = self._nc, self._js
        if nc is None or js is None:
            return False
        try:
            if self.options.stream is not None:
                await js.stream_info(self.options.stream)
            else:
                await js.account_info()
        except (TimeoutError, nats.errors.TimeoutError):
            await self._give_up(nc)
            return False
        except Exception:
            return False
        return True

    # -- publishing ----------------------------------------------------------------------

    def _prepare(self, out: OutgoingMessage, max_payload: int) -> tuple[str, dict[str, str]] | str:
        """(subject, headers) for `out`, or why NATS cannot carry it at all (`max_payload`:
        the connected server's)."""
        message = out.message
        subject = self.options.subject.format(destination=out.destination, topic=message.topic, key=message.key or "")
        problem = subject_problem(subject)
        if problem is not None:
            return problem
        headers: dict[str, str] = {}
        for name, value in message.headers.items():
            if name.lower().startswith(RESERVED_PREFIX):
                return f"header {name[:40]!r} is JetStream's own (Nats-*): it would change how the stream stores it"
            if not name or HEADER_NAME_FORBIDDEN.search(name) or HEADER_VALUE_FORBIDDEN.search(value):
                return f"header {name[:40]!r}: NATS headers take no control characters, ':' or spaces in names"
            if name.lower() not in OURS:  # set below, once
                headers[name] = value
        headers["Nats-Msg-Id"] = str(message.message_id)
        headers["Content-Type"] = message.content_type
        if message.key is not None:
            headers["Outbox-Key"] = message.key
        if self.options.stream is not None:
            headers["Nats-Expected-Stream"] = self.options.stream  # another stream's subject: 10060
        if HEADER_VALUE_FORBIDDEN.search(message.content_type + (message.key or "")):
            return "a line break in the content type or the key: NATS headers cannot carry it"
        size = len(message.payload) + header_size(headers)
        if size > max_payload:
            return f"message of {size} bytes (payload and headers) over the NATS server's max_payload {max_payload}"
        return subject, headers

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        if not batch:
            return []
        problem = await self._ensure_connected()
        nc = self._nc
        if problem is not None or nc is None:
            return [PublishResult.unavailable(problem or "not connected")] * len(batch)
        call = Call()
        if not self.options.key_rounds:
            return await self._send(nc, batch, call)
        return await self._in_rounds(nc, batch, call)

    async def _jetstream_answers(self, nc: NatsClient) -> bool:
        """Whether JetStream answers now: the stream's info when `stream` is set, else the
        account's (ready()'s round trip)."""
        js = self._js
        if js is None or nc is not self._nc:
            return False
        try:
            if self.options.stream is not None:
                await js.stream_info(self.options.stream)
            else:
                await js.account_info()
        except Exception:
            return False
        return True

    async def _in_rounds(self, nc: NatsClient, batch: Sequence[OutgoingMessage], call: Call) -> list[PublishResult]:
        """`batch` in rounds: each the next message of every key still going (the first
        also every keyless one), all at once; a key stops at its first message not acked.
        Rounds start for `timeout` only (the first always goes): a hot key's run of 1,000
        is 1,000 round trips, which would outlast relay.publish_timeout, and a call
        cancelled there marks nothing, counts as an outage and comes back the same. What
        is left is `not_sent` (its key's earlier messages were acked) and goes in the
        next call at once, spending no attempt."""
        results: list[PublishResult | None] = [None] * len(batch)
        runs: dict[str, collections.deque[int]] = {}
        first_round: list[int] = []
        for index, out in enumerate(batch):
            key = out.message.key
            if key is None:
                first_round.append(index)
            else:
                runs.setdefault(key, collections.deque()).append(index)
        stops = KeyStops()
        loop = asyncio.get_running_loop()
        start_by = loop.time() + self.options.timeout
        round_ = first_round + [run.popleft() for run in runs.values()]
        while round_:
            round_.sort()  # the call's order within a round
            answers = await self._send(nc, [batch[index] for index in round_], call)
            for index, answer in zip(round_, answers, strict=True):
                results[index] = stops.note(batch[index], answer)
            round_ = []
            late = loop.time() > start_by
            for run in runs.values():
                if not run:
                    continue
                if late and stops.held(batch[run[0]]) is None:
                    # Its key's earlier messages were acked: not_sent leaves it due at
                    # once, no attempt spent, no delay (engine/dispatch.py).
                    results[run[0]] = stops.note(
                        batch[run[0]],
                        PublishResult.not_sent(
                            f"not sent: this call's rounds took timeout ({self.options.timeout:g}s)"
                        ),
                    )
                if stops.held(batch[run[0]]) is not None:
                    for index in run:
                        results[index] = results[index] or stops.held(batch[index])
                    run.clear()
                else:
                    round_.append(run.popleft())
        return [result or PublishResult.transient("no answer") for result in results]

    async def _send(self, nc: NatsClient, batch: Sequence[OutgoingMessage], call: Call) -> list[PublishResult]:
        """Every message of `batch` written at once, then every PubAck awaited."""
        loop = asyncio.get_running_loop()
        prefix = self._reply_prefix
        results: list[PublishResult | None] = [None] * len(batch)
        sent: dict[int, tuple[str, str, asyncio.Future[PubAck]]] = {}  # index -> subject, token, future
        try:
            for index, out in enumerate(batch):
                prepared = self._prepare(out, nc.max_payload)
                if isinstance(prepared, str):
                    results[index] = PublishResult.permanent(prepared)
                    continue
                if len(self._awaited) >= self.options.max_pending:
                    # Other calls' PubAcks fill the window: the server is slow, not the message.
                    results[index] = PublishResult.unavailable("too many PubAcks awaited (max_pending)")
                    continue
                subject, headers = prepared
                self._next_token += 1
                token = str(self._next_token)
                future: asyncio.Future[PubAck] = loop.create_future()
                self._awaited[token] = future  # before the publish: the reply may come at once
                try:
                    await nc.publish(subject, out.message.payload, reply=prefix + token, headers=headers)
                except (nats.errors.BadSubjectError, nats.errors.BadHeaderError, nats.errors.MaxPayloadError) as exc:
                    self._awaited.pop(token, None)
                    results[index] = PublishResult.permanent(f"NATS cannot carry it: {type(exc).__name__}")
                    continue
                except Exception as exc:
                    self._awaited.pop(token, None)
                    results[index] = classify(exc, subject)
                    continue
                sent[index] = (subject, token, future)
            if sent:
                await asyncio.wait([future for _, _, future in sent.values()], timeout=self.options.timeout)
            errors = [f.exception() for _, _, f in sent.values() if f.done() and not f.cancelled()]
            if any(error is None for error in errors):
                call.jetstream_answers = True
            if call.jetstream_answers is None and any(e is not None and about_the_subject(e) for e in errors):
                call.jetstream_answers = await self._jetstream_answers(nc)
            for index, (subject, _, future) in sent.items():
                results[index] = self._answer(subject, future, bool(call.jetstream_answers))
        finally:
            for _, token, future in sent.values():
                self._awaited.pop(token, None)
                if not future.done():
                    future.cancel()  # its PubAck, if it comes, finds no one waiting
        return [result or PublishResult.transient("no answer") for result in results]

    def _answer(self, subject: str, future: asyncio.Future[PubAck], jetstream_answers: bool) -> PublishResult:
        if not future.done():
            # Maybe stored: it goes again, and the duplicate window drops the copy.
            return PublishResult.unavailable(f"no PubAck within {self.options.timeout:g}s (timeout)")
        if future.cancelled():
            return PublishResult.unavailable("publish cancelled")
        exc = future.exception()
        if exc is not None:
            return classify(exc, subject, jetstream_answers)
        return PublishResult.acked(receipt_of(future.result()))


def create(name: str, options: Mapping[str, Any]) -> NatsAdapter:
    return NatsAdapter(name, parse_options(NatsOptions, options))


def check_destination(destination: str, explicit: bool) -> str | None:
    """Why NATS would refuse a route's destination as (part of) a subject, or None (the
    naming hook of `outbox-relay check`, outbox_relay/adapter.py). The subject template
    and the key are applied per message, and checked then."""
    if explicit:
        return subject_problem(destination)
    # Only the literal characters of a topic pattern: what breaks every subject holding them.
    if SUBJECT_FORBIDDEN.search(destination):
        return "NATS subjects take no whitespace, '*' or '>'"
    if ".." in destination:
        return "NATS subjects take no empty token ('..')"
    return None
