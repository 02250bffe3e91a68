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
    dsn: SecretStr
    schema_name: str = Field(default=DEFAULT_SCHEMA, alias="schema")
    connect_timeout: Duration = 10.0
    # How long the relay waits for the database to answer (a claim, a mark, a commit, the
    # LISTEN connection's check) before it gives the connection up as dead and connects
    # again: a hung server or a black-holed network never closes it (connections.py,
    # AnswerDeadline). Far above any healthy answer. A server only slow to answer ends
    # a lock wait itself first (each batch's statement_timeout is 0.9 x this: table.py);
    # a COMMIT waiting for a synchronous standby that is down, which statement_timeout
    # does not cover, is cancelled when the connection is given up (AnswerDeadline).
    query_timeout: Duration = 60.0
    # Statements the relay runs this many times on a connection become server-side
    # prepared statements (psycopg's default). null: never, as a pooler in transaction
    # mode (pgbouncer before 1.21) requires: a prepared statement lives in one server
    # session, the pooler hands the next transaction another one.
    prepare_threshold: int | None = Field(default=5, ge=0)

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
    initial: Duration = 0.2
    max: Duration = 30.0

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
    slot: str | None = None
    # How long a broker outage may pause the stream before waiting messages are parked
    # into the table (sources/wal/relay.py: the slot holds the WAL meanwhile).
    park_after: Duration = 60.0
    # Standby status updates to the server; keep it well below its wal_sender_timeout.
    status_interval: Duration = 10.0
    # While another relay streams the slot (one walsender per slot), the pause between
    # two tries to take it over: the takeover time after that relay dies.
    standby_interval: Duration = 1.0
    # Keep a receipt of each message it publishes (wal_receipts, outbox.receipt()), one
    # statement per dispatched batch; off by default: streamed messages have no row.
    receipts: bool = False

    @field_validator("slot")
    @classmethod
    def _slot(cls, value: str | None) -> str | None:
        return None if value is None else validate_slot_name(value)

    _positive = field_validator("park_after", "status_interval", "standby_interval")(_must_be_positive)


class RelayConfig(_Model):
    # 4 workers x 1,000 per batch: about a quarter more throughput than 2 x 500 with 100
    # keys on two cores (README, "Where the Kafka time goes"), for 2 more connections and
    # twice the payload held in flight (workers x (max_batch_bytes + max_payload_bytes)).
    batch_size: Count = Field(default=1000, ge=1, le=10_000)
    poll_interval: Duration = 1.0
    notify: bool = True
    max_attempts: Count = Field(default=10, ge=1)
    # Keep where each dispatched message landed (messages.receipt, outbox.receipt()).
    receipts: bool = True
    retry: RetryConfig = RetryConfig()
    retention: Duration = 24 * 3600.0
    shutdown_timeout: Duration = 30.0
    publish_timeout: Duration = 30.0
    # Concurrent claim/publish loops in one process; SKIP LOCKED keeps them apart.
    workers: Count = Field(default=4, ge=1, le=64)
    # What a dead-lettered message does to later messages of its key:
    # `release` lets them go on; `hold` keeps them until it is requeued.
    dead_letter_policy: Literal["release", "hold"] = "release"
    # An open transaction older than this gets a warning naming its pid: it holds back
    # vacuum and so slows every claim.
    long_transaction_warning: Duration = 60.0
    # Larger payloads are dead-lettered on their size, never read into the relay's
    # memory (a row the relay cannot hold would otherwise crash it on every restart).
    # None (null): no limit beyond the broker's own.
    max_payload_bytes: Count | None = Field(default=64 * 1024 * 1024, ge=1)
    # Payload bytes one claim may carry, beside batch_size: the relay's memory stays
    # bounded whatever the rows weigh. A single larger row still goes, alone.
    max_batch_bytes: Count = Field(default=16 * 1024 * 1024, ge=1024)
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

    dead_lettered: bool = True
    # Topic globs (as routes[].topic) whose deliveries are written too: the table
    # source writes them in the statement that marks the batch.
    delivered: list[Annotated[str, Field(min_length=1)]] = []
    # Rows the application has not deleted are deleted after this long.
    retention: Duration = 7 * 24 * 3600.0

    _positive = field_validator("retention")(_must_be_positive)

    def feeds_delivered(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.delivered)


class DeadLetterTopicConfig(_Model):
    """Where dead letters are published besides staying in the table
    (engine/dead_letter_topic.py)."""

    broker: str
    # The dead-letter topic (exchange, URL path...); {topic} is the message's own topic.
    # Spring Kafka's convention by default.
    destination: str = Field(default="{topic}.DLT", min_length=1)
    batch_size: int = Field(default=100, ge=1, le=10_000)

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
    publish_to: DeadLetterTopicConfig | None = None


class HttpConfig(_Model):
    """The health and metrics port: /livez, /readyz, /metrics."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=9187, ge=0, le=65535)  # 0: any free port (logged at start)


class ConsoleConfig(_Model):
    """The operator console (outbox_relay/console/): `outbox-relay console`, or with
    `enabled` served by the relay on its HTTP port under /console.

    Read-only unless an operator signs in with the token, which comes from the
    environment only (OUTBOX_RELAY_CONSOLE_TOKEN), never from this file."""

    enabled: bool = False
    # Payloads are shown redacted unless this is true (the console's role then also
    # needs SELECT on messages.payload: schema sql --console-role ROLE --console-payloads).
    show_payloads: bool = False
    # Behind an authenticating proxy (oauth2-proxy, an ingress's forward auth): the
    # request header naming the signed-in user. A request carrying it may act, as that
    # user. Only where nothing but the proxy can reach the console: a client that can
    # reach it directly could send the header itself (README, Operator console).
    trusted_user_header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")
    # Dead letters per page, and the most one action takes.
    page_size: int = Field(default=50, ge=1, le=500)


class BrokerConfig(BaseModel):
    """`type` picks the adapter; every other key is the adapter's to validate."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str

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

    type: Literal["file"]
    path: str = Field(min_length=1)


class S3StoreConfig(_Model):
    """Claim-check objects in an S3-compatible bucket. Credentials come from the
    environment only (boto3's chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a
    profile, a role), never from this file."""

    type: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    endpoint_url: str | None = None  # SeaweedFS, MinIO, Ceph...; None: AWS
    region: str | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    ca_file: str | None = None  # a private CA for the endpoint's TLS
    timeout: Duration = 30.0

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

    over: ByteCount = 256 * 1024
    store: Annotated[FileStoreConfig | S3StoreConfig, Field(discriminator="type")]


class RouteConfig(_Model):
    topic: str = Field(min_length=1)
    broker: str
    destination: str | None = None
    # Overrides the top-level claim_check for this route's messages.
    claim_check: ClaimCheckConfig | None = None

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
