"""The console in a real browser (Playwright driving Debian's chromium), against a real
PostgreSQL, a running `outbox-relay run` publishing to a real HTTP receiver, and
`outbox-relay console` in its own process: what an operator does in an incident.

Screenshots of the pages go to the test's directory, and to docs/console/ (the
pictures of docs/how-to/console.md) when OUTBOX_RELAY_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.console.conftest import TOKEN, enqueue
from tests.support.cli import RelayProcess, exe
from tests.support.configs import config_tree
from tests.support.http import HttpReceiver, Request
from tests.support.waiting import wait_for

DOCS = Path(__file__).resolve().parents[2] / "docs" / "console"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (scripts/test installs Debian's package)"
    with sync_playwright() as playwright:
        # As root, chromium's sandbox needs user namespaces that a CI runner may not give.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=chromium, args=args)
        yield launched
        launched.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ConsoleProcess:
    """`outbox-relay console` in the background."""

    def __init__(self, config: Path, *, token: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/console"
        env = {k: v for k, v in os.environ.items() if k != "OUTBOX_RELAY_CONSOLE_TOKEN"}
        if token:
            env["OUTBOX_RELAY_CONSOLE_TOKEN"] = token
        self.log_path = config.with_suffix(".console.log")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [*exe(), "console", "--config", str(config), "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"console exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, "the console answered")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


class Hook:
    """The webhook's receiver: refuses (422, a permanent failure: dead-lettered) every
    message whose payload says `poison` while `refusing`, and answers nothing while
    `open` is clear (so a backlog stays until the test lets it drain)."""

    def __init__(self) -> None:
        self.refusing = True
        self.open = threading.Event()
        self.open.set()
        self.receiver = HttpReceiver(self.respond)

    def respond(self, request: Request) -> tuple[int, float]:
        self.open.wait(60)
        payload = request.json.get("payload") or {}
        if self.refusing and isinstance(payload, dict) and payload.get("poison"):
            return 422, 0.0
        return 200, 0.0

    def delivered(self, marker: str) -> bool:
        return any(marker.encode() in r.body for r in self.receiver.accepted())


@pytest.fixture
def incident(db: str, tmp_path: Path) -> Iterator[tuple[Hook, ConsoleProcess, Path]]:
    hook = Hook()
    tree: dict[str, Any] = config_tree(
        db, brokers={"hook": {"type": "webhook", "url": f"{hook.receiver.url}/"}}, dead_letter_policy="hold"
    )
    # The held backlog waits inside one publish (the receiver answers nothing while the
    # test holds it): not long enough to time out and count as a failed attempt.
    tree["relay"]["publish_timeout"] = "60s"
    tree["console"] = {"show_payloads": True}
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(tree))
    relay = RelayProcess(config)
    relay.wait_started()
    console = ConsoleProcess(config, token=TOKEN)
    try:
        yield hook, console, tmp_path
    finally:
        console.close()
        relay.close()
        hook.receiver.close()


def shoot(page: Page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("OUTBOX_RELAY_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / f"{name}.png", DOCS / f"{name}.png")


def assert_accessible(page: Page) -> None:
    """axe-core's rules (WCAG 2 A and AA among them) find nothing on the page."""
    results = Axe().run(page)
    assert results.violations_count == 0, f"{page.url}: {results.generate_report()}"


def dead_letter_ids(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT message_id::text FROM outbox.messages WHERE dead_lettered_at IS NOT NULL"
        ).fetchall()
    return [r[0] for r in rows]


