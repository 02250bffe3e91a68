"""The real `outbox-relay` command in a subprocess: `run_cli` for one command
(`run_cli_at_terminal` to answer its question), `RelayProcess` for `outbox-relay run`
in the background, `read_jsonl` for a file sink."""

from __future__ import annotations

import atexit
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for


def exe() -> list[str]:
    script = Path(sys.executable).parent / "outbox-relay"
    if script.exists():
        return [str(script)]
    found = shutil.which("outbox-relay")
    assert found, "the outbox-relay console script is not installed"
    return [found]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`outbox-relay ARGS` in a subprocess; `env` on top of this process's (a variable
    set to "" reads as unset), `cwd` where it runs (where it finds ./relay.yaml)."""
    return subprocess.run(
        [*exe(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
        cwd=cwd,
    )


def run_cli_at_terminal(
    *args: str, answer: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`run_cli` with stdin at a terminal (a pseudo-terminal) that has `answer` typed
    in, for a command that asks before it acts; stdout and stderr stay pipes."""
    typist, terminal = pty.openpty()
    try:
        # Typed ahead: the terminal keeps the line until the command reads its answer.
        os.write(typist, f"{answer}\n".encode())
        proc = subprocess.Popen(
            [*exe(), *args],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        os.close(terminal)
        terminal = -1
        out, err = proc.communicate(timeout=timeout)
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(typist)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    # A test that fails between start and close must not leave a relay running.
    for proc in _LIVE:
        if proc.poll() is None:
            proc.kill()


class RelayProcess:
    """`outbox-relay run` in the background, with its stderr (the logs) kept in a file."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, *, prefix: list[str] | None = None):
        """`prefix` runs the relay under another command (e.g. `prlimit --as=N --`)."""
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [*(prefix or []), *exe(), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        _LIVE.add(self.proc)

    def logs(self) -> list[dict[str, Any]]:
        if not self._log.closed:
            self._log.flush()
        out = []
        for line in self.log_path.read_text().splitlines():
            out.append(json.loads(line))
        return out

    def wait_started(self, timeout: float = 30) -> None:
        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            return "relay_started" in self.log_path.read_text()

        wait_for(started, timeout, "the relay started")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


def rss_kb(pid: int) -> int:
    """The resident set size of process `pid` (VmRSS in /proc), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file a relay may still be writing: a last line
    without its newline is a record half written (read while the relay wrote it), not
    a record, and is left for the next read."""
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]
