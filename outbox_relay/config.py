"""The relay's YAML configuration: models, defaults and the loader.

Every default lives here, once. Validation happens once at start; any problem
becomes a :class:`ConfigError` naming the file, the key path and what is wrong.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from outbox_relay.durations import Duration
from outbox_relay.envsubst import SubstitutionError, substitute_tree
from outbox_relay.errors import ConfigError, first_line
from outbox_relay.slot_names import name_for as slot_name_for
from outbox_relay.slot_names import validate_name as validate_slot_name
from outbox_relay.sqlfiles import DEFAULT_SCHEMA, validate_schema_name


def _not_bool(value: object) -> object:
    # YAML's `yes`/`true` must not quietly become 1 in a numeric setting.
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


Count = Annotated[int, BeforeValidator(_not_bool)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Model):
    dsn: SecretStr = Field(
        description="libpq DSN or URI. Put secrets in the environment (`${DATABASE_URL}`); "
        "the password is never logged or printed."
    )
    schema_name: str = Field(default=DEFAULT_SCHEMA, alias="schema", description="schema holding the outbox")
    connect_timeout: Duration = Field(default=10.0, description="per connection attempt")
    # How long the relay waits for the database to answer (a claim, a mark, a commit, the
    # LISTEN connection's check) before it gives the connection up as dead and connects
    # again: a hung server or a black-holed network never closes it (connections.py,
    # AnswerDeadline). Far above any healthy answer. A server only slow to answer ends
    # a lock wait itself first (each batch's statement_timeout is 0.9 x this: table.py);
    # a COMMIT waiting for a synchronous standby that is down, which statement_timeout
    # does not cover, is cancelled when the connection is given up (AnswerDeadline).
    query_timeout: Duration = Field(
        default=60.0,
        description="how long the relay waits for the database to answer (a claim, its marks and COMMIT, the "
        "LISTEN connection's check, the heartbeat and gauges) before it gives the connection up and connects "
        "again, to whichever host of the DSN answers: a hung server or a network that swallows data without a "
        "reset never closes a connection by itself. A server that is only slow must not be left with a waiting "
        "backend (and the batch's row locks) behind a connection given up: a lock wait (a migration's) ends "
        "server-side first, each batch running with `statement_timeout` 0.9 x `query_timeout`; a COMMIT waiting "
        "for a synchronous standby that is down (which `statement_timeout` does not cover) gets a cancel request "
        "when the connection is given up (libpq 17 or later, as in psycopg's binary package): it commits locally, "
        "finds its client gone and ends (`tests/integration/test_database_deadline.py`). Values past 24 days are "
        "capped at PostgreSQL's limit",
    )
    # Statements the relay runs this many times on a connection become server-side
    # prepared statements (psycopg's default). null: never, as a pooler in transaction
    # mode (pgbouncer before 1.21) requires: a prepared statement lives in one server
    # session, the pooler hands the next transaction another one.
    prepare_threshold: int | None = Field(
        default=5,
        ge=0,
        description="a statement run this many times on a connection is prepared server-side (psycopg's default); "
        "`null`: never, for a pooler in transaction mode (pgbouncer before 1.21), where a prepared statement "
        "would be missing on the next server session ([Running behind pgbouncer](how-to/pgbouncer.md))",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("schema_name")
    @classmethod
    def _schema(cls, value: str) -> str:
        try:
            return validate_schema_name(value)
        except ConfigError as exc:
            raise ValueError(exc.reason) from None

    @field_validator("query_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        return _must_be_positive(value)


class RetryConfig(_Model):
    """Exponential backoff with jitter between attempts of a message, capped."""

    initial: Duration = Field(
        default=0.2,
        description="the backoff before a message's second attempt; it doubles with each failed attempt "
        "(exponential backoff with jitter) up to `relay.retry.max`",
    )
    max: Duration = Field(default=30.0, description="the cap of that backoff")

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.initial <= 0 or self.max < self.initial:
            raise ValueError("need 0 < initial <= max")
        return self


def _must_be_positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


class WalConfig(_Model):
    """The WAL source (`outbox-relay schema source wal`): read only when the outbox's
    source is `wal`, or while a relay in `table` mode drains the slot a switch left."""

    # The replication slot, and the publication of the same name; null: derived from
    # database.schema (outbox_relay_<schema>), as `schema install --source wal` names it.
    slot: str | None = Field(
        default=None,
        description="the WAL source's replication slot and publication (`schema source wal --slot` names them); "
        "1-63 lower-case letters, digits or `_`",
        json_schema_extra={"shown_default": "`outbox_relay_<schema>`"},
    )
    # How long a broker outage may pause the stream before waiting messages are parked
    # into the table (sources/wal/relay.py: the slot holds the WAL meanwhile).
    park_after: Duration = Field(
        default=60.0,
        description="how long a broker outage pauses the WAL stream before the messages waiting for it are parked "
        "into the table",
    )
    # Standby status updates to the server; keep it well below its wal_sender_timeout.
    status_interval: Duration = Field(
        default=10.0,
        description="how often the relay tells the server it is alive when nothing was confirmed (a confirmed "
        "position itself is reported within 50 ms); keep it well below the server's `wal_sender_timeout`",
    )
    # While another relay streams the slot (one walsender per slot), the pause between
    # two tries to take it over: the takeover time after that relay dies.
    standby_interval: Duration = Field(
        default=1.0, description="while another relay streams the slot, how often a standby tries to take it over"
    )
    # Keep a receipt of each message it publishes (wal_receipts, outbox.receipt()), one
    # statement per dispatched batch; off by default: streamed messages have no row.
    receipts: bool = Field(
        default=False,
        description="keep a receipt of each message the WAL source publishes (`outbox.wal_receipts`, written per "
        "batch, kept for `relay.retention`; [Delivery receipts](how-to/receipts.md))",
    )

    @field_validator("slot")
    @classmethod
    def _slot(cls, value: str | None) -> str | None:
        return None if value is None else validate_slot_name(value)

    _positive = field_validator("park_after", "status_interval", "standby_interval")(_must_be_positive)


class RelayConfig(_Model):
    # 4 workers x 1,000 per batch: about a quarter more throughput than 2 x 500 with 100
    # keys on two cores (docs/explanation/performance-kafka.md), for 2 more connections and
    # twice the payload held in flight (workers x (max_batch_bytes + max_payload_bytes)).
    batch_size: Count = Field(
        default=1000, ge=1, le=10_000, description="messages claimed per batch (1-10000; `500` until this release)"
    )
    poll_interval: Duration = Field(default=1.0, description="the poll that finds messages when no NOTIFY arrives")
    notify: bool = Field(
        default=True,
        description="LISTEN for the trigger's NOTIFY; with `false` the poll alone finds messages",
    )
    max_attempts: Count = Field(
        default=10, ge=1, description="failed publish attempts before a message is dead-lettered"
    )
    # Keep where each dispatched message landed (messages.receipt, outbox.receipt()).
    receipts: bool = Field(
        default=True,
        description="keep where each dispatched message landed in `messages.receipt`, written by the statement "
        "that marks it ([Delivery receipts](how-to/receipts.md)); `false`: none is built or written (a marked row "
        "still enters the index `outbox.receipt` reads); with `relay.retention: 0s` none is built either, the rows "
        "being deleted as they are marked",
    )
    retry: RetryConfig = RetryConfig()
    retention: Duration = Field(
        default=24 * 3600.0,
        description="dispatched rows are kept this long (for replay and audit), then deleted in batches of 1000; "
        "`0s` keeps none: the statement that would mark a batch's acked rows deletes them instead (no new row "
        "version, no index entries: about two fifths less PostgreSQL CPU per message keyless; nothing left to "
        "replay)",
    )
    shutdown_timeout: Duration = Field(
        default=30.0,
        description="on SIGTERM, how long in-flight batches may take to finish before they are rolled back. A "
        "batch can last up to `2 x publish_timeout` (60 s with the defaults): one still publishing when this runs "
        "out is rolled back, its rows go again later, and what a broker already took of it arrives twice. Set it "
        "above `2 x publish_timeout` where that matters (and the pod's `terminationGracePeriodSeconds` above it)",
    )
    publish_timeout: Duration = Field(
        default=30.0,
        description="one broker call; a call with no answer by then means the broker is away: its messages wait "
        "without spending an attempt, and the broker is sent nothing more until a probe finds it answering (see "
        "[What happens on each kind of failure](explanation/guarantees.md#what-happens-on-each-kind-of-failure))",
    )
    # Concurrent claim/publish loops in one process; SKIP LOCKED keeps them apart.
    workers: Count = Field(
        default=4,
        ge=1,
        le=64,
        description="concurrent claim/publish loops in the process, each its own connection (`2` until this "
        "release: 4 x 1,000 drained 2 to 28 % faster than 2 x 500 by shape on 2 cores, 100 keys to Kafka +27 %, "
        "[Where the Kafka time goes](explanation/performance-kafka.md)); fewer where connections or memory are "
        "scarce: each worker holds a session and up to `max_batch_bytes + max_payload_bytes` of payload. What a "
        "relay killed mid-batch sends twice is bounded by `batch_size x workers` (now 4,000, was 1,000)",
    )
    # What a dead-lettered message does to later messages of its key:
    # `release` lets them go on; `hold` keeps them until it is requeued.
    dead_letter_policy: Literal["release", "hold"] = Field(
        default="release",
        description="what a dead letter does to later messages of its key: `release` lets them go on, `hold` "
        "keeps them until it is requeued",
    )
    # An open transaction older than this gets a warning naming its pid: it holds back
    # vacuum and so slows every claim.
    long_transaction_warning: Duration = Field(
        default=60.0,
        description="an open transaction older than this gets a `long_transaction` warning naming its pid",
    )
    # Larger payloads are dead-lettered on their size, never read into the relay's
    # memory (a row the relay cannot hold would otherwise crash it on every restart).
    # None (null): no limit beyond the broker's own.
    max_payload_bytes: Count | None = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="larger payloads are dead-lettered (`payload too large: N bytes > relay.max_payload_bytes "
        "(M)`) on their size alone: the relay never reads them into memory, so one huge row cannot crash it (and "
        "crash it again after every restart). `null`: no limit beyond the broker's own (until this release the "
        "default was no limit)",
    )
    # Payload bytes one claim may carry, beside batch_size: the relay's memory stays
    # bounded whatever the rows weigh. A single larger row still goes, alone.
    max_batch_bytes: Count = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="payload bytes one claim carries, beside `batch_size`: rows are taken while the bytes before "
        "them are under it (a single larger row still goes, alone); the rest wait for the next claim. With "
        "`workers` claims in flight, the relay holds at most about `workers x (max_batch_bytes + "
        "max_payload_bytes)` of payload",
    )
    wal: WalConfig = WalConfig()

    _positive = field_validator("poll_interval", "shutdown_timeout", "publish_timeout")(_must_be_positive)

    @field_validator("retention")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must not be negative")
        return value


class OutcomesConfig(_Model):
    """What the relay writes to `outbox.outcomes` for the application (schema.sql):
    a row per dead letter, and per delivery of the topics named."""

    dead_lettered: bool = Field(
        default=True,
        description="write a row to `outbox.outcomes` for each dead letter, in the statement that dead-letters it "
        "([Outcomes](how-to/outcomes.md))",
    )
    # Topic globs (as routes[].topic) whose deliveries are written too: the table
    # source writes them in the statement that marks the batch.
    delivered: list[Annotated[str, Field(min_length=1)]] = Field(
        default=[],
        description="topic globs (as `routes[].topic`) whose deliveries are written there too, in the statement "
        "that marks them dispatched (the WAL source: one statement per dispatched batch, before its position is "
        "confirmed)",
    )
    # Rows the application has not deleted are deleted after this long.
    retention: Duration = Field(
        default=7 * 24 * 3600.0,
        description="outcome rows the application has not taken are deleted after this long, 1,000 per statement, "
        "skipping rows a transaction holds",
    )

    _positive = field_validator("retention")(_must_be_positive)

    def feeds_delivered(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.delivered)


class DeadLetterTopicConfig(_Model):
    """Where dead letters are published besides staying in the table
    (engine/dead_letter_topic.py)."""

    broker: str = Field(
        description="publish each dead letter to this broker too ([Dead-letter topics](how-to/dead-letter-topics.md)); "
        "it stays in the table for requeue"
    )
    # The dead-letter topic (exchange, URL path...); {topic} is the message's own topic.
    # Spring Kafka's convention by default.
    destination: str = Field(
        default="{topic}.DLT",
        min_length=1,
        description="the dead-letter topic (exchange, ...); `{topic}` is the message's own topic (Spring Kafka's "
        "convention by default)",
    )
    batch_size: int = Field(default=100, ge=1, le=10_000, description="dead letters per publish call (1-10,000)")

    @field_validator("destination")
    @classmethod
    def _only_topic_placeholder(cls, value: str) -> str:
        try:
            # Each field as written with its conversion and format spec: only a bare {topic}.
            fields = {(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value) if name is not None}
        except ValueError:  # an unmatched brace
            fields = {("?", "", None)}
        if fields - {("topic", "", None)}:
            raise ValueError("may hold {topic} and nothing else in braces (write {{ and }} for a literal brace)")
        return value

    def destination_for(self, topic: str) -> str:
        return self.destination.format(topic=topic)


class DeadLettersConfig(_Model):
    """What happens to dead letters besides staying in the table."""

    publish_to: DeadLetterTopicConfig | None = None


class HttpConfig(_Model):
    """The health and metrics port: /livez, /readyz, /metrics."""

    enabled: bool = Field(default=True, description="serve the health and metrics port")
    host: str = Field(default="0.0.0.0", description="the address the health and metrics port listens on")
    port: int = Field(
        default=9187,
        ge=0,
        le=65535,
        description="the health and metrics port (`port: 0` picks a free one and logs it as `http_listening`)",
    )


class ConsoleConfig(_Model):
    """The operator console (outbox_relay/console/): `outbox-relay console`, or with
    `enabled` served by the relay on its HTTP port under /console.

    Read-only unless an operator signs in with the token, which comes from the
    environment only (OUTBOX_RELAY_CONSOLE_TOKEN), never from this file."""

    enabled: bool = Field(
        default=False,
        description="serve the [operator console](how-to/console.md) on the health port under `/console` too (it "
        "is always available as `outbox-relay console`)",
    )
    # Payloads are shown redacted unless this is true (the console's role then also
    # needs SELECT on messages.payload: schema sql --console-role ROLE --console-payloads).
    show_payloads: bool = Field(
        default=False,
        description="let an operator reveal a dead letter's payload (one click per message; redacted by default); "
        "its role then needs `--console-payloads`",
    )
    # Behind an authenticating proxy (oauth2-proxy, an ingress's forward auth): the
    # request header naming the signed-in user. A request carrying it may act, as that
    # user. Only where nothing but the proxy can reach the console: a client that can
    # reach it directly could send the header itself (docs/how-to/console.md).
    trusted_user_header: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9-]+$",
        description="behind an authenticating proxy: the header naming the signed-in user (`X-Forwarded-User`); a "
        "request carrying it may act, as that user. Only where nothing but the proxy reaches the console",
    )
    # Dead letters per page, and the most one action takes.
    page_size: int = Field(default=50, ge=1, le=500, description="dead letters per page (1-500)")


class BrokerConfig(BaseModel):
    """`type` picks the adapter; every other key is the adapter's to validate."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = Field(
        description="adapter name (`stdout`, `file`, `webhook`, `kafka`, `rabbitmq`, `redis`, `nats`, `sqs` or any "
        "installed adapter); the other keys of the block are the adapter's options "
        "([Built-in adapters](reference/adapters.md))"
    )

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _byte_count(value: Any) -> Any:
    """A size as an int of bytes, or a string such as "256KiB" or "5MB"."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {value!r} (use bytes, or a number with B, KB, KiB, MB, MiB, GB or GiB)")
        return int(match.group(1)) * _UNITS[match.group(2).lower()]
    return value


ByteCount = Annotated[int, BeforeValidator(_byte_count), Field(ge=0)]


class FileStoreConfig(_Model):
    """Claim-check objects as files under `path` (a volume the consumers mount too)."""

    type: Literal["file"] = Field(description="objects as files under `path`")
    path: str = Field(min_length=1, description="the folder (a volume the consumers mount too)")


class S3StoreConfig(_Model):
    """Claim-check objects in an S3-compatible bucket. Credentials come from the
    environment only (boto3's chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a
    profile, a role), never from this file."""

    type: Literal["s3"] = Field(description="objects in an S3-compatible bucket; credentials from the environment only")
    bucket: str = Field(min_length=3, max_length=63, description="the bucket")
    prefix: str = Field(
        default="",
        description="put before each object's name (the message id): empty or path segments of letters, digits "
        "and `!_.*'()-` ending in `/` (`relay/`)",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="an `http://` or `https://` URL of an S3-compatible store (SeaweedFS, MinIO, Ceph...); unset: AWS",
    )
    region: str | None = Field(default=None, description="the bucket's region")
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="encryption at rest asked of the store"
    )
    kms_key_id: str | None = Field(default=None, description="the KMS key, with `server_side_encryption: aws:kms`")
    ca_file: str | None = Field(default=None, description="a private CA for the endpoint's TLS")
    timeout: Duration = Field(default=30.0, description="one request to the store")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # Objects are named prefix + message id and found again from their s3:// URL:
        # a prefix that a URL would change (a leading /, ?, #, %) would name another key.
        if value and not re.fullmatch(r"[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*/", value):
            raise ValueError("must be empty or path segments of letters, digits and !_.*'()- ending in / (relay/)")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an http:// or https:// URL (https://s3.internal:8333)")
        return value

    @model_validator(mode="after")
    def _kms_key_with_kms(self) -> S3StoreConfig:
        if self.kms_key_id is not None and self.server_side_encryption != "aws:kms":
            raise ValueError("kms_key_id needs server_side_encryption: aws:kms")
        return self


class ClaimCheckConfig(_Model):
    """Payloads over `over` go to `store`; the broker gets an envelope naming them."""

    over: ByteCount = Field(
        default=256 * 1024,
        description="payloads larger than this go to the claim-check store first "
        "([Large payloads](how-to/claim-check.md)); also `routes[].claim_check` per route",
    )
    store: Annotated[FileStoreConfig | S3StoreConfig, Field(discriminator="type")] = Field(
        description="where the payloads go: `{type: file, path}` or `{type: s3, bucket, prefix, endpoint_url, "
        "region, server_side_encryption, kms_key_id, ca_file, timeout}`; S3 credentials from the environment only"
    )


class RouteConfig(_Model):
    """Which broker a topic goes to: the first route whose glob matches wins."""

    topic: str = Field(min_length=1, description="a glob of topics (`orders.*`, `*`)")
    broker: str = Field(description="the name of a block of `brokers`")
    destination: str | None = Field(
        default=None,
        description="where on the broker (a Kafka topic, an exchange...); unset: the message's topic",
    )
    # Overrides the top-level claim_check for this route's messages.
    claim_check: ClaimCheckConfig | None = Field(
        default=None, description="overrides the top-level `claim_check` for this route's messages"
    )

    def matches(self, topic: str) -> bool:
        return fnmatch.fnmatchcase(topic, self.topic)


class Config(_Model):
    database: DatabaseConfig
    relay: RelayConfig = RelayConfig()
    http: HttpConfig = HttpConfig()
    outcomes: OutcomesConfig = OutcomesConfig()
    dead_letters: DeadLettersConfig = DeadLettersConfig()
    console: ConsoleConfig = ConsoleConfig()
    # Large payloads through object storage, for every route without its own.
    claim_check: ClaimCheckConfig | None = None
    brokers: dict[str, BrokerConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    # Which file this came from, for error messages; never read from the file itself.
    _source: str = PrivateAttr(default="<config>")

    @property
    def source(self) -> str:
        return self._source

    @property
    def wal_slot(self) -> str:
        """The WAL source's slot (and publication) name: relay.wal.slot, or the one
        derived from the schema."""
        return self.relay.wal.slot or slot_name_for(self.database.schema_name)

    @model_validator(mode="after")
    def _routes_name_brokers(self) -> Config:
        for index, route in enumerate(self.routes):
            if route.broker not in self.brokers:
                known = ", ".join(sorted(self.brokers))
                raise _PathError(
                    ("routes", str(index), "broker"),
                    f"unknown broker {route.broker!r} (defined: {known})",
                )
        relay = self.relay
        if relay.wal.receipts and not (relay.receipts and relay.retention > 0):
            raise _PathError(
                ("relay", "wal", "receipts"),
                "needs relay.receipts on and relay.retention above 0s (receipts are kept for relay.retention)",
            )
        if self.console.enabled and not self.http.enabled:
            raise _PathError(
                ("console", "enabled"),
                "serves the console on the health port, which http.enabled: false turns off "
                "(turn it on, or run `outbox-relay console` on its own)",
            )
        if self.console.enabled and self.console.trusted_user_header and not _loopback(self.http.host):
            raise _PathError(
                ("console", "trusted_user_header"),
                f"with console.enabled the console listens on http.host {self.http.host!r}, where any client "
                "could send that header itself: run `outbox-relay console` behind the proxy instead, "
                "or set http.host to 127.0.0.1",
            )
        topic = self.dead_letters.publish_to
        if topic is not None and topic.broker not in self.brokers:
            known = ", ".join(sorted(self.brokers))
            raise _PathError(
                ("dead_letters", "publish_to", "broker"), f"unknown broker {topic.broker!r} (defined: {known})"
            )
        return self


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


class _PathError(ValueError):
    def __init__(self, path: tuple[str, ...], message: str):
        self.path = path
        super().__init__(message)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a config file. Raise ConfigError on any problem."""
    source = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=str(path)) from None
    return parse(text, source=source, env=os.environ if env is None else env)


