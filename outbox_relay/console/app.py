"""The console's routes: one handler per page or action, all under /console.

Pages are plain functions (Starlette runs them in a thread: the database calls are
blocking psycopg, and the relay's own event loop must never wait on them when it
serves the console). Every response carries the security headers; every action
needs an identity that may act, a CSRF token and an explicit confirmation, and is
logged with who and what.
"""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import psycopg
import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox_relay.config import Config
from outbox_relay.console import chart
from outbox_relay.console.auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    SESSION_S,
    Authenticator,
    Identity,
    csrf_ok,
    new_csrf_token,
    same_origin,
)
from outbox_relay.console.read_model import (
    COUNT_CAP,
    Database,
    DeadLetterFilter,
    Overview,
    dead_letter,
    dead_letters,
    jobs,
)
from outbox_relay.errors import CommandLineError, first_line
from outbox_relay.operations import dead_letters as dead_letter_ops
from outbox_relay.operations import message_lookup
from outbox_relay.redact import payload_text as _payload_text
from outbox_relay.redact import redacted_headers

log = structlog.get_logger("outbox_relay.console")

PREFIX = "/console"
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
MAX_FORM_IDS = 500
LOGGED_IDS = 100  # message ids per console_action log line
FLASH_COOKIE = "outbox_console_done"
FORM_REFUSED = "the form expired or came from another site: load the page and try again"


