"""Where the tests get their PostgreSQL: an env DSN, testcontainers, or a local cluster.

1. ``OUTBOX_RELAY_TEST_DSN`` if set (a superuser DSN: tests create databases);
2. testcontainers, when a Docker engine answers;
3. a throwaway cluster from the PostgreSQL binaries on this machine
   (outbox_relay.local_postgres; as root it runs as the postgres user).

No path skips: when none works, the session fails with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

from outbox_relay import local_postgres


def docker_engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, local_postgres.LocalPostgres | None]]:
    """Yield (superuser DSN, local cluster or None)."""
    dsn = os.environ.get("OUTBOX_RELAY_TEST_DSN")
    if dsn:
        yield dsn, None
        return
    if docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url(), None
        return
    # Durability off: these clusters are thrown away, and it makes the suite faster.
    with local_postgres.running({"fsync": "off", "full_page_writes": "off"}) as cluster:
        yield cluster.dsn, cluster