def test_an_operator_finds_inspects_and_requeues_a_dead_letter(
    db: str, browser: Browser, incident: tuple[Hook, ConsoleProcess, Path]
) -> None:
    hook, console, tmp_path = incident
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    # Live numbers: a backlog drains while the page is open, and the page follows it
    # without a reload (its script swaps in the live part).
    page.goto(f"{console.url}/")
    expect(page.locator("#pending")).to_have_text("0")
    hook.open.clear()
    enqueue(db, [("orders", f"order-{i % 10}", {"n": i}) for i in range(300)])
    expect(page.locator("#pending")).to_have_text("300", timeout=20_000)
    expect(page.locator("#topics")).to_contain_text("10 keys, the longest 30")
    shoot(page, "overview", tmp_path)
    hook.open.set()
    expect(page.locator("#pending")).to_have_text("0", timeout=60_000)

    # A poison message is dead-lettered; the operator finds it by the reason's words.
    poisoned = enqueue(db, [("orders", "order-7", {"poison": True, "marker": "poison-1"})])
    wait_for(lambda: dead_letter_ids(db) == poisoned, 30, "the poison message dead-lettered")
    page.get_by_role("link", name="Dead letters").click()
    page.get_by_label("Reason contains").fill("422")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#showing")).to_contain_text("Showing 1 of 1")
    shoot(page, "dead-letters", tmp_path)
    page.get_by_role("link", name=poisoned[0]).click()
    expect(page.locator("#reason")).to_contain_text("422")
    expect(page.locator("#payload")).to_contain_text("an operator may show it")
    expect(page.locator("#payload")).not_to_contain_text("poison-1")
    detail_url = page.url

    # Read-only until signed in: no action buttons, and a forged post is refused.
    expect(page.get_by_role("button", name="Requeue…")).to_have_count(0)
    refused = page.request.post(f"{console.url}/dead-letters/requeue", form={"id": poisoned[0], "confirmed": "yes"})
    assert refused.status == 403 and "read-only" in refused.text()
    assert dead_letter_ids(db) == poisoned

    # Sign in with the keyboard alone.
    page.goto(f"{console.url}/sign-in")
    page.get_by_label("Your name").focus()
    page.keyboard.type("ada")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Token")).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#identity")).to_have_text("Operator: ada (token)")

    # An operator may show the payload (console.show_payloads), and it is logged.
    page.goto(detail_url)
    page.get_by_role("link", name="Show the payload").click()
    expect(page.locator("#payload")).to_contain_text("poison-1")
    shoot(page, "dead-letter", tmp_path)
    assert_accessible(page)
    wait_for(lambda: "console_payload_shown" in console.log_path.read_text(), 10, "the payload's showing logged")

    # Requeue it once the receiver is fixed: it is delivered.
    page.goto(f"{console.url}/dead-letters?key=order-7")
    page.get_by_role("link", name=poisoned[0]).click()
    page.get_by_role("button", name="Requeue…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Requeue 1 dead letter?")
    shoot(page, "confirm", tmp_path)
    assert_accessible(page)
    hook.refusing = False
    page.locator("#confirm").click()
    expect(page.locator("#done")).to_have_text("1 requeued by ada (token)")
    wait_for(lambda: hook.delivered("poison-1"), 30, "the requeued message delivered")
    assert dead_letter_ids(db) == []

    # Message lookup: where it landed.
    page.get_by_role("link", name="Message lookup").click()
    page.get_by_label("Message id").fill(poisoned[0])
    page.keyboard.press("Enter")
    expect(page.locator(".state").first).to_have_text("dispatched")
    # The rows read again with the pending ones, put in place by the page's script.
    expect(page.locator("#searching")).to_have_count(0)
    expect(page.locator("#message-rows .state")).to_have_text(["dispatched"])
    shoot(page, "message", tmp_path)


def test_a_purge_asks_first_and_cancel_keeps_the_dead_letter(
    db: str, browser: Browser, incident: tuple[Hook, ConsoleProcess, Path]
) -> None:
    _, console, _ = incident
    poisoned = enqueue(db, [("payments", "p-1", {"poison": True}), ("payments", "p-2", {"poison": True})])
    wait_for(lambda: sorted(dead_letter_ids(db)) == sorted(poisoned), 30, "both dead-lettered")
    page = browser.new_page()
    page.goto(f"{console.url}/sign-in")
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#identity")).to_have_text("Operator: token")
    page.goto(f"{console.url}/dead-letters")
    page.get_by_label(f"Select {poisoned[0]}").check()
    page.get_by_role("button", name="Purge selected…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Purge 1 dead letter?")
    expect(page.locator("#confirm-text")).to_contain_text("deleted for good")
    assert sorted(dead_letter_ids(db)) == sorted(poisoned)  # asking deleted nothing
    page.locator("#cancel").click()
    expect(page.locator("#showing")).to_contain_text("Showing 2 of 2")
    page.get_by_label("Select every dead letter on this page").check()
    page.get_by_role("button", name="Purge selected…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Purge 2 dead letters?")
    page.locator("#confirm").click()
    expect(page.locator("#done")).to_have_text("2 purged by token")
    assert dead_letter_ids(db) == []


def test_pages_pass_axe_and_keyboard_navigation(
    db: str, browser: Browser, incident: tuple[Hook, ConsoleProcess, Path]
) -> None:
    _, console, _ = incident
    poisoned = enqueue(db, [("orders", "order-1", {"poison": True})])
    wait_for(lambda: dead_letter_ids(db) == poisoned, 30, "dead-lettered")
    page = browser.new_page()
    page.goto(f"{console.url}/")
    # The first Tab reaches the skip link, and following it lands in the main content.
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    for path in ("/", "/dead-letters", "/jobs", "/messages", f"/messages?id={poisoned[0]}", "/sign-in", "/nowhere"):
        page.goto(f"{console.url}{path}")
        assert_accessible(page)
    page.goto(f"{console.url}/dead-letters")
    page.get_by_role("link", name=poisoned[0]).click()
    assert_accessible(page)
    # No request of the pages left the console (no CDN, nothing from elsewhere).
    outside: list[str] = []
    page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(console.url) else None)
    page.goto(f"{console.url}/")
    page.wait_for_load_state("networkidle")
    assert outside == []
