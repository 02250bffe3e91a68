"""Process-wide settings of `outbox-relay run` (outbox_relay/process.py)."""

from __future__ import annotations

import gc
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from outbox_relay import assembly
from outbox_relay.cli import main as cli
from outbox_relay.process import GC_THRESHOLDS, tune_gc
from tests.support.configs import write_config


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_what_is_alive_and_collects_less_often() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tune_gc()
    assert gc.get_freeze_count() > 1000  # the modules and objects already alive
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # above CPython's default young-generation threshold


@pytest.mark.usefixtures("restored_gc", "restored_logging")
def test_the_run_command_tunes_the_collector_once_the_relay_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Frozen before build_relay, the relay's own long-lived objects would stay in sight.
    seen: dict[str, object] = {}

    class Relay:
        async def run(self) -> None:
            seen["thresholds"] = gc.get_threshold()

        def stop(self) -> None:
            pass

    def build_relay(_config: object, **_parts: object) -> Relay:
        seen["frozen_at_build"] = gc.get_freeze_count()
        return Relay()

    gc.unfreeze()
    monkeypatch.setattr(assembly, "build_relay", build_relay)
    monkeypatch.setattr(signal, "signal", lambda *_args: None)  # not the test process's handlers
    config = write_config(tmp_path / "relay.yaml", "postgresql://relay@localhost/app")
    result = CliRunner().invoke(cli, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert seen == {"frozen_at_build": 0, "thresholds": GC_THRESHOLDS}
