"""``type: sqs``: Amazon SQS (standard and FIFO queues) with ``SendMessageBatch``.

boto3 is synchronous: requests run in a thread pool of ``max_concurrency`` threads
(the claim check's S3 store does the same), sharing one client (boto3 clients are
thread-safe) with as many pooled connections. Credentials come from boto3's chain
only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role); botocore signs
every request (SigV4). The config names no secret.

- The queue is the route's destination (a queue name or a queue URL), else the
  message topic as a queue name. A name is resolved with GetQueueUrl once and cached.
  A missing queue is a permanent failure naming it, as RabbitMQ's missing exchange is:
  only an operator can create it, and every message sent there until then would come
  back the same way; the answer is remembered for 5 s, then asked again. But a queue
  this process has resolved before that is missing now is most likely a server still
  restoring its queues after a restart (ElasticMQ does so just after it listens): its
  messages wait (``unavailable``), and ``ready()`` reads false until the queue is back.
- ``ready()`` costs one cheap request (ListQueues) while nothing went wrong; after a
  sign of an outage (no connection, a 5xx, a probe that failed) or a queue found
  missing, it also asks for each such queue again (GetQueueUrl, a few at a time), and
  keeps asking on later probes until each is found, so /readyz (every second, 2 s
  budget) neither asks for every queue every second nor reads ready too early.
- Per-key order (``keeps_key_order``): SQS judges each entry of a batch on its own, and
  may take a FIFO group's entry after refusing the one before it. So a call goes out
  in rounds: round *r* holds the *r*-th message of every key still going (keyless
  messages all go in the first), at most 10 entries and ``max_message_bytes`` per
  request, the round's requests sent together; a key whose message was not acked sends
  nothing more in the call (``not_sent``). A key's run of *n* messages takes *n*
  round trips; different keys share them. Rounds start for ``request_timeout`` only:
  what is left is ``not_sent`` (its key's earlier messages were acked) and goes in the
  next call at once, without spending an attempt, so a hot key's long run never keeps a
  call past ``relay.publish_timeout``.
- Answers per entry: ``Successful`` is acked (receipt: the queue URL, SQS's message
  id and, for FIFO, its sequence number); ``Failed`` with ``SenderFault`` is the
  message's fault (permanent), without it SQS's own (``unavailable``: an SQS incident
  spends no attempt). A whole request refused: throttled, a 5xx, refused credentials,
  a queue's KMS key SQS cannot use, or no connection at all are the broker's or the
  relay's configuration's problem, not the messages' (``unavailable``: no attempt spent); any other
  refusal of a request of several entries sends each entry again alone, so one bad
  entry cannot dead-letter its neighbours, and a 4xx for an entry sent alone is that
  entry's fault (permanent).
- Entries (body encoding, message attributes, group and deduplication ids, size):
  adapters/sqs_entries.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from outbox_relay.adapter import KeyStops
from outbox_relay.durations import Duration
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._options import Options, parse_options
from .sqs_entries import Entry, entry_for, is_fifo, is_url, name_problem

try:
    import boto3
    import botocore.exceptions as boto_errors
    from botocore.config import Config as BotoConfig
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the sqs adapter needs boto3: pip install 'outbox-relay[sqs]'") from exc

BATCH_ENTRIES = 10  # SendMessageBatch's limit
SQS_MAX_MESSAGE_BYTES = 262_144  # 256 KiB: SQS's classic limit, also ElasticMQ's
REMEMBER_MISSING_S = 5.0
READY_CONCURRENCY = 8  # GetQueueUrl requests in flight at once when ready() asks for queues again
# The worst publish call must stay well below relay.publish_timeout (docs/how-to/sqs.md); the
# adapter does not know it, so it refuses only what no publish_timeout should allow.
WORST_CALL_BOUND_S = 120.0
MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
# The request never reached SQS, or SQS asks to slow down or has an outage of its own.
THROTTLED = frozenset(
    {"Throttling", "ThrottlingException", "RequestThrottled", "RequestThrottledException", "KmsThrottled"}
)
# SQS refuses the relay itself (its identity, its signature): every message would be
# refused the same way, so they wait, spending no attempt, until an operator fixes it.
# Both spellings: the query protocol's code (botocore takes it from x-amzn-query-error)
# and the JSON protocol's __type (what botocore reads when that header is absent; SQS's
# JSON endpoint was reported answering a wrong signature with InvalidSignatureException).
REFUSES_THE_RELAY = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "ExpiredToken",
        "ExpiredTokenException",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidSecurity",
        "RequestExpired",
        "KMS.AccessDeniedException",
        "KmsAccessDenied",
    }
)
# The queue's KMS key (or the endpoint) is misconfigured: SQS refuses every message to
# that queue the same way until an operator fixes it, so they wait rather than being
# dead-lettered one by one. Both spellings: the JSON protocol's and the query protocol's.
MISCONFIGURED = frozenset(
    {
        "KmsDisabled",
        "KmsNotFound",
        "KmsInvalidState",
        "KmsInvalidKeyUsage",
        "KmsOptInRequired",
        "KMS.DisabledException",
        "KMS.NotFoundException",
        "KMS.InvalidStateException",
        "KMS.InvalidKeyUsageException",
        "KMS.OptInRequired",
        "InvalidAddress",
    }
)
REFUSES_THE_RELAY = REFUSES_THE_RELAY | MISCONFIGURED
UNREACHABLE: tuple[type[BaseException], ...] = (
    boto_errors.EndpointConnectionError,
    boto_errors.ConnectionError,  # ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError...
    boto_errors.HTTPClientError,
    boto_errors.NoCredentialsError,
    boto_errors.PartialCredentialsError,
    boto_errors.CredentialRetrievalError,
    OSError,
)


class SqsOptions(Options):
    # An SQS-compatible server (ElasticMQ, LocalStack), or an AWS VPC endpoint; unset:
    # AWS's own endpoint for the region.
    endpoint_url: str | None = None
    region: str | None = None  # unset: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    ca_file: str | None = None  # a CA bundle to verify the endpoint's TLS certificate with
    # Requests in flight at once, over every call: the threads boto3's requests run in,
    # and the client's pooled connections.
    max_concurrency: int = Field(default=16, ge=1, le=256)
    # SQS's size limit: a message's body and attributes (a larger one is dead-lettered
    # unsent), and a SendMessageBatch request's. Up to 1 MiB where the queue allows it.
    max_message_bytes: int = Field(default=SQS_MAX_MESSAGE_BYTES, ge=1024, le=1_048_576)
    # botocore's connect timeout, per try of a request (two tries at most).
    connect_timeout: Duration = 5.0
    # How long SQS may take to answer a request (botocore's read timeout), and how long a
    # call keeps starting rounds. 5 s: a call's worst (worst_call_s) is then 25 s, below
    # publish_timeout's default 30 s.
    request_timeout: Duration = 5.0

    @field_validator("request_timeout")
    @classmethod
    def _bounded_call(cls, value: float, info: ValidationInfo) -> float:
        # A call's worst: rounds start for request_timeout, then the last round's request
        # (two tries of connect_timeout + request_timeout: botocore retries once).
        connect = info.data.get("connect_timeout", 5.0)
        worst = worst_call_s(connect, value)
        if worst > WORST_CALL_BOUND_S:
            raise ValueError(
                f"3 x request_timeout + 2 x connect_timeout (a publish call's worst: {worst:g}s) is over"
                f" {WORST_CALL_BOUND_S:g}s; keep it well below relay.publish_timeout"
            )
        return value


def worst_call_s(connect_timeout: float, request_timeout: float) -> float:
    """How long one publish call may take at worst: rounds start for request_timeout, then
    the last round's request, tried twice (connect, then a read of request_timeout each)."""
    return request_timeout + 2 * (connect_timeout + request_timeout)