def parse(text: str, *, source: str = "<config>", env: Mapping[str, str]) -> Config:
    try:
        return _parse(text, source=source, env=env)
    except RecursionError:
        # A self-referencing YAML alias (`a: &x [*x]`) or absurd nesting.
        raise ConfigError("structure is self-referencing or too deeply nested", source=source) from None


def _parse(text: str, *, source: str, env: Mapping[str, str]) -> Config:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise ConfigError(f"{where}invalid YAML: {problem}", source=source) from None
    if not isinstance(tree, dict):
        raise ConfigError("expected a mapping with database, brokers and routes", source=source)
    try:
        tree = substitute_tree(tree, env)
    except SubstitutionError as exc:
        raise ConfigError(str(exc), source=source, path=key_path(exc.path)) from None
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        # A _PathError raised by a validator arrives here too, inside the ValidationError.
        raise config_error(exc, source=source) from None
    config._source = source
    return config


def key_path(parts: tuple[object, ...]) -> str:
    """A dotted key path that always fits on one line (odd keys are shown quoted)."""
    shown = []
    for part in parts:
        text = str(part)
        shown.append(text if text.isprintable() and text.strip() == text and text else repr(text))
    return ".".join(shown)


def _secret(loc: tuple[str, ...]) -> bool:
    """Whether a value at this key path may hold a secret, so an error must not echo it
    (a DSN given as a mapping holds its password; a URL may hold a token)."""
    return any(
        part in {"dsn", "url", "headers"} or "password" in part or "secret" in part or "token" in part for part in loc
    )


