"""The built-in sinks for real: `file` on disk, `stdout`, and `webhook` against a local HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from outbox_relay_adapters.file import FileAdapter
from outbox_relay_adapters.stdout import StdoutAdapter
from outbox_relay_adapters.webhook import WebhookAdapter

from outbox_relay import adapter as registry
from outbox_relay.errors import AdapterOptionsError
from outbox_relay.json_lines import as_dict, decode_payload
from outbox_relay.models import Outcome, PublishResult
from tests.support.factories import outgoing
from tests.support.http import HttpReceiver


def outcomes(results: Any) -> list[Outcome]:
    return [r.outcome for r in results]


# --- file ------------------------------------------------------------------------------------


def file_adapter(path: Path | str, **options: Any) -> FileAdapter:
    adapter = registry.create("file", "audit", {"path": str(path), **options})
    assert isinstance(adapter, FileAdapter)
    return adapter


@contextlib.asynccontextmanager
async def connected(adapter: Any) -> AsyncIterator[Any]:
    await adapter.connect()
    try:
        yield adapter
    finally:
        await adapter.close()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_file_creates_parent_dirs_and_writes_one_line_per_message(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "out.jsonl"
    batch = [
        outgoing(n, payload, key=key, headers={"h": str(n)})
        for n, payload, key in [(1, None, "k1"), (2, {"x": [1, 2]}, None), (3, None, "k3")]
    ]
    async with connected(file_adapter(path)) as adapter:
        results = await adapter.publish(batch)
        # Acked means on disk: the lines are there the moment publish returns.
        lines = read_lines(path)
    assert outcomes(results) == [Outcome.ACKED] * 3
    assert len(lines) == 3
    for line, out in zip(lines, batch, strict=True):
        assert line == as_dict(out)
        assert line["message_id"] == str(out.message_id)
        assert line["topic"] == out.message.topic
        assert line["key"] == out.message.key
        assert line["headers"] == dict(out.message.headers)
        assert decode_payload(line) == json.loads(out.message.payload)


async def test_file_appends_across_batches_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"existing": true}\n', encoding="utf-8")
    async with connected(file_adapter(path, fsync=False)) as adapter:
        await adapter.publish([outgoing(1)])
        await adapter.publish([outgoing(2), outgoing(3)])
    async with connected(file_adapter(path)) as adapter:
        await adapter.publish([outgoing(4)])
    lines = read_lines(path)
    assert lines[0] == {"existing": True}
    assert [line["payload"]["n"] for line in lines[1:]] == [1, 2, 3, 4]
    assert path.read_text(encoding="utf-8").endswith("\n")


async def test_file_concurrent_publishes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    async with connected(file_adapter(path)) as adapter:
        batches = [[outgoing(b * 100 + i, {"pad": "x" * 500}) for i in range(20)] for b in range(10)]
        results = await asyncio.gather(*(adapter.publish(batch) for batch in batches))
    assert all(outcomes(r) == [Outcome.ACKED] * 20 for r in results)
    lines = read_lines(path)  # every line parses: nothing interleaved
    assert len(lines) == 200
    ids = [line["message_id"] for line in lines]
    assert sorted(ids) == sorted(str(out.message_id) for batch in batches for out in batch)


async def test_file_ready_follows_connection(tmp_path: Path) -> None:
    adapter = file_adapter(tmp_path / "out.jsonl")
    assert await adapter.ready() is False
    results = await adapter.publish([outgoing(1)])
    assert outcomes(results) == [Outcome.UNAVAILABLE]
    await adapter.connect()
    assert await adapter.ready() is True
    await adapter.close()
    assert await adapter.ready() is False


async def test_file_path_is_a_directory_fails_to_connect_or_publish(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    adapter = file_adapter(target)
    try:
        await adapter.connect()
    except OSError:
        return  # refusing to connect is one correct answer
    try:
        results = await adapter.publish([outgoing(1), outgoing(2)])
    finally:
        await adapter.close()
    assert outcomes(results) == [Outcome.TRANSIENT] * 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_file_write_failure_is_transient_never_acked() -> None:
    async with connected(file_adapter("/dev/full")) as adapter:
        results = await adapter.publish([outgoing(1), outgoing(2)])
    assert outcomes(results) == [Outcome.TRANSIENT] * 2
    assert all(r.reason is not None and "write to /dev/full failed" in r.reason for r in results)


# --- stdout -----------------------------------------------------------------------------------


async def test_stdout_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    adapter = registry.create("stdout", "console", {})
    batch = [outgoing(1, key="k", headers={"h": "1"}), outgoing(2, headers={"h": "2"})]
    async with connected(adapter):
        results = await adapter.publish(batch)
    assert outcomes(results) == [Outcome.ACKED] * 2
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [as_dict(out) for out in batch]


async def test_stdout_to_stream_and_closed_stream() -> None:
    stream = io.StringIO()
    adapter = StdoutAdapter("console", stream=stream)
    assert await adapter.ready() is True
    assert outcomes(await adapter.publish([outgoing(1), outgoing(2), outgoing(3)])) == [Outcome.ACKED] * 3
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["payload"] for line in lines] == [{"n": 1}, {"n": 2}, {"n": 3}]
    stream.close()
    assert await adapter.ready() is False
    results = await adapter.publish([outgoing(4)])
    assert outcomes(results) == [Outcome.TRANSIENT]


def test_stdout_rejects_options() -> None:
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("stdout", "console", {"colour": True})
    assert info.value.path == "colour"


# --- webhook: a real local HTTP server ----------------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[HttpReceiver]:
    with HttpReceiver() as server:
        yield server


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def webhook(url: str, **options: Any) -> WebhookAdapter:
    adapter = registry.create("webhook", "hook", {"url": url, **options})
    assert isinstance(adapter, WebhookAdapter)
    return adapter


async def test_webhook_2xx_acks_and_posts_the_record(http_server: HttpReceiver) -> None:
    batch = [outgoing(1, key="k1", headers={"trace": "t1"}), outgoing(2, {"deep": {"x": None}}, headers={"h": "2"})]
    async with connected(webhook(http_server.url + "/events")) as adapter:
        results = await adapter.publish(batch)
    assert outcomes(results) == [Outcome.ACKED] * 2
    by_id = {r.headers["message-id"]: r for r in http_server.requests}
    assert set(by_id) == {str(out.message_id) for out in batch}
    for out in batch:
        request = by_id[str(out.message_id)]
        assert request.path == "/events"
        assert request.headers["content-type"] == "application/json"
        assert request.json == as_dict(out)
        assert request.json["message_id"] == request.headers["message-id"]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_webhook_any_2xx_acks(http_server: HttpReceiver, status: int) -> None:
    async with connected(webhook(f"{http_server.url}/status/{status}")) as adapter:
        assert outcomes(await adapter.publish([outgoing(1)])) == [Outcome.ACKED]


@pytest.mark.parametrize("status", [400, 409, 413, 422])
async def test_webhook_4xx_about_the_message_is_permanent_with_status(http_server: HttpReceiver, status: int) -> None:
    async with connected(webhook(f"{http_server.url}/status/{status}")) as adapter:
        [result] = await adapter.publish([outgoing(1)])
    assert result.outcome is Outcome.PERMANENT
    assert result.reason is not None and result.reason.startswith(f"HTTP {status}")


@pytest.mark.parametrize("status", [401, 403, 404, 407, 410])
async def test_webhook_4xx_about_the_relay_waits(http_server: HttpReceiver, status: int) -> None:
    # A rotated token or a moved endpoint: not this message's fault (test_webhook_refusals.py).
    async with connected(webhook(f"{http_server.url}/status/{status}")) as adapter:
        [result] = await adapter.publish([outgoing(1)])
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.reason is not None and result.reason.startswith(f"HTTP {status}")


@pytest.mark.parametrize("status", [429, 503])
async def test_webhook_later_waits(http_server: HttpReceiver, status: int) -> None:
    async with connected(webhook(f"{http_server.url}/status/{status}")) as adapter:
        [result] = await adapter.publish([outgoing(1)])
    assert result.outcome is Outcome.UNAVAILABLE
    assert result.reason is not None and result.reason.startswith(f"HTTP {status}")


@pytest.mark.parametrize("status", [408, 425, 500, 502, 504])
async def test_webhook_retry_later_and_5xx_are_transient(http_server: HttpReceiver, status: int) -> None:
    async with connected(webhook(f"{http_server.url}/status/{status}")) as adapter:
        [result] = await adapter.publish([outgoing(1)])
    assert result.outcome is Outcome.TRANSIENT
    assert result.reason is not None and result.reason.startswith(f"HTTP {status}")


async def test_webhook_results_follow_batch_order(http_server: HttpReceiver) -> None:
    http_server.respond = lambda request: (request.json["payload"]["status"], 0.0)
    statuses = [200, 502, 404, 200, 429, 201, 422]
    batch = [outgoing(i, {"status": s}) for i, s in enumerate(statuses)]
    async with connected(webhook(http_server.url)) as adapter:
        results = await adapter.publish(batch)
    assert outcomes(results) == [
        Outcome.ACKED,
        Outcome.TRANSIENT,
        Outcome.UNAVAILABLE,
        Outcome.ACKED,
        Outcome.UNAVAILABLE,
        Outcome.ACKED,
        Outcome.PERMANENT,
    ]


async def test_webhook_timeout_is_transient(http_server: HttpReceiver) -> None:
    started = time.monotonic()
    async with connected(webhook(f"{http_server.url}/sleep/1.5", timeout="200ms")) as adapter:
        [result] = await adapter.publish([outgoing(1)])
    assert time.monotonic() - started < 1.2
    assert result.outcome is Outcome.TRANSIENT
    assert result.reason == "timed out after 0.2s"


async def test_webhook_connection_refused_is_unavailable() -> None:
    url = f"http://127.0.0.1:{closed_port()}/events"
    async with connected(webhook(url, timeout="2s")) as adapter:
        results = await adapter.publish([outgoing(1), outgoing(2)])
        assert await adapter.ready() is False
    assert outcomes(results) == [Outcome.UNAVAILABLE] * 2
    assert all(r.reason is not None and r.reason.startswith("cannot connect") for r in results)


async def test_webhook_ready(http_server: HttpReceiver) -> None:
    adapter = webhook(http_server.url)
    assert await adapter.ready() is False
    assert outcomes(await adapter.publish([outgoing(1)])) == [Outcome.UNAVAILABLE]
    async with connected(adapter):
        assert await adapter.ready() is True
    assert await adapter.ready() is False


async def test_webhook_sends_static_headers(http_server: HttpReceiver) -> None:
    options = {"headers": {"Authorization": "Bearer abc", "X-Env": "test"}}
    out = outgoing(1)
    async with connected(webhook(http_server.url, **options)) as adapter:
        assert outcomes(await adapter.publish([out])) == [Outcome.ACKED]
    [request] = http_server.requests
    assert request.headers["authorization"] == "Bearer abc"
    assert request.headers["x-env"] == "test"
    assert request.values("message-id") == [str(out.message_id)]
    assert request.values("content-type") == ["application/json"]


@pytest.mark.parametrize("name", ["message-id", "Message-Id", "Content-Type"])
def test_webhook_refuses_static_headers_the_relay_sets(http_server: HttpReceiver, name: str) -> None:
    # A configured header must never forge or duplicate the message id receivers dedupe on.
    with pytest.raises(AdapterOptionsError, match="set by the relay"):
        webhook(http_server.url, headers={name: "forged"})


async def test_webhook_publishes_concurrently(http_server: HttpReceiver) -> None:
    http_server.respond = lambda request: (200, 0.1)
    batch = [outgoing(i) for i in range(50)]
    started = time.monotonic()
    async with connected(webhook(http_server.url)) as adapter:
        results = await adapter.publish(batch)
    elapsed = time.monotonic() - started
    assert outcomes(results) == [Outcome.ACKED] * 50, {r.reason for r in results}
    assert len(http_server.requests) == 50
    assert http_server.max_active > 1, "requests never overlapped"
    assert elapsed < 2.5, f"50 x 0.1s took {elapsed:.2f}s: not concurrent"


async def test_webhook_respects_max_concurrency(http_server: HttpReceiver) -> None:
    http_server.respond = lambda request: (200, 0.05)
    async with connected(webhook(http_server.url, max_concurrency=4)) as adapter:
        results = await adapter.publish([outgoing(i) for i in range(20)])
    assert outcomes(results) == [Outcome.ACKED] * 20
    assert 1 < http_server.max_active <= 4


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/hook", "", "file:///tmp/x"])
def test_webhook_url_must_be_http(url: str) -> None:
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("webhook", "hook", {"url": url})
    assert info.value.path == "url"
    assert "must be an http:// or https:// URL" in info.value.reason


@pytest.mark.parametrize("url", ["http://localhost:8080/x", "https://example.com/hook"])
def test_webhook_accepts_http_and_https(url: str) -> None:
    assert isinstance(registry.create("webhook", "hook", {"url": url}), WebhookAdapter)


@pytest.mark.parametrize(
    ("option", "suggestion"),
    [("timout", "timeout"), ("header", "headers"), ("max_concurency", "max_concurrency")],
)
def test_webhook_unknown_option_did_you_mean(option: str, suggestion: str) -> None:
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("webhook", "hook", {"url": "http://x", option: 1})
    assert info.value.path == option
    assert info.value.reason == f"unknown option {option!r} (did you mean {suggestion!r}?)"


def test_webhook_option_types() -> None:
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("webhook", "hook", {"url": "http://x", "timeout": 10})
    assert info.value.path == "timeout"
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("webhook", "hook", {"url": "http://x", "headers": {"a": 1}})
    assert info.value.path == "headers.a"
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("webhook", "hook", {"url": "http://x", "max_concurrency": 0})
    assert info.value.path == "max_concurrency"


def test_file_options() -> None:
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("file", "f", {})
    assert (info.value.path, info.value.reason) == ("path", "required option is missing")
    with pytest.raises(AdapterOptionsError) as info:
        registry.create("file", "f", {"path": "x", "fsink": True})
    assert info.value.reason == "unknown option 'fsink' (did you mean 'fsync'?)"


def test_publish_result_helpers() -> None:
    assert PublishResult.acked().outcome is Outcome.ACKED
    assert PublishResult.transient("x") == PublishResult(Outcome.TRANSIENT, "x")
