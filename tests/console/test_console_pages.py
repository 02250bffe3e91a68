"""The console's pages and actions against a real PostgreSQL (in process)."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import psycopg
import pytest
from psycopg import sql

from outbox_relay.console.auth import CSRF_COOKIE
from tests.console.conftest import TOKEN, MakeClient, dead_letter, enqueue


def csrf_of(client: httpx.Client, path: str = "/console/dead-letters") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, "the page carries no CSRF field"
    assert client.cookies.get(CSRF_COOKIE) == match.group(1)
    return match.group(1)


def test_overview_counts_by_topic_and_key_shape(db: str, make_client: MakeClient) -> None:
    enqueue(db, [("orders", "order-1", {"n": i}) for i in range(5)])  # one hot key
    enqueue(db, [("payments", f"p-{i}", {"n": i}) for i in range(4)])  # a key per message
    enqueue(db, [("audit", None, {"n": i}) for i in range(3)])  # keyless
    dead = enqueue(db, [("orders", "order-2", {"n": 0})])
    dead_letter(db, dead, "permanent: too large")
    page = make_client().get("/console/")
    assert page.status_code == 200
    text = page.text
    assert re.search(r'id="pending">12<', text), text
    assert re.search(r'id="dead-lettered"><a [^>]*>1<', text)
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r'<th scope="row">([a-z]+)</th>\s*<td class="n">[\d,]+</td>\s*<td>([^<]*)</td>', text)
    }
    assert rows == {"audit": "keyless", "orders": "one key", "payments": "a key per message (4)"}, rows


def test_overview_shows_relays_with_version_and_the_samples_chart(db: str, make_client: MakeClient) -> None:
    relay_id = uuid.uuid4()
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.relays (relay_id, hostname, pid, version, source)"
            " VALUES (%s, 'pod-a', 7, '9.9.9', 'table')",
            (relay_id,),
        )
        for minutes_ago, published in ((3, 120), (2, 60)):
            conn.execute(
                "INSERT INTO outbox.relay_samples"
                " (relay_id, sampled_at, published, failed, dead_lettered, oldest_pending_age_s)"
                " VALUES (%s, now() - make_interval(mins => %s), %s, 2, 0, 4.5)",
                (relay_id, minutes_ago, published),
            )
    text = make_client().get("/console/").text
    assert "pod-a (pid 7)" in text and "9.9.9" in text
    assert "Last hour: 180 published, 4 failed" in text
    assert text.count('class="published"') == 2 and text.count('class="failed"') == 2
    assert "the lag was at most 4.5 s" in text


def test_dead_letters_filter_by_topic_key_reason_and_time(db: str, make_client: MakeClient) -> None:
    a = enqueue(db, [("orders.eu", "k1", {"n": 1}), ("orders.us", "k2", {"n": 2})])
    b = enqueue(db, [("payments", None, {"n": 3})])
    dead_letter(db, a, "permanent: schema rejected 100%")
    dead_letter(db, b, "attempts exhausted: timeout")
    client = make_client()

    def listed(**params: str) -> set[str]:
        page = client.get("/console/dead-letters", params=params)
        assert page.status_code == 200, page.text
        return set(re.findall(r'name="id" value="([0-9a-f-]{36})"', page.text))

    assert listed() == set(a + b)
    assert listed(topic="orders.*") == set(a)
    assert listed(key="k2") == {a[1]}
    assert listed(reason="100%") == set(a)  # the % is literal, not a wildcard
    assert listed(reason="TIMEOUT") == set(b)
    assert listed(since="2000-01-01T00:00", until="2001-01-01T00:00") == set()
    assert "Showing 2 of 2" in client.get("/console/dead-letters", params={"topic": "orders.*"}).text
    bad = client.get("/console/dead-letters", params={"since": "yesterday"})
    assert bad.status_code == 400 and "since must be a date and time" in bad.text


def test_the_dead_letter_count_stops_past_its_cap(db: str, make_client: MakeClient) -> None:
    from outbox_relay.console.read_model import COUNT_CAP

    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, dead_lettered_at, dead_letter_reason)"
            " SELECT CASE WHEN g = 1 THEN 'rare' ELSE 'common' END, NULL, '\\x00', now(), 'permanent'"
            " FROM generate_series(1, %s) AS g",
            (COUNT_CAP + 1,),
        )
    client = make_client()
    # One past the cap: "more than"; exactly the cap, and under it: the count itself.
    assert f"Showing 50 of more than {COUNT_CAP:,}" in client.get("/console/dead-letters").text
    common = client.get("/console/dead-letters", params={"topic": "common"}).text
    assert f"Showing 50 of {COUNT_CAP:,}" in common and "more than" not in common
    assert "Showing 1 of 1" in client.get("/console/dead-letters", params={"topic": "rare"}).text


def test_dead_letters_page_through_with_a_keyset(db: str, make_client: MakeClient) -> None:
    ids = enqueue(db, [("t", None, {"n": i}) for i in range(7)])
    dead_letter(db, ids, "permanent")
    client = make_client(console={"page_size": 3})
    seen: list[str] = []
    url: str | None = "/console/dead-letters"
    while url:
        page = client.get(url)
        seen += re.findall(r'name="id" value="([0-9a-f-]{36})"', page.text)
        found = re.search(r'<a href="([^"]+)" id="next-page">', page.text)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert seen == list(reversed(ids))  # newest first, each once


def test_dead_letter_payload_is_redacted_unless_allowed(db: str, make_client: MakeClient) -> None:
    ids = enqueue(
        db, [("t", "k", {"card": "4111-secret"})], headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    )
    dead_letter(db, ids, "permanent")
    with psycopg.connect(db) as conn:
        row_id = conn.execute("SELECT id FROM outbox.messages WHERE message_id = %s", (ids[0],)).fetchone()[0]  # type: ignore[index]
    closed = make_client()
    page = closed.get(f"/console/dead-letters/{row_id}")
    assert page.status_code == 200 and "Redacted (console.show_payloads is off)" in page.text
    assert "4111-secret" not in closed.get(f"/console/dead-letters/{row_id}?payload=show").text
    opened = make_client(console={"show_payloads": True})
    operator = {"Authorization": f"Bearer {TOKEN}"}
    assert "4111-secret" not in opened.get(f"/console/dead-letters/{row_id}", headers=operator).text  # until asked
    anonymous = opened.get(f"/console/dead-letters/{row_id}?payload=show")
    assert "4111-secret" not in anonymous.text and "an operator may show it" in anonymous.text
    assert "4111-secret" in opened.get(f"/console/dead-letters/{row_id}?payload=show", headers=operator).text
    assert closed.get("/console/dead-letters/999999").status_code == 404


def test_actions_without_an_operator_are_refused_and_touch_nothing(db: str, make_client: MakeClient) -> None:
    ids = enqueue(db, [("t", None, {"n": 1})])
    dead_letter(db, ids, "permanent")
    client = make_client(token=None)
    csrf = csrf_of(client)
    for path in ("/console/dead-letters/confirm", "/console/dead-letters/requeue", "/console/dead-letters/purge"):
        refused = client.post(path, data={"csrf": csrf, "id": ids, "action": "purge", "confirmed": "yes"})
        assert refused.status_code == 403 and "read-only" in refused.text, path
    wrong = make_client().post(
        "/console/dead-letters/purge",
        data={"id": ids, "confirmed": "yes"},
        headers={"Authorization": "Bearer not-the-token-at-all"},
    )
    assert wrong.status_code == 403
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone() == (
            1,
        )


def test_a_form_without_the_csrf_token_is_refused(db: str, make_client: MakeClient) -> None:
    ids = enqueue(db, [("t", None, {"n": 1})])
    dead_letter(db, ids, "permanent")
    client = make_client()
    csrf = csrf_of(client, "/console/sign-in")
    assert client.post("/console/sign-in", data={"csrf": csrf, "token": TOKEN}).status_code in (200, 303)
    forged = client.post("/console/dead-letters/purge", data={"id": ids, "confirmed": "yes", "csrf": "forged"})
    assert forged.status_code == 403 and "another site" in forged.text
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (1,)


def test_sign_in_confirm_and_requeue_with_the_held_count(db: str, make_client: MakeClient) -> None:
    first = enqueue(db, [("orders", "k", {"n": 0})])
    held = enqueue(db, [("orders", "k", {"n": i}) for i in (1, 2)])
    dead_letter(db, first, "permanent")
    client = make_client(dead_letter_policy="hold")
    csrf = csrf_of(client, "/console/sign-in")
    refused = client.post("/console/sign-in", data={"csrf": csrf, "token": "wrong-token-wrong-token"})
    assert refused.status_code == 403 and "wrong token" in refused.text
    signed = client.post("/console/sign-in", data={"csrf": csrf, "token": TOKEN, "name": "ada"}, follow_redirects=False)
    assert signed.status_code == 303
    assert "Operator: ada (token)" in client.get("/console/").text
    csrf = csrf_of(client)  # signing in gave the session a new CSRF token
    confirm = client.post("/console/dead-letters/confirm", data={"csrf": csrf, "id": first, "action": "requeue"})
    assert confirm.status_code == 200
    assert "Requeue 1 dead letter?" in confirm.text and re.search(r"2 pending messages\s+wait", confirm.text), (
        confirm.text
    )
    unconfirmed = client.post("/console/dead-letters/requeue", data={"csrf": csrf, "id": first})
    assert unconfirmed.status_code == 400
    done = client.post("/console/dead-letters/requeue", data={"csrf": csrf, "id": first, "confirmed": "yes"})
    assert done.status_code == 200 and "1 requeued by ada (token)" in done.text
    with psycopg.connect(db) as conn:
        states = conn.execute(
            "SELECT message_id::text, dead_lettered_at IS NULL, attempts FROM outbox.messages ORDER BY id"
        ).fetchall()
    assert states == [(first[0], True, 0), (held[0], True, 0), (held[1], True, 0)]


def test_purge_with_a_bearer_token_deletes_only_the_selected(db: str, make_client: MakeClient) -> None:
    ids = enqueue(db, [("t", None, {"n": i}) for i in range(3)])
    dead_letter(db, ids, "permanent")
    client = make_client()
    done = client.post(
        "/console/dead-letters/purge",
        data={"id": ids[:2], "confirmed": "yes"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert done.status_code == 200 and "2 purged by token" in done.text
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT message_id::text FROM outbox.messages").fetchall() == [(ids[2],)]


def test_a_trusted_proxy_header_names_the_operator(db: str, make_client: MakeClient) -> None:
    client = make_client(token=None, console={"trusted_user_header": "X-Forwarded-User"})
    assert "Read-only" in client.get("/console/").text
    assert "Operator: grace" in client.get("/console/", headers={"X-Forwarded-User": "grace"}).text


def test_message_lookup_shows_state_receipt_and_trace_id(db: str, make_client: MakeClient) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    ids = enqueue(db, [("t", "k", {"n": 1})], headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    with psycopg.connect(db) as conn:
        conn.execute('UPDATE outbox.messages SET dispatched_at = now(), receipt = \'{"broker": "main", "offset": 41}\'')
    client = make_client()
    page = client.get("/console/messages", params={"id": ids[0]})
    assert page.status_code == 200
    assert "dispatched" in page.text and "&#34;offset&#34;: 41" in page.text and trace in page.text
    missing = client.get("/console/messages", params={"id": str(uuid.uuid4())})
    assert 'id="not-found-settled"' in missing.text and 'id="searching"' in missing.text
    assert 'id="not-found"' in client.get("/console/messages/rows", params={"id": str(uuid.uuid4())}).text
    bad = client.get("/console/messages", params={"id": "not-a-uuid"})
    assert bad.status_code == 400 and "not a message id" in bad.text


def test_message_lookup_reads_pending_rows_apart(db: str, make_client: MakeClient) -> None:
    # The page answers with the rows a probe finds (dispatched, dead-lettered) and leaves
    # the pending ones, which may read the whole backlog, to a fragment its script asks:
    # every row of the id, read afresh.
    ids = enqueue(db, [("t", "k", {"n": 1}), ("t", None, {"n": 2})])
    with psycopg.connect(db) as conn:
        # A replay's copy of the first: the same id, dispatched, beside its pending row.
        conn.execute(
            "INSERT INTO outbox.messages (message_id, topic, key, payload, dispatched_at)"
            " SELECT message_id, topic, key, payload, now() FROM outbox.messages WHERE message_id = %s",
            (ids[0],),
        )
    client = make_client()
    page = client.get("/console/messages", params={"id": ids[0]}).text
    assert page.count('class="state"') == 1 and ">dispatched<" in page and 'id="searching"' in page
    assert f'data-fragment="/console/messages/rows?id={ids[0]}"' in page
    part = client.get("/console/messages/rows", params={"id": ids[0]})
    assert part.status_code == 200 and part.text.count('class="state"') == 2
    assert part.text.index(">pending<") < part.text.index(">dispatched<")  # enqueue order: the original first
    keyless = client.get("/console/messages/rows", params={"id": ids[1]}).text
    assert ">pending<" in keyless and "(none)" in keyless
    # A pending row the relay marks after the page answered is in the fragment as it is now.
    pending_only = client.get("/console/messages", params={"id": ids[1]}).text
    assert 'id="not-found-settled"' in pending_only
    with psycopg.connect(db) as conn:
        conn.execute("UPDATE outbox.messages SET dispatched_at = now() WHERE message_id = %s", (ids[1],))
    assert ">dispatched<" in client.get("/console/messages/rows", params={"id": ids[1]}).text
    # Without the script: the placeholder's link asks for everything in one page.
    whole = client.get("/console/messages", params={"id": ids[0], "pending": "include"}).text
    assert ">dispatched<" in whole and ">pending<" in whole and "data-fragment" not in whole
    assert client.get("/console/messages/rows", params={"id": "nope"}).status_code == 400


def test_a_lookup_finds_a_row_that_leaves_the_backlog_between_its_reads(db: str) -> None:
    # Pending rows are read first, then the rows that left the backlog: a row marked in
    # between is found by the second read (the other order would miss it in both).
    from outbox_relay.operations import message_lookup
    from outbox_relay.sqlfiles import Queries

    ids = enqueue(db, [("t", "k", {"n": 1})])
    marker = psycopg.connect(db, autocommit=True)
    pending_query = Queries("outbox")["message_by_id_pending"]

    class MarkAfterPending(psycopg.Connection):  # type: ignore[type-arg]
        """Commits the relay's mark of the row right after the lookup read it pending."""

        def execute(self, query, params=None, **kw):  # type: ignore[no-untyped-def]
            cur = super().execute(query, params, **kw)
            if isinstance(query, sql.Composed) and query.as_string(self) == pending_query.as_string(self):
                marker.execute("UPDATE outbox.messages SET dispatched_at = now() WHERE message_id = %s", (ids[0],))
            return cur

    try:
        with MarkAfterPending.connect(db) as conn:
            rows = message_lookup.lookup(conn, "outbox", uuid.UUID(ids[0]))
    finally:
        marker.close()
    assert [r.state for r in rows] == ["dispatched"]