class SecurityHeaders:
    """Adds the security headers to every response, and `no-store` to every page (a
    page may show a message's headers: no shared cache keeps it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith(f"{PREFIX}/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"cache-control"]
                headers += SECURITY_HEADERS
                headers.append((b"cache-control", b"max-age=3600" if static else b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class Console:
    """One console: its database, its overview, who may act. `asgi` is the app."""

    def __init__(self, config: Config, *, auth: Authenticator | None = None):
        self.config = config
        self.settings = config.console
        self.auth = auth or Authenticator.from_environment(self.settings.trusted_user_header)
        self.db = Database(
            config.database.dsn.get_secret_value(),
            config.database.schema_name,
            connect_timeout=config.database.connect_timeout,
            prepare_threshold=config.database.prepare_threshold,
        )
        self.overview = Overview(self.db, wal_slot=config.wal_slot)
        self.hold = config.relay.dead_letter_policy == "hold"
        self._templates = Environment(
            loader=PackageLoader("outbox_relay.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters["utc"] = _utc
        self._templates.filters["age"] = _age
        self._templates.filters["glob_literal"] = _glob_literal
        self._templates.globals["prefix"] = PREFIX
        routes = [
            Route("/", self.overview_page, name="overview"),
            Route("/live", self.overview_live),
            Route("/dead-letters", self.dead_letters_page),
            Route("/dead-letters/confirm", self.confirm_page, methods=["POST"]),
            Route("/dead-letters/{action:str}", self.act, methods=["POST"]),
            Route("/dead-letters/{row_id:int}", self.dead_letter_page),
            Route("/jobs", self.jobs_page),
            Route("/messages", self.message_page),
            Route("/messages/rows", self.message_rows_part),
            Route("/sign-in", self.sign_in, methods=["GET", "POST"]),
            Route("/sign-out", self.sign_out, methods=["POST"]),
            Route("/healthz", lambda request: PlainTextResponse("ok")),
            Route("/readyz", self.readyz),
            Mount("/static", app=StaticFiles(packages=[("outbox_relay.console", "static")])),
        ]
        app = Starlette(
            routes=[Mount(PREFIX, routes=routes), Route("/", self.to_console)],
            exception_handlers={
                psycopg.Error: self._database_error,
                PoolTimeout: self._database_error,
                404: self._not_found,
                405: self._not_found,
            },
        )
        self.asgi: ASGIApp = SecurityHeaders(app)

    def open(self) -> None:
        self.db.open()

    def close(self) -> None:
        self.db.close()

    # -- rendering --------------------------------------------------------------------

    def _page(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        identity = self._identity(request)
        csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_token()
        # What the last action did, said once: a cookie set by the action's redirect (a
        # query parameter would let any link show a made-up "5000 purged").
        flash = request.cookies.get(FLASH_COOKIE)
        body = self._templates.get_template(template).render(
            identity=identity,
            csrf=csrf,
            can_sign_in=self.auth.can_sign_in,
            trusted_header=self.auth.trusts_header,
            path=request.url.path,
            here=_here(request),
            flash=_printable(flash)[:300] if flash else None,
            **context,
        )
        response = HTMLResponse(body, status_code=status)
        # Only a page under /console sets the cookie: a request outside it (the browser's
        # /favicon.ico, answered by the 404 page) does not carry the cookie, and setting
        # a new one would replace the token of the form the user is about to send.
        if request.cookies.get(CSRF_COOKIE) != csrf and request.url.path.startswith(f"{PREFIX}/"):
            _set_cookie(response, request, CSRF_COOKIE, csrf)
        if flash:
            response.delete_cookie(FLASH_COOKIE, path=PREFIX)
        return response

    def _identity(self, request: Request) -> Identity:
        return self.auth.identify(request.headers, dict(request.cookies))

    def _error(self, request: Request, message: str, status: int = 400) -> HTMLResponse:
        return self._page(request, "error.html", status=status, message=message)

    def _not_found(self, request: Request, exc: Exception) -> Response:
        status = int(getattr(exc, "status_code", 404))
        what = "no such page" if status == 404 else f"{request.method} is not taken here"
        return self._error(request, f"{what}: {request.url.path[:200]}", status)

    def _database_error(self, request: Request, exc: Exception) -> Response:
        """A database error as one line on the page (never a traceback): a role without
        a grant says which; the database away says so."""
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            message = (
                f"the console's database role may not do this ({first_line(exc)}): grant it with "
                "outbox-relay schema sql --console-role ROLE --console-actions --grants-only"
            )
            return self._error(request, message, 403)
        if isinstance(exc, psycopg.DataError):  # a filter the database cannot take ([z-a] as a glob)
            return self._error(request, f"invalid filter: {first_line(exc)}", 400)
        log.warning("console_database_error", error_type=type(exc).__name__, error=first_line(exc))
        return self._error(request, f"database: {first_line(exc)}", 503)

    # -- pages ------------------------------------------------------------------------

    def to_console(self, request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=303)

    def overview_page(self, request: Request) -> Response:
        return self._page(request, "overview.html", **self._overview_context())

    def overview_live(self, request: Request) -> Response:
        """The overview's live part alone: the page's script swaps it in every few seconds."""
        body = self._templates.get_template("overview_live.html").render(**self._overview_context())
        return HTMLResponse(body)

    def _overview_context(self) -> dict[str, Any]:
        snapshot = self.overview.current()
        if snapshot is None:  # the first reading is still counting a large backlog
            return {"s": None, "cli": shlex.join(["outbox-relay", "status", "--config", self.config.source])}
        published, failed = snapshot.rates()
        return {
            "s": snapshot,
            "published_rate": published,
            "failed_rate": failed,
            "rates_chart": chart.rates(snapshot.samples, snapshot.read_at),
            "lag_chart": chart.lag(snapshot.samples, snapshot.read_at),
            "cli": shlex.join(["outbox-relay", "status", "--config", self.config.source]),
            "config_path": self.config.source,
        }

    def dead_letters_page(self, request: Request) -> Response:
        try:
            selected = _filter_from(request.query_params)
            before = _optional_int(request.query_params.get("before"), "before")
        except ValueError as exc:
            return self._error(request, str(exc))
        page = dead_letters(self.db, selected, before=before, limit=self.settings.page_size)
        cli = ["outbox-relay", "dead-letters", "list", "--config", self.config.source]
        if selected.topic:
            cli += ["--topic", selected.topic]
        next_url = None
        if page.next_before is not None:
            next_url = f"{PREFIX}/dead-letters?" + urlencode({**selected.query_string(), "before": page.next_before})
        return self._page(
            request,
            "dead_letters.html",
            page=page,
            selected=selected,
            next_url=next_url,
            first_page=before is None,
            count_cap=COUNT_CAP,
            cli=shlex.join(cli),
        )

    def dead_letter_page(self, request: Request) -> Response:
        row_id = int(request.path_params["row_id"])
        identity = self._identity(request)
        # A payload is shown to an operator only, where the config allows it, and logged.
        reveal = request.query_params.get("payload") == "show" and self.settings.show_payloads and identity.may_act
        detail = dead_letter(self.db, row_id, with_payload=reveal)
        if detail is None:
            return self._error(request, f"no dead letter with row id {row_id} (requeued, purged, or never one)", 404)
        payload_text = None
        if detail.payload is not None:
            payload_text = _payload_text(detail.payload)
            log.info(
                "console_payload_shown",
                user=identity.user,
                via=identity.via,
                remote=_remote(request),
                message_id=detail.row.message_id,
            )
        headers = detail.headers if identity.may_act else redacted_headers(detail.headers)
        return self._page(
            request,
            "dead_letter.html",
            d=detail,
            headers=headers,
            headers_redacted=not identity.may_act and headers != detail.headers,
            payload_text=payload_text,
            payloads_allowed=self.settings.show_payloads,
            cli=shlex.join(
                ["outbox-relay", "status", "--config", self.config.source, "--message-id", detail.row.message_id]
            ),
        )

    def jobs_page(self, request: Request) -> Response:
        return self._page(request, "jobs.html", jobs=jobs(self.db), config_path=shlex.quote(self.config.source))

    def message_page(self, request: Request) -> Response:
        given = (request.query_params.get("id") or "").strip()
        if not given:
            return self._page(request, "message.html", message_id=None, rows=None, entries=[])
        try:
            message_id = UUID(given)
        except ValueError:
            return self._page(
                request,
                "message.html",
                status=400,
                message_id=None,
                rows=None,
                entries=[],
                given=given,
                error=f"not a message id: {given[:80]!r} (a UUID, as in the broker's message-id header)",
            )
        # The rows that left the backlog are a probe each; the pending ones read the
        # backlog (unless the optional index exists), so the page does not wait for them:
        # its script asks /messages/rows, or `pending=include` asks for everything.
        pending_included = request.query_params.get("pending") == "include"
        with self.db.reading() as conn:
            rows = message_lookup.lookup(conn, self.db.schema, message_id, pending=pending_included)
        return self._page(
            request,
            "message.html",
            message_id=message_id,
            rows=rows,
            given=given,
            pending_included=pending_included,
            entries=_entries(rows),
            cli=shlex.join(["outbox-relay", "status", "--config", self.config.source, "--message-id", str(message_id)]),
        )

    def message_rows_part(self, request: Request) -> Response:
        """Every row of a message id, read afresh (the pending ones too): the fragment
        the lookup page's script puts in place of the rows it answered with."""
        try:
            message_id = UUID((request.query_params.get("id") or "").strip())
        except ValueError:
            return PlainTextResponse("not a message id", status_code=400)
        with self.db.reading() as conn:
            rows = message_lookup.lookup(conn, self.db.schema, message_id)
        return self._page(request, "_message_lookup.html", message_id=message_id, entries=_entries(rows))

    def readyz(self, request: Request) -> Response:
        ok = self.db.ping()
        return PlainTextResponse("ready" if ok else "database not answering", status_code=200 if ok else 503)

    # -- signing in -------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        if request.method == "GET":
            return self._page(request, "sign_in.html", error=None)
        form = await request.form()
        if not self._form_is_ours(request, form):
            return self._error(request, FORM_REFUSED, 403)
        if not self.auth.can_sign_in:
            return self._error(request, "signing in is off: OUTBOX_RELAY_CONSOLE_TOKEN is not set", 403)
        name = (_field(form, "name") or "").strip()[:80]
        if not self.auth.check_token(_field(form, "token") or ""):
            log.warning("console_sign_in_refused", remote=_remote(request))
            return self._page(request, "sign_in.html", status=403, error="wrong token")
        user = f"{name} (token)" if name else "token"
        log.info("console_signed_in", user=user, remote=_remote(request))
        response = RedirectResponse(f"{PREFIX}/", status_code=303)
        _set_cookie(response, request, SESSION_COOKIE, self.auth.session_for(user), max_age=SESSION_S)
        # A new CSRF token with the new session: one planted before the sign-in is void.
        _set_cookie(response, request, CSRF_COOKIE, new_csrf_token())
        return response

    async def sign_out(self, request: Request) -> Response:
        form = await request.form()
        if not self._form_is_ours(request, form):
            return self._error(request, FORM_REFUSED, 403)
        response = RedirectResponse(f"{PREFIX}/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # -- actions ----------------------------------------------------------------------

    async def confirm_page(self, request: Request) -> Response:
        """What an action would take, asked before it is done: how many dead letters,
        and under `hold` how many pending messages wait behind them."""
        form = await request.form()
        refused = self._refusal(request, form)
        if refused is not None:
            return refused
        action = _field(form, "action") or ""
        if action not in ("requeue", "purge"):
            return self._error(request, f"unknown action {action[:40]!r}: requeue or purge")
        try:
            selection = self._selection(form, action)
        except (ValueError, CommandLineError) as exc:
            return self._error(request, first_line(exc))

        def read() -> tuple[int, int | None]:
            # In a thread: under `hold` the count of held messages reads the backlog, and
            # the relay that serves the console must go on meanwhile.
            with self.db.reading() as conn:
                chosen = selection.with_cut(conn, self.db.schema)
                selected = dead_letter_ops.count(conn, self.db.schema, chosen)
                held = dead_letter_ops.held_behind(conn, self.db.schema, chosen) if self.hold else None
            return selected.count, held

        count, held = await run_in_threadpool(read)
        return self._page(
            request,
            "confirm.html",
            action=action,
            ids=[str(i) for i in selection.message_ids],
            count=count,
            held=held,
            back=_back(_field(form, "back")),
            cli=shlex.join(
                ["outbox-relay", "dead-letters", action, "--config", self.config.source]
                + [part for i in selection.message_ids for part in ("--id", str(i))]
            ),
        )

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("requeue", "purge"):
            return self._error(request, f"unknown action {action[:40]!r}: requeue or purge", 404)
        form = await request.form()
        refused = self._refusal(request, form)
        if refused is not None:
            return refused
        if _field(form, "confirmed") != "yes":
            return self._error(request, f"a {action} must be confirmed: use the page's {action} button")
        try:
            selection = self._selection(form, action)
        except (ValueError, CommandLineError) as exc:
            return self._error(request, first_line(exc))
        identity = self._identity(request)

        def run() -> list[UUID]:
            with self.db.acting() as conn:
                if action == "requeue":
                    return dead_letter_ops.requeue(conn, self.db.schema, selection)
                return dead_letter_ops.purge(conn, self.db.schema, selection.with_cut(conn, self.db.schema))

        taken = await run_in_threadpool(run)
        # Every id the action took, in lines of LOGGED_IDS: a purge leaves no row behind,
        # so this log is the record of what it deleted, and by whom.
        for start in range(0, max(len(taken), 1), LOGGED_IDS):
            log.info(
                "console_action",
                action=action,
                user=identity.user,
                via=identity.via,
                remote=_remote(request),
                asked=len(selection.message_ids),
                done=len(taken),
                message_ids=[str(i) for i in taken[start : start + LOGGED_IDS]],
            )
        verb = "requeued" if action == "requeue" else "purged"
        response = RedirectResponse(f"{PREFIX}/dead-letters", status_code=303)
        _set_cookie(response, request, FLASH_COOKIE, f"{len(taken)} {verb} by {identity.user}", max_age=60)
        return response

    def _refusal(self, request: Request, form: FormData) -> Response | None:
        identity = self._identity(request)
        reason = None
        if not identity.may_act:
            how = "sign in with the token" if self.auth.can_sign_in else "set OUTBOX_RELAY_CONSOLE_TOKEN"
            if self.auth.trusts_header:
                how += f" or come through the proxy that sets {self.auth.trusts_header}"
            reason = f"read-only: actions need an operator ({how})"
        elif identity.via != "bearer" and not self._form_is_ours(request, form):
            reason = FORM_REFUSED
        if reason is None:
            return None
        log.warning(
            "console_action_refused",
            path=request.url.path,
            user=identity.user,
            via=identity.via,
            remote=_remote(request),
            reason=reason,
        )
        return self._error(request, reason, 403)

    def _form_is_ours(self, request: Request, form: FormData) -> bool:
        """The form came from one of the console's pages: its CSRF field matches the
        cookie, and the browser (where it says) sent it from the console's own origin."""
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        problem = None
        if not csrf_ok(request.cookies.get(CSRF_COOKIE), _field(form, "csrf")):
            problem = "the CSRF field does not match its cookie"
        elif not same_origin(request.headers, own):
            problem = (
                f"sent from {request.headers.get('origin') or '?'} "
                f"(Sec-Fetch-Site {request.headers.get('sec-fetch-site') or '-'}), not {own}"
            )
        if problem:
            log.warning("console_form_refused", path=request.url.path, problem=problem, remote=_remote(request))
        return problem is None

    def _selection(self, form: FormData, action: str) -> dead_letter_ops.Selection:
        ids = form.getlist("id")
        if len(ids) > MAX_FORM_IDS:
            raise ValueError(f"at most {MAX_FORM_IDS} dead letters per action, got {len(ids)}")
        try:
            message_ids = tuple(UUID(str(i)) for i in ids)
        except ValueError:
            raise ValueError("a selected id is not a message id") from None
        if not message_ids:
            raise ValueError(f"select the dead letters to {action} first")
        return dead_letter_ops.Selection(message_ids=message_ids, command=action)  # type: ignore[arg-type]


def _set_cookie(response: Response, request: Request, name: str, value: str, *, max_age: int | None = None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, httponly=True, samesite="strict", secure=_https(request), path=PREFIX
    )


def _here(request: Request) -> str:
    """This page's path and query, for a form's way back (Cancel keeps the filters)."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _back(given: str | None) -> str:
    """A way back that stays on the console: a path under it, never another site."""
    if given and given.startswith(f"{PREFIX}/") and not given.startswith("//") and "\\" not in given:
        return given
    return f"{PREFIX}/dead-letters"


def _glob_literal(topic: str) -> str:
    """A topic as a glob that matches it alone (its *, ? and [ taken literally)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in topic)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def _remote(request: Request) -> str | None:
    return request.client.host if request.client else None


def _optional_int(value: str | None, name: str) -> int | None:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {value[:40]!r}") from None
    if not 0 < number < 2**63:
        raise ValueError(f"{name} must be a row id (1 or more), got {value[:40]!r}")
    return number


def _when(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name} must be a date and time such as 2026-12-07T10:00, got {value[:40]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _filter_from(params: Any) -> DeadLetterFilter:
    def text(name: str) -> str | None:
        value = (params.get(name) or "").strip()
        if "\x00" in value:
            raise ValueError(f"{name} must not hold a NUL character")
        return value[:500] or None

    return DeadLetterFilter(
        topic=text("topic"),
        key=text("key"),
        reason=text("reason"),
        since=_when(params.get("since"), "since"),
        until=_when(params.get("until"), "until"),
    )


def _utc(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _entries(rows: list[message_lookup.MessageRow]) -> list[tuple[message_lookup.MessageRow, str | None]]:
    """Each row with its receipt as the page shows it (indented JSON)."""
    return [(r, json.dumps(r.receipt, indent=2, sort_keys=True) if r.receipt else None) for r in rows]
