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
        wait_for(lambda: relay_row(db)[1] == "table", 30, "the relay's source known")
        version, _, brokers = relay_row(db)
        assert version and brokers == {"out": {"connected": True, "circuit_open": False}}
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
        assert done.status_code == 303 and done.headers["location"] == "/console/dead-letters"
        assert done.cookies.get("outbox_console_done") == '"1 requeued by token"' or "1 requeued by token" in str(
            done.cookies.get("outbox_console_done")
        )
        actions = [line for line in relay.logs() if line.get("event") == "console_action"]
        assert [(a["action"], a["user"], a["via"], a["done"]) for a in actions] == [("requeue", "token", "bearer", 1)]
        wait_for(lambda: dead_lettered_after(db, before), 30, "the requeued message tried again and dead-lettered")
    finally:
        relay.close()


def relay_row(dsn: str) -> tuple[str, str, dict[str, object]]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT version, source, brokers FROM outbox.relays").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def samples(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(published), 0) FROM outbox.relay_samples").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_the_heartbeat_samples_what_the_relay_published(db: str, tmp_path: Path) -> None:
    relay, _ = relay_with(db, tmp_path, None)
    try:
        enqueue(db, [("t", f"k{i % 3}", {"n": i}) for i in range(25)])
        # Every published message is counted once, in some heartbeat's sample.
        wait_for(lambda: samples(db)[1] == 25, 30, "25 published in the samples")
        count, _ = samples(db)
        assert count >= 1
    finally:
        relay.close()


def test_a_relay_role_without_the_samples_grant_warns_once_and_samples_once_granted(db: str, tmp_path: Path) -> None:
    from psycopg import sql

    from tests.support.databases import role_with_grants

    with role_with_grants(db, "relay", "old_relay") as dsn:
        role = psycopg.conninfo.conninfo_to_dict(dsn)["user"]
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("REVOKE INSERT ON outbox.relay_samples FROM {}").format(sql.Identifier(str(role))))
        relay, _ = relay_with(dsn, tmp_path, None)
        try:
            enqueue(db, [("t", None, {"n": i}) for i in range(5)])
            wait_for(lambda: len((tmp_path / "out.jsonl").read_text().splitlines()) == 5, 30, "published anyway")
            # Several heartbeats later (the relays row is written each one), still one warning.
            wait_for(lambda: heartbeat_span_s(db) >= 10, 30, "three heartbeats (one each 5 s)")
            warned = [line for line in relay.logs() if line.get("event") == "relay_samples_not_granted"]
            assert len(warned) == 1 and "--relay-role" in warned[0]["hint"]
            assert samples(db) == (0, 0)
            # Granted again: the relay samples from its next heartbeat on, no restart,
            # and its first sample counts what it published while refused.
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(sql.SQL("GRANT INSERT ON outbox.relay_samples TO {}").format(sql.Identifier(str(role))))
            wait_for(lambda: samples(db)[1] == 5, 30, "a sample once granted")
            assert any(line.get("event") == "relay_samples_granted" for line in relay.logs())
        finally:
            relay.close()


def heartbeat_span_s(dsn: str) -> float:
    """Seconds from the relay's first heartbeat to its latest."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT extract(epoch FROM heartbeat_at - started_at) FROM outbox.relays").fetchone()
    return 0.0 if row is None else float(row[0])


def raw_request(base: str, request: bytes) -> bytes:
    """One request as bytes on the health port, and its whole answer (Connection: close)."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_relay_port_answers_odd_console_requests_and_keeps_its_probes(db: str, tmp_path: Path) -> None:
    relay, base = relay_with(db, tmp_path, {"enabled": True})
    try:
        # A form whose CSRF field and cookie hold characters outside ASCII: refused, not a crash.
        body = b"csrf=%C3%A9&token=x"
        answer = raw_request(
            base,
            b"POST /console/sign-in HTTP/1.1\r\nHost: x\r\nCookie: outbox_console_csrf=\xc3\xa9; "
            b"outbox_console_session=x.\xe9\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
        )
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
        chunked = raw_request(
            base,
            b"POST /console/sign-in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        assert chunked.startswith(b"HTTP/1.1 501 "), chunked[:200]
        too_large = raw_request(base, b"POST /console/sign-in HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
        assert too_large.startswith(b"HTTP/1.1 413 "), too_large[:200]
        encoded = raw_request(base, b"GET /console/%64ead-letters HTTP/1.1\r\nHost: x\r\n\r\n")
        assert encoded.startswith(b"HTTP/1.1 200 ") and b"<h1>Dead letters</h1>" in encoded
        assert httpx.get(f"{base}/livez").status_code == 200
        assert not [line for line in relay.logs() if line.get("event") == "console_request_failed"]
    finally:
        relay.close()


def test_without_console_enabled_the_port_serves_no_console(db: str, tmp_path: Path) -> None:
    relay, base = relay_with(db, tmp_path, None)
    try:
        assert httpx.get(f"{base}/livez").status_code == 200
        assert httpx.get(f"{base}/console/").status_code == 404
    finally:
        relay.close()