def test_jobs_page_shows_replays_with_progress(db: str, make_client: MakeClient) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total)"
            " VALUES ('ops@host', '{\"topic\": \"orders\"}', 0, now(), 40)"
        )
        conn.execute("UPDATE outbox.replays SET copied = 10")
    text = make_client().get("/console/jobs").text
    assert "replay #1" in text and "10 of 40" in text and 'value="25"' in text
    assert "outbox-relay replay --resume 1" in text


def test_every_response_carries_the_security_headers(db: str, make_client: MakeClient) -> None:
    client = make_client()
    for path in ("/console/", "/console/dead-letters", "/console/static/console.css", "/console/nowhere"):
        response = client.get(path)
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert response.headers.get("x-content-type-options") == "nosniff"
    page = client.get("/console/").text
    assert "<script>" not in page and " style=" not in page and "onclick" not in page


def test_readyz_answers_for_the_database(db: str, make_client: MakeClient) -> None:
    client = make_client()
    assert client.get("/console/healthz").text == "ok"
    assert client.get("/console/readyz").status_code == 200


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("console_pending_keyed", "messages_keyed_pending_idx"),
        ("console_pending_keyless", "messages_keyless_pending_idx"),
        ("console_dead_by_topic", "messages_dead_letters"),
        ("console_dead_letters", "messages_dead_letters_"),  # by id, or by (key, id) with a key
        ("console_dead_letters_count", "messages_dead_letters_idx"),  # the key's entries alone
        # The confirmation's count of the chosen ids: a probe per id (schema version 15).
        ("dead_letters_count_selected", "messages_dead_letters_message_id_idx"),
        ("console_dead_letter", "messages_dead_letters_by_id_idx"),
        ("console_payload", "messages_dead_letters_by_id_idx"),
        # The confirmation's held-behind count under hold: a range of the keyed index a key,
        # the chosen dead letters found by probes of their message-id index.
        ("dead_letters_held_behind_selected", "messages_keyed_pending_idx"),
        ("dead_letters_held_behind_selected", "messages_dead_letters_message_id_idx"),
    ],
)
def test_console_queries_read_through_their_index(db: str, query: str, index: str) -> None:
    # As the console's sessions run them (read_model.Database: sequential scans off):
    # no plan reads the outbox through, whatever retention keeps.
    from outbox_relay.sqlfiles import Queries

    params = {
        "topic_regex": None,
        "key": "k",
        "reason": None,
        "since": None,
        "until": None,
        "before": None,
        "limit": 50,
        "id": 1,
        "message_ids": ["00000000-0000-0000-0000-000000000001"] if query.endswith("_selected") else None,
        "cut": None,
        "cap": 10_001,
    }
    with psycopg.connect(db) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + Queries("outbox")[query].as_string(conn), params))
    assert "Seq Scan" not in plan, plan
    assert index in plan, plan


