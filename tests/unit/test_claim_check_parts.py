"""The claim check's parts without servers: its configuration, the envelope, the
relay's upload step (a filesystem store, and one that fails) and fetch's checks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from outbox_relay import claim_check
from outbox_relay.claim_check import envelope
from outbox_relay.claim_check.stores import FileStore
from outbox_relay.claim_check.uploads import CONCURRENCY, ClaimChecks
from outbox_relay.config import ClaimCheckConfig, FileStoreConfig, parse
from outbox_relay.engine.retry import Backoff
from outbox_relay.errors import ConfigError
from outbox_relay.models import Message, Outcome, OutgoingMessage

BASE = "database: {dsn: x}\nbrokers: {k: {type: stdout}}\nroutes: [{topic: '*', broker: k}]\n"


def message(n: int, key: str | None, payload: bytes) -> Message:
    return Message(n, uuid.uuid4(), "docs", key, payload, "application/octet-stream", {}, 0, datetime.now(UTC))


@pytest.mark.parametrize(("given", "expected"), [("256KiB", 262144), ("5MB", 5_000_000), ("1 GiB", 2**30), (42, 42)])
def test_sizes_read_as_bytes(given: object, expected: int) -> None:
    config = parse(BASE + f"claim_check: {{over: {given!r}, store: {{type: file, path: /x}}}}", env={})
    assert config.claim_check is not None and config.claim_check.over == expected


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("{over: 5 parsecs, store: {type: file, path: /x}}", "claim_check.over: not a size: '5 parsecs'"),
        ("{store: {type: tape}}", "claim_check.store"),
        ("{store: {type: s3}}", "claim_check.store.s3.bucket: required key is missing"),
        ("{store: {type: s3, bucket: abc, secret_access_key: x}}", "unknown key 'secret_access_key'"),
    ],
)
def test_a_wrong_claim_check_block_is_one_line(block: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(BASE + f"claim_check: {block}", env={})
    assert error in str(raised.value) and "\n" not in str(raised.value)


def test_an_envelope_without_its_size_or_hash_is_refused() -> None:
    with pytest.raises(envelope.ClaimCheckError, match="lacks a valid"):
        envelope.reference_in({envelope.URL: "file:///x", envelope.SHA256: "ab"})
    assert envelope.reference_in({"other": "header"}) is None


async def test_uploads_replace_large_payloads_and_a_failed_store_holds_the_rest_of_its_key(tmp_path: Path) -> None:
    good = ClaimCheckConfig(over=10, store=FileStoreConfig(type="file", path=str(tmp_path / "ok")))
    (tmp_path / "blocked").write_text("a file where the store's directory should be")
    bad = ClaimCheckConfig(over=10, store=FileStoreConfig(type="file", path=str(tmp_path / "blocked")))
    checks = ClaimChecks([good.store, bad.store], Backoff(0.05, 1.0), timeout=5)
    large = b"x" * 100
    a1, a2, b1, small = message(1, "a", large), message(2, "a", b"tiny"), message(3, "b", large), message(4, "a", b"s")
    items = [
        (0, OutgoingMessage(a1, "d"), bad),  # fails: key a stops here
        (1, OutgoingMessage(b1, "d"), good),
        (2, OutgoingMessage(a2, "d"), good),
        (3, OutgoingMessage(small, "d"), None),
    ]
    ready, held = await checks.prepare(items, ordered=True)
    assert held[0].outcome is Outcome.UNAVAILABLE and "claim-check store" in (held[0].reason or "")
    assert held[0].retry_after is not None
    assert held[2].outcome is Outcome.NOT_SENT and held[3].outcome is Outcome.NOT_SENT
    [(index, out)] = ready
    assert index == 1 and out.message.content_type == envelope.CONTENT_TYPE
    reference = envelope.reference_in(out.message.headers)
    assert reference is not None and reference.size == 100
    assert reference.sha256 == hashlib.sha256(large).hexdigest()
    assert claim_check.fetch({"headers": out.message.headers}) == large
    ok, details = checks.readiness() or (True, {})
    assert not ok and details["claim_check_stores"][(tmp_path / "blocked").as_uri()] is False
    # Unordered, only the failed message waits.
    ready, held = await checks.prepare(items, ordered=False)
    assert sorted(held) == [0] and [i for i, _ in ready] == [1, 2, 3]


def test_fetch_refuses_an_object_of_another_size(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"abc")
    headers = {envelope.URL: (tmp_path / "obj").as_uri(), envelope.SIZE: "4", envelope.SHA256: "00"}
    with pytest.raises(claim_check.ClaimCheckError, match="has 3 bytes, the envelope says 4"):
        claim_check.fetch({"headers": headers})
    with pytest.raises(claim_check.ClaimCheckError, match="does not exist"):
        claim_check.fetch({"headers": {**headers, envelope.URL: (tmp_path / "gone").as_uri()}})


def test_a_store_failure_is_told_from_a_message_failure() -> None:
    from botocore.exceptions import EndpointConnectionError, ParamValidationError

    from outbox_relay.claim_check.uploads import _store_level

    assert _store_level(TimeoutError()) and _store_level(ConnectionRefusedError())
    assert _store_level(EndpointConnectionError(endpoint_url="http://x"))
    assert not _store_level(ParamValidationError(report="bad content type"))
    assert not _store_level(ValueError("header value"))


class ScriptedStore:
    """A store whose uploads fail, hang until released, or succeed, as a test says."""

    def __init__(self, where: str, behaviour: str = "ok") -> None:
        self.where = where
        self.behaviour = behaviour
        self.release = threading.Event()
        self.puts: list[str] = []

    def put(self, name: str, data: bytes, sha256: str, content_type: str) -> str:
        self.puts.append(name)
        if self.behaviour == "refuse":
            raise ConnectionRefusedError("connection refused")
        if self.behaviour == "hang":
            self.release.wait(30)
            raise TimeoutError("released")
        if self.behaviour == "slow":
            self.release.wait(0.8)
        return f"{self.where}{name}"


def scripted_checks(
    tmp_path: Path, *stores: ScriptedStore, timeout: float, backoff: Backoff
) -> tuple[ClaimChecks, list[ClaimCheckConfig]]:
    configs = [
        ClaimCheckConfig(over=10, store=FileStoreConfig(type="file", path=str(tmp_path / str(n))))
        for n in range(len(stores))
    ]
    checks = ClaimChecks([c.store for c in configs], backoff, timeout=timeout)
    for config, store in zip(configs, stores, strict=True):
        checks._stores[config.store] = store  # type: ignore[assignment]
    return checks, configs


async def test_a_failed_store_is_not_asked_again_within_its_window_and_a_success_closes_it(tmp_path: Path) -> None:
    store = ScriptedStore("mem://a/", "refuse")
    checks, (config,) = scripted_checks(tmp_path, store, timeout=5, backoff=Backoff(0.2, 0.4))
    items = [(0, OutgoingMessage(message(1, "k", b"x" * 100), "d"), config)]
    _, held = await checks.prepare(items, ordered=True)
    assert held[0].outcome is Outcome.UNAVAILABLE and "connection refused" in (held[0].reason or "")
    assert len(store.puts) == 1
    # Within the window: refused at once, without asking the store, and told how long is left.
    _, held = await checks.prepare(items, ordered=True)
    assert len(store.puts) == 1 and held[0].outcome is Outcome.UNAVAILABLE
    assert held[0].retry_after is not None and 0 < held[0].retry_after <= 0.4
    assert checks.readiness() == (False, {"claim_check_stores": {"mem://a/": False}})
    # After the window the store is asked again; a success closes the circuit and /readyz.
    await asyncio.sleep(0.45)
    store.behaviour = "ok"
    ready, held = await checks.prepare(items, ordered=True)
    assert held == {} and len(ready) == 1 and len(store.puts) == 2
    assert checks.readiness() == (True, {"claim_check_stores": {"mem://a/": True}})
    checks.close()


async def test_a_store_that_never_answers_counts_against_it_and_starves_no_other(tmp_path: Path) -> None:
    hanging, healthy = ScriptedStore("mem://hang/", "hang"), ScriptedStore("mem://ok/")
    checks, (slow, fine) = scripted_checks(tmp_path, hanging, healthy, timeout=0.6, backoff=Backoff(0.05, 0.1))
    try:
        # More uploads than threads: those running and those queued behind them alike
        # are the store's failure (no answer within the deadline), counted once.
        items = [(n, OutgoingMessage(message(n, None, b"x" * 100), "d"), slow) for n in range(CONCURRENCY + 2)]
        _, held = await checks.prepare(items, ordered=False)
        assert sorted(held) == list(range(CONCURRENCY + 2))
        assert all(r.outcome is Outcome.UNAVAILABLE and "no answer" in (r.reason or "") for r in held.values())
        assert checks._outage == {"mem://hang/": 1}
        # Every thread of the hung store is still held: another store's uploads have
        # threads of their own and go.
        other = [(0, OutgoingMessage(message(99, None, b"y" * 100), "d"), fine)]
        ready, held = await checks.prepare(other, ordered=False)
        assert held == {} and len(ready) == 1 and len(healthy.puts) == 1
        ok, details = checks.readiness() or (True, {})
        assert not ok and details["claim_check_stores"] == {"mem://hang/": False, "mem://ok/": True}
    finally:
        hanging.release.set()
        checks.close()


async def test_uploads_queued_behind_a_burst_the_store_answers_wait_without_counting_against_it(
    tmp_path: Path,
) -> None:
    slow = ScriptedStore("mem://slow/", "slow")
    checks, (config,) = scripted_checks(tmp_path, slow, timeout=2.0, backoff=Backoff(0.05, 0.1))
    try:
        # Each upload takes 0.8 s: two rounds of CONCURRENCY are answered within the 2 s
        # deadline; the third starts at 1.6 s and is still running at 2 s, for less than
        # half the deadline (not the store's fault); a fourth never got a thread.
        count = 4 * CONCURRENCY
        items = [(n, OutgoingMessage(message(n, None, b"x" * 100), "d"), config) for n in range(count)]
        ready, held = await checks.prepare(items, ordered=False)
        assert len(ready) == 2 * CONCURRENCY
        assert len(held) == 2 * CONCURRENCY
        assert all(r.outcome is Outcome.UNAVAILABLE and "queued" in (r.reason or "") for r in held.values())
        assert checks._outage == {} and checks.readiness() == (True, {"claim_check_stores": {"mem://slow/": True}})
    finally:
        slow.release.set()
        checks.close()


def test_a_file_store_follows_the_umask_set_after_import(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    previous = os.umask(0o077)  # an application tightening it after importing the relay
    try:
        url = store.put("m1", b"payload", hashlib.sha256(b"payload").hexdigest(), "application/octet-stream")
    finally:
        os.umask(previous)
    assert url.startswith("file://")
    assert stat.S_IMODE((tmp_path / "m1").stat().st_mode) == 0o600
