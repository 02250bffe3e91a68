"""A throwaway PostgreSQL cluster from the binaries on this machine.

Used by `outbox-relay demo` and by the test suite when no DSN is given and no
Docker engine answers. It looks for ``initdb``/``pg_ctl`` on PATH, then under
/usr/lib/postgresql/*/bin, then in the optional ``pgserver`` wheel. PostgreSQL
refuses to run as root, so as root the cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from outbox_relay.errors import OutboxRelayError

# What the WAL source needs of a server (`demo --source wal`, and the tests'): logical
# decoding, and a replication slot and a walsender for each stream; 20 leaves room for
# relays standing by and for tests that each stream a slot of their own.
LOGICAL_DECODING = {"wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "20"}


class PostgresNotFound(OutboxRelayError):
    """No PostgreSQL server binaries could be found on this machine."""


def find_bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key, reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    with contextlib.suppress(ImportError):
        import pgserver  # optional extra: outbox-relay[demo]

        bindir = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (bindir / "pg_ctl").exists():
            return bindir
    raise PostgresNotFound(
        "no PostgreSQL server binaries found: install them (apt-get install postgresql) "
        "or pip install 'outbox-relay[demo]'"
    )


def _version_key(path: str) -> tuple[int, ...]:
    part = Path(path).parent.parent.name
    return tuple(int(x) for x in part.split(".") if x.isdigit())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalPostgres:
    bindir: Path
    datadir: Path
    port: int
    run_as: str | None

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _cmd(self, *args: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def _run(self, *args: str) -> None:
        result = subprocess.run(self._cmd(*args), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise OutboxRelayError(f"{Path(args[0]).name} failed: {' | '.join(tail)}")

    def start(self, settings: dict[str, str] | None = None) -> None:
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.datadir),
            "max_connections": "300",
            **(settings or {}),
        }
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir / "data"),
            "-l",
            str(self.datadir / "postgres.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir / "data"), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast", settings: dict[str, str] | None = None) -> None:
        self.stop(mode)
        self.start(settings)


def _usable_by(user: str, bindir: Path) -> Path:
    """`bindir`, or a copy of its installation the user can execute.

    As root, the server runs as `user`, who may not reach binaries under a private
    home (pgserver installed in /root/...): copy that installation somewhere it can.
    """
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(bindir / "initdb")], check=False)
    if probe.returncode == 0:
        return bindir
    # Keep the layout two levels up: wheel binaries find their bundled libraries
    # through an RPATH relative to themselves ($ORIGIN/../../../pgserver.libs).
    install = bindir.parent
    site = install.parent.parent
    # A fresh directory of our own (mkdtemp: unpredictable name, created 0700 by us): a
    # predictable /tmp path could be planted beforehand by another local user, as a
    # symlink or a directory of theirs, and root would copy executables into it.
    target = Path(tempfile.mkdtemp(prefix="outbox-relay-pginstall-"))
    shutil.copytree(install, target / install.parent.name / install.name, dirs_exist_ok=True, symlinks=True)
    for libs in site.glob(f"{install.parent.name}.libs"):
        shutil.copytree(libs, target / libs.name, dirs_exist_ok=True, symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    return target / install.parent.name / install.name / bindir.name


def create(settings: dict[str, str] | None = None, *, base: str | None = None) -> LocalPostgres:
    """initdb and start a new cluster on a free loopback port."""
    bindir = find_bindir()
    run_as = "postgres" if os.geteuid() == 0 else None
    if run_as:
        bindir = _usable_by(run_as, bindir)
    datadir = Path(tempfile.mkdtemp(prefix="outbox-relay-pg-", dir=base))
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
    cluster = LocalPostgres(bindir, datadir, free_port(), run_as)
    try:
        cluster._run(
            str(bindir / "initdb"),
            "-D",
            str(datadir / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        cluster.start(settings)
    except BaseException:
        destroy(cluster)  # never leave a half-made cluster or its directory behind
        raise
    return cluster


def destroy(cluster: LocalPostgres) -> None:
    with contextlib.suppress(OutboxRelayError):
        cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


@contextlib.contextmanager
def running(settings: dict[str, str] | None = None) -> Iterator[LocalPostgres]:
    cluster = create(settings)
    try:
        yield cluster
    finally:
        destroy(cluster)