def test_the_console_role_reads_every_page_and_acts_with_its_grants(db: str) -> None:
    from outbox_relay.console.app import Console
    from outbox_relay.console.auth import Authenticator
    from tests.console.conftest import console_config, served
    from tests.support.databases import role_with_grants

    ids = enqueue(db, [("t", "k", {"card": "4111-secret"}), ("t", "k2", {"n": 2})])
    dead_letter(db, ids, "permanent")
    with psycopg.connect(db) as conn:
        row_id = conn.execute("SELECT min(id) FROM outbox.messages").fetchone()[0]  # type: ignore[index]
    for kinds, may_act in (("console", False), ("console+console_actions", True)):
        with role_with_grants(db, kinds, "console_role") as dsn:
            config = console_config(dsn, console={"show_payloads": True})
            app = Console(config, auth=Authenticator(TOKEN, None))
            app.open()
            try:
                with served(app.asgi) as base, httpx.Client(base_url=base, timeout=30) as client:
                    for path in (
                        "/console/",
                        "/console/dead-letters",
                        "/console/jobs",
                        f"/console/messages?id={ids[1]}",
                    ):
                        assert client.get(path).status_code == 200, path
                    shown = client.get(
                        f"/console/dead-letters/{row_id}?payload=show", headers={"Authorization": f"Bearer {TOKEN}"}
                    )
                    assert shown.status_code == 200 and "may not read payloads" in shown.text
                    assert "4111-secret" not in shown.text
                    done = client.post(
                        "/console/dead-letters/requeue",
                        data={"id": ids[1], "confirmed": "yes"},
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    )
                    if may_act:
                        assert done.status_code == 303, done.text
                    else:
                        assert done.status_code == 403 and "schema sql --console-role" in done.text, done.text
            finally:
                app.close()
    with psycopg.connect(db) as conn:
        requeued = conn.execute("SELECT message_id::text FROM outbox.messages WHERE dead_lettered_at IS NULL")
        assert [r[0] for r in requeued.fetchall()] == [ids[1]]


