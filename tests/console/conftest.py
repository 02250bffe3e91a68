"""The console against a real PostgreSQL: its app served by uvicorn in a thread and
asked over HTTP (httpx) for the pages, and `outbox-relay console` in a browser
(test_console_browser.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
import yaml

from outbox_relay.config import parse
from outbox_relay.console.app import Console
from outbox_relay.console.auth import Authenticator
from tests.support.configs import config_tree

TOKEN = "console-test-token-0123456789"

MakeClient = Callable[..., httpx.Client]


def console_config(dsn: str, *, console: dict[str, Any] | None = None, **relay: Any) -> Any:
    tree = config_tree(dsn, **relay)
    tree["console"] = dict(console or {})
    return parse(yaml.safe_dump(tree), source="relay.yaml", env={})


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port, in a thread; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def make_client(db: str) -> Iterator[MakeClient]:
    """An HTTP client of a console on `db`: `token` (None: read-only), `console` settings,
    relay settings as keywords."""
    with contextlib.ExitStack() as stack:

        def make(*, token: str | None = TOKEN, console: dict[str, Any] | None = None, **relay: Any) -> httpx.Client:
            config = console_config(db, console=console, **relay)
            app = Console(config, auth=Authenticator(token, config.console.trusted_user_header))
            app.open()
            stack.callback(app.close)
            base = stack.enter_context(served(app.asgi))
            return stack.enter_context(httpx.Client(base_url=base, follow_redirects=True, timeout=30))

        yield make


def enqueue(
    dsn: str, rows: list[tuple[str, str | None, dict[str, Any]]], *, headers: dict[str, str] | None = None
) -> list[str]:
    """Enqueue (topic, key, payload) rows in one transaction; their message ids."""
    ids = []
    with psycopg.connect(dsn) as conn:
        for topic, key, payload in rows:
            row = conn.execute(
                "SELECT outbox.enqueue(%s, %s, %s::jsonb, %s::jsonb)",
                (topic, key, psycopg.types.json.Jsonb(payload), psycopg.types.json.Jsonb(headers or {})),
            ).fetchone()
            assert row is not None
            ids.append(str(row[0]))
    return ids


def dead_letter(dsn: str, message_ids: list[str], reason: str) -> None:
    """Put messages in the state the relay leaves a dead letter in (the browser test
    makes real ones through a relay)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE outbox.messages SET dead_lettered_at = clock_timestamp(), dead_letter_reason = %s, attempts = 3"
            " WHERE message_id = ANY(%s)",
            (reason, message_ids),
        )