def code_of(exc: BaseException) -> str:
    if isinstance(exc, boto_errors.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def refusal(exc: BaseException) -> str | None:
    """Why SQS cannot be used at all now (unreachable, throttling, a refused identity),
    in one line, or None when the error may be the request's own doing."""
    if isinstance(exc, boto_errors.NoCredentialsError):
        return "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
    if isinstance(exc, UNREACHABLE):
        return f"SQS unreachable: {first_line(exc)}"
    code = code_of(exc)
    if code in MISCONFIGURED:
        return f"SQS cannot use the queue's KMS key or address (configuration): {first_line(exc)}"
    if code in REFUSES_THE_RELAY:
        return f"SQS refuses the relay's credentials or permissions: {first_line(exc)}"
    if code in THROTTLED:
        return f"SQS throttles the relay: {first_line(exc)}"
    if _status(exc) >= 500:
        return f"SQS failed the request: {first_line(exc)}"
    return None


def _status(exc: BaseException) -> int:
    """The HTTP status of SQS's answer (0: no answer)."""
    if isinstance(exc, boto_errors.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status if isinstance(status, int) else 0
    return 0


class SqsAdapter:
    keeps_key_order = True  # rounds: one message of a key per round (module docstring)

    def __init__(self, name: str, options: SqsOptions):
        self.name = name
        self.options = options
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._urls: dict[str, str] = {}  # queue name -> URL
        self._missing: dict[str, tuple[float, str]] = {}  # queue name -> (until, why)
        # Resolved names ready() must ask for again: found missing, or an outage was seen.
        self._unconfirmed: set[str] = set()
        self._lost: set[str] = set()  # resolved names found missing since: asked again per call

    # -- connection ----------------------------------------------------------------------

    def _make_client(self) -> Any:
        options = self.options
        config = BotoConfig(
            connect_timeout=options.connect_timeout,
            read_timeout=options.request_timeout,
            # One retry of botocore's own (throttling, a dropped connection) at most: the
            # relay retries with its backoff, and a call must end well within publish_timeout.
            retries={"total_max_attempts": 2, "mode": "standard"},
            max_pool_connections=options.max_concurrency,
        )
        # A session of its own: the environment as it is now.
        session = boto3.session.Session()
        if session.get_credentials() is None:
            raise boto_errors.NoCredentialsError()
        return session.client(
            "sqs",
            endpoint_url=options.endpoint_url,
            region_name=options.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            verify=options.ca_file or None,
            config=config,
        )

    def _probe(self, client: Any) -> None:
        """One signed request that needs no queue: SQS answers it only for an identity it
        knows. AccessDenied still says that much (the relay needs only GetQueueUrl and
        SendMessage), so it passes."""
        try:
            client.list_queues(MaxResults=1)
        except boto_errors.ClientError as exc:
            if code_of(exc) not in ("AccessDenied", "AccessDeniedException"):
                raise

    async def connect(self) -> None:
        pool = ThreadPoolExecutor(self.options.max_concurrency, thread_name_prefix=f"sqs-{self.name}")
        loop = asyncio.get_running_loop()
        try:
            client = await loop.run_in_executor(pool, self._make_client)
            await loop.run_in_executor(pool, self._probe, client)
        except BaseException as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            if isinstance(exc, Exception):
                raise ConnectionError(f"cannot use SQS at {self._where()}: {refusal(exc) or first_line(exc)}") from None
            raise
        self._client, self._pool = client, pool

    def _where(self) -> str:
        return self.options.endpoint_url or f"AWS ({self.options.region or 'region from the environment'})"

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()

    async def ready(self) -> bool:
        """The probe, then each queue that may be missing is asked for again (module
        docstring): a server that answers but has not got its queues back yet
        (ElasticMQ restores them just after it starts listening) is not ready, or the
        trial message after an outage would find its queue missing. A queue stays in
        what is asked until a probe finds it; the others found meanwhile are not asked
        again, so a probe cut short at /readyz's 2 s still makes progress."""
        if self._client is None or self._pool is None:
            return False
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._probe, self._client)
        except Exception as exc:
            self._unconfirmed.update(self._urls)  # the server may come back without them
            raise ConnectionError(refusal(exc) or first_line(exc)) from None
        limit = asyncio.Semaphore(min(READY_CONCURRENCY, self.options.max_concurrency))

        async def missing(name: str) -> bool:
            async with limit:
                try:
                    await self._call("get_queue_url", QueueName=name)
                except Exception as exc:
                    if code_of(exc) in MISSING_QUEUE:
                        self._lost.add(name)
                        return True
                    raise
            self._unconfirmed.discard(name)
            self._lost.discard(name)
            return False

        names = sorted(self._unconfirmed)
        try:
            found = await asyncio.gather(*(missing(name) for name in names))
        except Exception as exc:
            raise ConnectionError(refusal(exc) or first_line(exc)) from None
        absent = [name for name, gone in zip(names, found, strict=True) if gone]
        if absent:
            shown = ", ".join(repr(name) for name in absent[:5]) + (
                f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            )
            raise ConnectionError(f"SQS queue(s) {shown} existed and do not exist (now)")
        return True

    async def _call(self, method: str, **kwargs: Any) -> Any:
        client, pool = self._client, self._pool
        if client is None or pool is None:
            raise boto_errors.EndpointConnectionError(endpoint_url=self._where())  # closed meanwhile
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, lambda: getattr(client, method)(**kwargs))
        except Exception as exc:
            if isinstance(exc, UNREACHABLE) or _status(exc) >= 500:
                # An outage: the server may come back before its queues do (ready()).
                self._unconfirmed.update(self._urls)
            raise

    # -- queues --------------------------------------------------------------------------

    async def _queue_url(self, queue: str) -> str | PublishResult:
        """The URL of `queue` (a name or a URL), or the result every message to it gets."""
        if is_url(queue):
            return queue
        if (url := self._urls.get(queue)) is not None and queue not in self._lost:
            return url
        missing = self._missing.get(queue)
        if missing is not None and missing[0] > time.monotonic():
            return PublishResult.permanent(missing[1])
        problem = name_problem(queue)
        if problem is not None:
            return PublishResult.permanent(problem)
        try:
            answer = await self._call("get_queue_url", QueueName=queue)
        except Exception as exc:
            if code_of(exc) in MISSING_QUEUE and queue in self._urls:
                return self._lost_queue(queue)
            if code_of(exc) in MISSING_QUEUE:
                why = f"SQS queue {queue!r} does not exist (create it, or fix the route's destination)"
                self._missing[queue] = (time.monotonic() + REMEMBER_MISSING_S, why)
                return PublishResult.permanent(why)
            return _request_failed(exc)
        url = str(answer["QueueUrl"])
        self._urls[queue] = url
        self._missing.pop(queue, None)
        self._lost.discard(queue)
        self._unconfirmed.discard(queue)
        return url

    def _lost_queue(self, queue: str) -> PublishResult:
        """A queue resolved earlier in this process is missing now: most likely a server
        still restoring its queues after a restart. Its messages wait (no attempt spent,
        the circuit opens) and ready() asks for it until it is back."""
        self._lost.add(queue)
        self._unconfirmed.add(queue)
        return PublishResult.unavailable(
            f"SQS queue {queue!r} existed and does not exist now (a server restoring its queues, or deleted):"
            " its messages wait until it is back"
        )

    # -- publishing ----------------------------------------------------------------------

    async def _send(self, url: str, entries: list[tuple[int, Entry]]) -> dict[int, PublishResult]:
        """One SendMessageBatch of `entries` (index in the call, entry): a result each."""
        request = [{"Id": str(index), **entry.fields} for index, entry in entries]
        try:
            answer = await self._call("send_message_batch", QueueUrl=url, Entries=request)
        except Exception as exc:
            if code_of(exc) in MISSING_QUEUE:
                names = [name for name, known in self._urls.items() if known == url]
                if names:  # resolved earlier in this process: it existed
                    lost = [self._lost_queue(name) for name in names][-1]  # each marked lost
                    return dict.fromkeys((index for index, _ in entries), lost)
                why = f"SQS queue {url} does not exist (create it, or fix the route's destination)"
                return dict.fromkeys((index for index, _ in entries), PublishResult.permanent(why))
            if refusal(exc) is None and len(entries) > 1:
                # Refused as a whole for what may be one entry's fault: each goes alone.
                alone = await asyncio.gather(*(self._send(url, [one]) for one in entries))
                return {index: result for answers in alone for index, result in answers.items()}
            if refusal(exc) is None and _status(exc) in range(400, 500):
                # A request of this one entry refused as the client's fault: the entry's.
                why = f"SQS refused the message: {first_line(exc)}"
                return dict.fromkeys((index for index, _ in entries), PublishResult.permanent(why))
            failed = _request_failed(exc)
            return dict.fromkeys((index for index, _ in entries), failed)
        results: dict[int, PublishResult] = {}
        queue = json.dumps(url)
        for done in answer.get("Successful", []):
            sequence = done.get("SequenceNumber")
            extra = f',"sequence_number":{json.dumps(sequence)}' if sequence is not None else ""
            receipt = f'{{"queue_url":{queue},"sqs_message_id":{json.dumps(done["MessageId"])}{extra}}}'
            results[int(done["Id"])] = PublishResult.acked(receipt)
        for failed in answer.get("Failed", []):
            why = f"SQS refused the message: {failed.get('Code')}: {failed.get('Message') or ''}".rstrip(": ")
            # SenderFault false: SQS's own fault (InternalError...): an SQS incident that
            # must not spend attempts. A code that refuses the relay or throttles is
            # every message's, whatever the flag says.
            code = failed.get("Code")
            own = failed.get("SenderFault") and code not in REFUSES_THE_RELAY and code not in THROTTLED
            results[int(failed["Id"])] = PublishResult.permanent(why) if own else PublishResult.unavailable(why)
        for index, _ in entries:
            results.setdefault(index, PublishResult.transient("SQS answered nothing for this entry"))
        return results

    def _requests(self, round_: list[tuple[int, str, Entry]]) -> list[tuple[str, list[tuple[int, Entry]]]]:
        """A round's entries as requests: per queue, at most 10 entries and
        max_message_bytes (SQS's limit on a whole batch too) each."""
        by_queue: dict[str, list[tuple[int, Entry]]] = {}
        for index, url, entry in round_:
            by_queue.setdefault(url, []).append((index, entry))
        requests: list[tuple[str, list[tuple[int, Entry]]]] = []
        for url, entries in by_queue.items():
            current: list[tuple[int, Entry]] = []
            size = 0
            for index, entry in entries:
                if current and (len(current) == BATCH_ENTRIES or size + entry.size > self.options.max_message_bytes):
                    requests.append((url, current))
                    current, size = [], 0
                current.append((index, entry))
                size += entry.size
            requests.append((url, current))
        return requests

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        if not batch:
            return []
        if self._client is None or self._pool is None:
            return [PublishResult.unavailable("not connected to SQS")] * len(batch)
        results: list[PublishResult | None] = [None] * len(batch)
        urls: dict[str, str | PublishResult] = {}
        queues = list(dict.fromkeys(out.destination for out in batch))
        for queue, url in zip(queues, await asyncio.gather(*(self._queue_url(q) for q in queues)), strict=True):
            urls[queue] = url
        # Each message's round: its position in its key's run (keyless: the first).
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for index, out in enumerate(batch):
            key = out.message.key
            position = 0 if key is None else seen.get(key, 0)
            if key is not None:
                seen[key] = position + 1
            if position == len(rounds):
                rounds.append([])
            rounds[position].append(index)
        stops = KeyStops()
        loop = asyncio.get_running_loop()
        start_by = loop.time() + self.options.request_timeout
        for number, members in enumerate(rounds):
            # A hot key's run of 1,000 is 1,000 rounds: against AWS (tens of ms each) that
            # would outlast relay.publish_timeout, and a call that ends there counts as an
            # outage. Rounds start for request_timeout only; what is left waits for a later
            # call at once, spending no attempt (the first round always goes).
            late = number > 0 and loop.time() > start_by
            ready: list[tuple[int, str, Entry]] = []
            for index in members:
                out = batch[index]
                target = urls[out.destination]
                outcome = stops.held(out) or (target if isinstance(target, PublishResult) else None)
                if outcome is None and late:
                    # Its key's earlier messages were acked (a round after the first holds
                    # only those): not_sent leaves it due at once, no attempt spent, no
                    # delay, and the next claim takes the run up (engine/dispatch.py).
                    outcome = PublishResult.not_sent(
                        f"not sent: this call's rounds took request_timeout ({self.options.request_timeout:g}s)"
                    )
                if outcome is None and isinstance(target, str):
                    entry = entry_for(out, is_fifo(target), self.options.max_message_bytes)
                    if isinstance(entry, Entry):
                        ready.append((index, target, entry))
                        continue
                    outcome = PublishResult.permanent(entry)
                assert outcome is not None
                results[index] = stops.note(out, outcome)
            answers = await asyncio.gather(*(self._send(url, entries) for url, entries in self._requests(ready)))
            for answer in answers:
                for index, result in answer.items():
                    results[index] = stops.note(batch[index], result)
        return [result or PublishResult.transient("not sent") for result in results]


def _request_failed(exc: BaseException) -> PublishResult:
    why = refusal(exc)
    if why is not None:
        return PublishResult.unavailable(why)
    return PublishResult.transient(f"SQS refused the request: {first_line(exc)}")


def create(name: str, options: Mapping[str, Any]) -> SqsAdapter:
    return SqsAdapter(name, parse_options(SqsOptions, options))


def check_destination(destination: str, explicit: bool) -> str | None:
    """Why SQS would refuse a route's destination, or None (outbox_relay/adapter.py). A
    route's own destination is a queue URL or a queue name; without one, the topic is
    the queue's name, so a character no queue name may hold breaks every such topic."""
    if explicit:
        return None if is_url(destination) else name_problem(destination)
    refused = sorted({c for c in destination if not (c.isascii() and (c.isalnum() or c in "-_."))})
    if refused:
        return f"SQS queue names (here: the topics) hold only letters, digits, hyphens and underscores, not {refused}"
    return None