# Errors about the kind of value: the value given is shown beside them (unless secret).
_WRONG_KIND = {
    "int_type",
    "int_parsing",
    "bool_type",
    "bool_parsing",
    "string_type",
    "dict_type",
    "list_type",
    "model_type",
    "float_type",
    "literal_error",
}


def config_error(
    exc: ValidationError,
    *,
    source: str | None = None,
    noun: str = "key",
    known_keys: Callable[[tuple[str, ...]], Sequence[str]] | None = None,
    show_input: bool = True,
) -> ConfigError:
    """The one-line ConfigError for a failed validation: its key path and what is wrong.

    The relay's config and every adapter's options (adapters/_options.py) are reported
    by this one function. `noun` names a key in the message ("unknown key", "required
    key is missing"); `known_keys(parent)` lists the keys a mistyped key under `parent`
    may have meant (default: the relay config's own); `show_input` adds the value given
    to an error about its kind (never for a key that may hold a secret).
    """
    errors = exc.errors()
    # An unknown key is usually the cause of a "missing" one next to it (a typo): say it first.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(str(part) for part in error["loc"])
    ctx = error.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _PathError):
        return ConfigError(str(inner), source=source, path=key_path(inner.path))
    path = key_path(loc) or None  # one line, whatever the keys hold
    kind = error["type"]
    if kind == "extra_forbidden":
        names = (known_keys or _config_keys)(loc[:-1])
        suggestion = difflib.get_close_matches(loc[-1], names, n=1)
        hint = f" (did you mean {suggestion[0]!r}?)" if suggestion else ""
        return ConfigError(f"unknown {noun} {loc[-1]!r}{hint}", source=source, path=path)
    if kind == "missing":
        return ConfigError(f"required {noun} is missing", source=source, path=path)
    message = str(inner) if inner is not None else error["msg"]
    message = message.removeprefix("Value error, ")
    if show_input and kind in _WRONG_KIND and not _secret(loc):
        message = f"{message} (got {error.get('input')!r})"
    return ConfigError(message, source=source, path=path)


_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Config,
    ("database",): DatabaseConfig,
    ("relay",): RelayConfig,
    ("relay", "retry"): RetryConfig,
    ("relay", "wal"): WalConfig,
    ("http",): HttpConfig,
    ("outcomes",): OutcomesConfig,
    ("dead_letters",): DeadLettersConfig,
    ("dead_letters", "publish_to"): DeadLetterTopicConfig,
    ("claim_check",): ClaimCheckConfig,
}


def _config_keys(parent: tuple[str, ...]) -> list[str]:
    """The keys of the relay config's block at `parent` (none for a broker's block)."""
    model: type[BaseModel] | None = _MODELS.get(parent)
    if model is None and len(parent) == 2 and parent[0] == "routes":
        model = RouteConfig
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]
