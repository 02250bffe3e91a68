"""``type: redis``: appends each message to a Redis stream with XADD (redis-py's asyncio
client), one pipeline per call: one round trip, never one per message.

- The stream key is the route's destination, else the ``stream`` option, else the topic.
  An entry's fields: ``message_id``, ``topic``, ``key`` (absent for a keyless message),
  ``content_type``, ``created_at`` (ISO 8601), ``headers`` (the message's headers, trace
  context included, as one JSON object: a header can never collide with the relay's own
  fields, and a consumer decodes them in one step) and ``payload`` (the bytes as stored).
  ``maxlen`` adds ``MAXLEN ~ N``. The receipt: the stream key and the entry id.
- Acked means the server answered the XADD. It is durable only as the server's AOF
  fsync policy says: ``appendfsync always`` for an outbox (docs/how-to/redis.md).
  ``wait: {replicas, timeout}`` adds a WAIT to the pipeline: fewer replicas than asked
  within the timeout answers ``unavailable`` for what it wrote (written on the primary:
  it goes again, a duplicate; spending attempts would dead-letter messages for a
  replica's outage).
- Key order (``keeps_key_order``): a pipeline runs its commands in order, but an XADD
  that fails does not stop the next, so a key's run with more than one message goes as
  one EVAL of a script that appends them in order and stops at the first error: what
  follows it is not written, and answered ``not_sent``. A script runs atomically, so
  the run's entries are contiguous in their stream too.
- Answers: WRONGTYPE (the key holds something other than a stream) is permanent, as
  RabbitMQ's exchange of another type is; NOPERM (the ACL refuses the relay), OOM,
  READONLY, LOADING, MISCONF, BUSY and a lost or refused connection are the server's
  state, not the message's: ``unavailable``, no attempt spent. Anything else: transient.
- A payload over ``max_entry_bytes`` is never sent: the server answers a bulk over its
  ``proto-max-bulk-len`` by closing the connection, which would read as an outage
  forever. It is still part of its key's run: dead-lettered (permanent) only once every
  earlier message of its key in the call was acked, else ``not_sent`` (a dead letter
  ahead of an earlier message that then fails would put the key out of order).
- ``wait.timeout`` must be at least 1ms (WAIT 0 blocks forever) and below ``timeout``:
  the socket would otherwise time out before WAIT answers, and drop the connection on
  every call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from outbox_relay.adapter import KeyStops
from outbox_relay.durations import Duration, format_duration
from outbox_relay.errors import first_line
from outbox_relay.models import Outcome, OutgoingMessage, PublishResult
from outbox_relay.redact import redact_text

from ._options import Options, parse_options

try:
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the redis adapter needs redis-py: pip install 'outbox-relay[redis]'") from exc

PROTO_MAX_BULK_LEN = 512 * 1024 * 1024  # the server's default limit for one argument
# Error codes that describe the server or the relay's rights, never the message.
SERVER_STATE = ("NOPERM", "OOM", "READONLY", "LOADING", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN")

# One key's run: XADD each message in order, stop at the first error (redis.pcall hands
# it back instead of aborting the script), and answer {ids written, error or ""}.
# KEYS: each message's stream; ARGV: maxlen ("" for none), then per message its number
# of field/value items followed by them.
APPEND_RUN = """
local maxlen = ARGV[1]
local ids = {}
local at = 2
for i = 1, #KEYS do
  local count = tonumber(ARGV[at])
  local args = {KEYS[i]}
  if maxlen ~= '' then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = maxlen
  end
  args[#args + 1] = '*'
  for j = at + 1, at + count do
    args[#args + 1] = ARGV[j]
  end
  at = at + count + 1
  local reply = redis.pcall('XADD', unpack(args))
  if type(reply) == 'table' and reply.err then
    return {ids, reply.err}
  end
  ids[#ids + 1] = reply
end
return {ids, ''}
"""


class RedisTls(Options):
    """TLS to the server: a CA to verify it, optionally a client certificate."""

    # A PEM bundle of CAs to verify the server's certificate with, trusted besides the
    # system's (redis-py adds it to the default context).
    ca_file: str | None = None
    # A client certificate (PEM) for mutual TLS, with key_file (its key unencrypted:
    # there is no key_password here).
    cert_file: str | None = None
    # The client certificate's private key (PEM), with cert_file.
    key_file: str | None = None
    verify: bool = True  # false: no certificate check at all (a test server only)
    # false: accept a certificate that does not name the host connected to (it must still
    # chain to the CAs); off as well with verify: false.
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> RedisTls:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


class WaitOptions(Options):
    # Replicas that must have each call's writes (WAIT N): fewer within timeout answers
    # unavailable (sent again), and ready() reads false with fewer connected.
    replicas: int = Field(ge=1)
    timeout: Duration = 1.0  # WAIT's, in whole milliseconds: at least 1ms, below the socket's


MIN_WAIT = 0.001  # WAIT takes milliseconds, and WAIT N 0 blocks until N replicas answer


class RedisOptions(Options):
    url: str | None = None  # redis:// or rediss://; else host and port
    # The server's host when no url is given (with one, the url's).
    host: str = "127.0.0.1"
    # The server's port when no url is given (with one, the url's).
    port: int = Field(default=6379, ge=1, le=65535)
    # The database number the streams are in when no url is given (with one, its path: /0).
    db: int = Field(default=0, ge=0)
    # An ACL user (Redis 6 and later) to authenticate as, with password; unset: the
    # `default` user. A user in the url takes precedence.
    username: str | None = None
    password: SecretStr | None = None  # from the environment: "${REDIS_PASSWORD}"
    # TLS settings; with a url it must be rediss://, which alone means TLS with the
    # system's CAs. With host and port, the block turns TLS on.
    tls: RedisTls | None = None
    stream: str | None = None  # the stream of a route that names no destination (default: the topic)
    maxlen: int | None = Field(default=None, ge=1)  # XADD MAXLEN ~ N
    timeout: Duration = 5.0  # connect and per-reply socket timeout
    # Connections in the pool at most, shared by the workers' calls (a pipeline each); a
    # call waits up to timeout for a free one.
    max_connections: int = Field(default=16, ge=1, le=1024)
    # A payload over this many bytes is never sent, and dead-lettered: set it to the
    # server's proto-max-bulk-len (512 MiB by default), over which it drops the connection.
    max_entry_bytes: int = Field(default=PROTO_MAX_BULK_LEN, ge=1)
    wait: WaitOptions | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        # Not echoed: a URL may hold a password.
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// or rediss:// URL (the URL is not shown)")
        return value

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisOptions:
        if self.url is not None and self.tls is not None and not self.url.startswith("rediss://"):
            raise ValueError("tls needs a rediss:// url")
        return self

    @model_validator(mode="after")
    def _wait_answers_in_time(self) -> RedisOptions:
        # WAIT blocks the connection for up to wait.timeout; the socket's read timeout
        # (`timeout`) must outlast it, or every call drops its connection mid-WAIT.
        wait = self.wait
        if wait is not None and not MIN_WAIT <= wait.timeout < self.timeout:
            raise ValueError(
                f"wait.timeout ({format_duration(wait.timeout)}) must be at least 1ms"
                f" and below timeout ({format_duration(self.timeout)})"
            )
        return self

    @property
    def where(self) -> str:
        """host:port, how errors name the server (never its credentials)."""
        if self.url is None:
            return f"{self.host}:{self.port}"
        parts = urlsplit(self.url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"

    @property
    def secrets(self) -> list[str]:
        found = [self.password.get_secret_value()] if self.password else []
        if self.url is not None:
            found.append(unquote(urlsplit(self.url).password or ""))
        return found


def client_for(options: RedisOptions) -> aioredis.Redis:
    """A client whose pool holds at most max_connections (a call waits `timeout` for one)."""
    settings: dict[str, Any] = {
        "socket_timeout": options.timeout,
        "socket_connect_timeout": options.timeout,
        # No resends inside redis-py: the engine decides what goes again, and when.
        "retry": Retry(NoBackoff(), 0),
        "max_connections": options.max_connections,
        "timeout": options.timeout,
    }
    if options.username is not None:
        settings["username"] = options.username
    if options.password is not None:
        settings["password"] = options.password.get_secret_value()
    tls = options.tls
    if tls is not None or (options.url or "").startswith("rediss://"):
        tls = tls or RedisTls()
        if options.url is None:
            settings["connection_class"] = aioredis.SSLConnection
        settings.update(
            ssl_ca_certs=tls.ca_file,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
            ssl_cert_reqs="required" if tls.verify else "none",
            ssl_check_hostname=tls.verify and tls.check_hostname,
        )
    if options.url is not None:
        pool = aioredis.BlockingConnectionPool.from_url(options.url, **settings)
    else:
        pool = aioredis.BlockingConnectionPool(host=options.host, port=options.port, db=options.db, **settings)
    return aioredis.Redis.from_pool(pool)  # aclose() closes the pool's connections too


def entry_fields(out: OutgoingMessage) -> list[str | bytes]:
    """The stream entry of `out`, as XADD's field/value items."""
    message = out.message
    fields: list[str | bytes] = ["message_id", str(message.message_id), "topic", message.topic]
    if message.key is not None:
        fields += ["key", message.key]
    fields += [
        "content_type",
        message.content_type,
        "created_at",
        message.created_at.isoformat(),
        "headers",
        json.dumps(dict(message.headers), separators=(",", ":")),
        "payload",
        message.payload,
    ]
    return fields


# redis-py turns these replies into their own exception classes, and drops the code
# from the message (NOPERM, OOM, READONLY, LOADING).
SERVER_STATE_ERRORS: tuple[type[Exception], ...] = (
    redis_errors.NoPermissionError,
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.BusyLoadingError,
)


def answer_to_error(stream: str, error: str | Exception) -> PublishResult:
    """How a Redis error reply for one XADD counts (see the module docstring): `error` as
    the script's XADD got it (the server's own words), or as redis-py raised it."""
    line = first_line(error)
    if isinstance(error, SERVER_STATE_ERRORS):
        return PublishResult.unavailable(f"Redis refuses writes: {type(error).__name__}: {line}")
    if line.startswith("WRONGTYPE"):
        return PublishResult.permanent(f"stream key {stream!r} holds a value that is not a stream: {line}")
    if line.startswith(SERVER_STATE):
        return PublishResult.unavailable(f"Redis refuses writes: {line}")
    return PublishResult.transient(f"Redis error: {line}")


@dataclass
class _Group:
    """Messages sent as one command: a lone message (XADD) or a key's run (the script)."""

    indexes: list[int]
    streams: list[str]
    # A message of the key refused before sending (over max_entry_bytes) after this run:
    # its index and answer, given only if the whole run is acked (_decide_refusals).
    refused: tuple[int, PublishResult] | None = None


class RedisStreamsAdapter:
    # A key's run goes as one script that stops at its first error (APPEND_RUN).
    keeps_key_order = True

    def __init__(self, name: str, options: RedisOptions):
        self.name = name
        self.options = options
        self._client: aioredis.Redis | None = None
        self._maxlen = [] if options.maxlen is None else ["MAXLEN", "~", str(options.maxlen)]

    async def connect(self) -> None:
        client = client_for(self.options)
        try:
            await asyncio.wait_for(client.ping(), self.options.timeout * 2)
        except BaseException as exc:
            await client.aclose()
            if not isinstance(exc, Exception):
                raise  # cancelled: nothing left open
            reason = redact_text(first_line(exc), self.options.secrets)
            raise ConnectionError(f"cannot connect to Redis at {self.options.where}: {reason}") from None
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ready(self) -> bool:
        """PING (the pool reconnects first if its connections were lost); with ``wait``,
        also as many connected replicas as it asks for (INFO replication): without them
        every call would write and answer unavailable."""
        if self._client is None:
            return False
        try:
            if self.options.wait is None:
                return bool(await self._client.ping())
            info = await self._client.info("replication")
        except (redis_errors.RedisError, OSError):
            return False
        return int(info.get("connected_slaves", 0)) >= self.options.wait.replicas

    def _stream(self, out: OutgoingMessage) -> str:
        if out.explicit_destination:
            return out.destination
        return self.options.stream or out.destination

    def _refusal(self, out: OutgoingMessage) -> PublishResult | None:
        if out.message.size > self.options.max_entry_bytes:
            return PublishResult.permanent(
                f"payload too large for Redis: {out.message.size} bytes > max_entry_bytes"
                f" ({self.options.max_entry_bytes}; the server's proto-max-bulk-len)"
            )
        return None

    def _plan(self, batch: Sequence[OutgoingMessage], results: list[PublishResult | None]) -> list[_Group]:
        """The commands of a call, in the order of their first message. A message refused
        here stops its key: the key's later messages are not sent (KeyStops). Its own
        answer waits for the key's earlier run in the call, if it has one (`refused`)."""
        stops = KeyStops()
        groups: list[_Group] = []
        runs: dict[str, _Group] = {}
        for index, out in enumerate(batch):
            held = stops.held(out)
            if held is not None:
                results[index] = held
                continue
            key = out.message.key
            group = runs.get(key) if key is not None else None
            refusal = self._refusal(out)
            if refusal is not None:
                stops.note(out, refusal)
                if group is None:
                    results[index] = refusal
                else:
                    group.refused = (index, refusal)
                continue
            if group is None:
                group = _Group([], [])
                groups.append(group)
                if key is not None:
                    runs[key] = group
            group.indexes.append(index)
            group.streams.append(self._stream(out))
        return groups

    def _queue(self, pipe: Any, batch: Sequence[OutgoingMessage], group: _Group) -> None:
        if len(group.indexes) == 1:
            pipe.execute_command("XADD", group.streams[0], *self._maxlen, "*", *entry_fields(batch[group.indexes[0]]))
            return
        argv: list[str | bytes] = [self._maxlen[2] if self._maxlen else ""]
        for index in group.indexes:
            fields = entry_fields(batch[index])
            argv += [str(len(fields)), *fields]
        pipe.execute_command("EVAL", APPEND_RUN, len(group.streams), *group.streams, *argv)

    @staticmethod
    def _settle(group: _Group, reply: Any, results: list[PublishResult | None]) -> None:
        """Each message of `group` from its command's reply: the entries written are
        acked, the first failure answered, the rest of the run not sent."""
        error: str | Exception
        if isinstance(reply, Exception):
            ids: list[Any] = []
            error = reply
        elif len(group.indexes) == 1:
            ids, error = [reply], ""
        else:
            ids, raw = reply
            error = raw.decode() if isinstance(raw, bytes) else str(raw)
        for step, (index, stream) in enumerate(zip(group.indexes, group.streams, strict=True)):
            if step < len(ids):
                entry = ids[step].decode() if isinstance(ids[step], bytes) else str(ids[step])
                results[index] = PublishResult.acked(f'{{"stream":{json.dumps(stream)},"id":"{entry}"}}')
            elif step == len(ids):
                results[index] = answer_to_error(stream, error)
            else:
                results[index] = PublishResult.not_sent("not sent: an earlier message of its key failed")

    @staticmethod
    def _decide_refusals(groups: list[_Group], results: list[PublishResult | None]) -> list[PublishResult]:
        """Every answer, once the call's are in: a message refused after its key's run is
        dead-lettered only if that run was all acked (WAIT included), else not sent."""
        final = [r or PublishResult.transient("no answer for this message") for r in results]
        for group in groups:
            if group.refused is None:
                continue
            index, refusal = group.refused
            if all(final[i].outcome is Outcome.ACKED for i in group.indexes):
                final[index] = refusal
            else:
                final[index] = PublishResult.not_sent("not sent: an earlier message of its key failed")
        return final

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        if not batch:
            return []
        client = self._client
        if client is None:
            return [PublishResult.unavailable("not connected")] * len(batch)
        results: list[PublishResult | None] = [None] * len(batch)
        groups = self._plan(batch, results)
        await self._send(client, batch, groups, results)
        return self._decide_refusals(groups, results)

    async def _send(
        self,
        client: aioredis.Redis,
        batch: Sequence[OutgoingMessage],
        groups: list[_Group],
        results: list[PublishResult | None],
    ) -> None:
        """One pipeline for `groups`; each sent message's answer into `results`."""
        if not groups:
            return
        pipe = client.pipeline(transaction=False)
        for group in groups:
            self._queue(pipe, batch, group)
        wait = self.options.wait
        if wait is not None:
            pipe.execute_command("WAIT", wait.replicas, int(wait.timeout * 1000))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            # Lost or refused (a wrong password on reconnect too): maybe written, goes again.
            reason = redact_text(first_line(exc), self.options.secrets)
            for group in groups:
                for index in group.indexes:
                    results[index] = PublishResult.unavailable(f"Redis at {self.options.where}: {reason}")
            return
        for group, reply in zip(groups, replies, strict=False):
            self._settle(group, reply, results)
        if wait is not None:
            self._short_of_replicas(replies[-1], wait, results)

    @staticmethod
    def _short_of_replicas(reply: Any, wait: WaitOptions, results: list[PublishResult | None]) -> None:
        """Acked entries become unavailable when WAIT saw fewer replicas than asked: they
        are on the primary only, and go again (a duplicate) rather than being lost with it."""
        if isinstance(reply, int) and reply >= wait.replicas:
            return
        seen = first_line(reply) if isinstance(reply, Exception) else f"{reply} of {wait.replicas} replicas"
        why = f"written on the primary, but WAIT {wait.replicas} {wait.timeout:g}s: {seen}"
        for index, result in enumerate(results):
            if result is not None and result.receipt is not None:
                results[index] = PublishResult.unavailable(why)


def create(name: str, options: Mapping[str, Any]) -> RedisStreamsAdapter:
    return RedisStreamsAdapter(name, parse_options(RedisOptions, options))
