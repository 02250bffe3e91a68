"""The operator console: web pages for what an operator does in an incident.

`outbox-relay console` (its own process, cli/console.py), or the relay's HTTP port
under /console with `console.enabled` (`outbox-relay run` hands it to the port, whose
observability/http_server.py hands those paths here). Server-rendered: no build step,
every asset in the package, no inline script.

- ``app``: the routes and the security headers, one handler per page or action;
- ``auth``: who may act (the token from the environment, or a trusted proxy's header),
  the session cookie and the CSRF check;
- ``read_model``: what the pages show, read from the database (the queries are in
  schema/queries.sql under "The operator console"); the overview refreshed in the
  background, so a page never waits for a count over a large backlog;
- ``chart``: the last hour's rates and lag as an SVG drawn on the server;
- ``mount`` and ``bridge``: the console on the relay's health port, opened and closed
  with it, each request under /console handed to the app;
- ``templates/`` and ``static/``: the pages, their stylesheet and one small script.

Actions call what the CLI calls (operations/dead_letters.py), so a requeue from the
page and one from `outbox-relay dead-letters requeue` are the same statement.
"""
