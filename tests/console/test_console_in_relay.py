"""The console served by `outbox-relay run` on its health port under /console
(`console.enabled`), and nowhere when it is off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from tests.console.conftest import TOKEN, enqueue
from tests.support.cli import RelayProcess
from tests.support.configs import config_tree
from tests.support.waiting import wait_for


def dead_letters(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT message_id::text FROM outbox.messages WHERE dead_lettered_at IS NOT NULL")
        return [r[0] for r in rows.fetchall()]


def dead_lettered_after(dsn: str, instant: object) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at > %s", (instant,)).fetchone()
    return bool(row and row[0])


def now(dsn: str) -> object:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]


def relay_with(db: str, tmp_path: Path, console: dict[str, Any] | None) -> tuple[RelayProcess, str]:
    tree = config_tree(
        db, brokers={"out": {"type": "file", "path": str(tmp_path / "out.jsonl")}}, max_payload_bytes=1000
    )
    if console is not None:
        tree["console"] = console
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(tree))
    relay = RelayProcess(config, env={"OUTBOX_RELAY_CONSOLE_TOKEN": TOKEN})
    relay.wait_started()
    port = next(line["port"] for line in relay.logs() if line.get("event") == "http_listening")
    return relay, f"http://127.0.0.1:{port}"


def test_the_relay_serves_the_console_beside_its_probes(db: str, tmp_path: Path) -> None:
    relay, base = relay_with(db, tmp_path, {"enabled": True})
    try:
        assert httpx.get(f"{base}/livez").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 200
        page = httpx.get(f"{base}/console/")
        assert page.status_code == 200 and "<h1>Overview</h1>" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        # The relay's own heartbeat row, with its version and broker, shows within a beat.
        wait_for(lambda: "out: connected" in httpx.get(f"{base}/console/").text, 30, "the relay's row")
        assert httpx.get(f"{base}/console/static/console.css").headers["content-type"].startswith("text/css")
        # An action through the relay's port, as a script would: a bearer token. The
        # message is over relay.max_payload_bytes, so this relay dead-letters it again
        # after the requeue: the action is logged by the relay with who did it.
        ids = enqueue(db, [("t", "k", {"big": "x" * 2000})])
        wait_for(lambda: dead_letters(db) == ids, 30, "the large message dead-lettered")
        refused = httpx.post(f"{base}/console/dead-letters/requeue", data={"id": ids, "confirmed": "yes"})
        assert refused.status_code == 403 and dead_letters(db) == ids
        before = now(db)
        done = httpx.post(
            f"{base}/console/dead-letters/requeue",
            data={"id": ids, "confirmed": "yes"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert done.status_code == 303 and done.headers["location"].startswith("/console/dead-letters?done=1+requeued")
        actions = [line for line in relay.logs() if line.get("event") == "console_action"]
        assert [(a["action"], a["user"], a["via"], a["done"]) for a in actions] == [("requeue", "token", "bearer", 1)]
        wait_for(lambda: dead_lettered_after(db, before), 30, "the requeued message tried again and dead-lettered")
    finally:
        relay.close()


def test_without_console_enabled_the_port_serves_no_console(db: str, tmp_path: Path) -> None:
    relay, base = relay_with(db, tmp_path, None)
    try:
        assert httpx.get(f"{base}/livez").status_code == 200
        assert httpx.get(f"{base}/console/").status_code == 404
    finally:
        relay.close()