def test_a_post_from_another_origin_is_refused_even_with_the_csrf_pair(db: str, make_client: MakeClient) -> None:
    ids = enqueue(db, [("t", None, {"n": 1})])
    dead_letter(db, ids, "permanent")
    client = make_client()
    csrf = csrf_of(client, "/console/sign-in")
    client.post("/console/sign-in", data={"csrf": csrf, "token": TOKEN})
    csrf = csrf_of(client)  # a new token with the session
    form = {"csrf": csrf, "id": ids, "confirmed": "yes"}
    for headers in ({"Sec-Fetch-Site": "same-site"}, {"Origin": "http://127.0.0.1:3000"}):
        refused = client.post("/console/dead-letters/purge", data=form, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.text, headers
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (1,)
    done = client.post("/console/dead-letters/purge", data=form, headers={"Sec-Fetch-Site": "same-origin"})
    assert done.status_code == 200 and "1 purged by token" in done.text


def test_the_csrf_token_is_new_at_sign_in(db: str, make_client: MakeClient) -> None:
    client = make_client()
    planted = csrf_of(client, "/console/sign-in")
    client.post("/console/sign-in", data={"csrf": planted, "token": TOKEN})
    assert client.cookies.get(CSRF_COOKIE) not in (None, planted)


def test_the_done_banner_comes_from_the_action_not_the_link(db: str, make_client: MakeClient) -> None:
    page = make_client().get("/console/dead-letters", params={"done": "5000 purged by mallory"})
    assert "5000 purged" not in page.text


def test_bad_filters_get_one_line_and_400(db: str, make_client: MakeClient) -> None:
    client = make_client()
    for params, words in (
        ({"before": "99999999999999999999"}, "before must be a row id"),
        ({"before": "-3"}, "before must be a row id"),
        ({"topic": "[z-a]"}, "invalid filter"),
        ({"key": "a\x00b"}, "must not hold a NUL"),
    ):
        page = client.get("/console/dead-letters", params=params)
        assert page.status_code == 400 and words in page.text, (params, page.text[-500:])


def test_cancel_goes_back_on_the_console_only(db: str, make_client: MakeClient) -> None:
    ids = enqueue(db, [("t", None, {"n": 1})])
    dead_letter(db, ids, "permanent")
    client = make_client()
    csrf = csrf_of(client)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for given, expected in (
        ("/console/dead-letters?topic=t", "/console/dead-letters?topic=t"),
        ("https://evil.example/", "/console/dead-letters"),
        ("//evil.example/x", "/console/dead-letters"),
    ):
        page = client.post(
            "/console/dead-letters/confirm",
            data={"csrf": csrf, "id": ids, "action": "purge", "back": given},
            headers=bearer,
        )
        assert page.status_code == 200
        found = re.search(r'<a href="([^"]+)" id="cancel">', page.text)
        assert found and found.group(1).replace("&amp;", "&") == expected, (given, found)


def test_a_trusted_header_sent_twice_or_a_standard_one_is_not_trusted(db: str, make_client: MakeClient) -> None:
    from outbox_relay.console.auth import Authenticator, UntrustableHeader

    with pytest.raises(UntrustableHeader, match="sent by every client"):
        Authenticator(None, "User-Agent")
    client = make_client(token=None, console={"trusted_user_header": "X-Forwarded-User"})
    twice = client.get("/console/", headers=[("X-Forwarded-User", "mallory"), ("X-Forwarded-User", "grace")])
    assert "Read-only" in twice.text


def test_anonymous_readers_see_trace_context_and_no_other_header_value(db: str, make_client: MakeClient) -> None:
    ids = enqueue(
        db,
        [("t", None, {"n": 1})],
        headers={"x-api-key": "k-123456", "traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01"},
    )
    dead_letter(db, ids, "permanent")
    with psycopg.connect(db) as conn:
        row_id = conn.execute("SELECT id FROM outbox.messages").fetchone()[0]  # type: ignore[index]
    client = make_client()
    anonymous = client.get(f"/console/dead-letters/{row_id}").text
    assert "k-123456" not in anonymous and "(redacted)" in anonymous and "c" * 32 in anonymous
    operator = client.get(f"/console/dead-letters/{row_id}", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert "k-123456" in operator


def test_a_page_outside_the_console_sets_no_cookie(db: str, make_client: MakeClient) -> None:
    # The browser asks for /favicon.ico beside the page: its 404 must not replace the
    # CSRF cookie of the form the page holds.
    client = make_client()
    missing = client.get("/favicon.ico")
    assert missing.status_code == 404 and "set-cookie" not in missing.headers


def test_the_first_page_does_not_wait_for_a_slow_first_reading(db: str, make_client: MakeClient) -> None:
    # A lock held on a table the overview reads stands for a count over a large backlog:
    # the page answers "reading" at once, and the numbers come when the reading ends.
    enqueue(db, [("t", None, {"n": 1})])
    with psycopg.connect(db) as locker:
        locker.execute("LOCK TABLE outbox.relay_samples IN ACCESS EXCLUSIVE MODE")
        client = make_client()
        first = client.get("/console/")
        assert first.status_code == 200 and 'id="reading"' in first.text and 'id="pending"' not in first.text
        assert 'id="reading"' in client.get("/console/live").text
        locker.rollback()
    for _ in range(100):
        live = client.get("/console/live").text
        if 'id="pending"' in live:
            break
        time.sleep(0.1)
    assert re.search(r'id="pending">1<', live), live[:300]
