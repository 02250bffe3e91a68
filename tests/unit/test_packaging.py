"""pyproject.toml lists its packages by hand (the schema and adapters are mapped from
other folders): a package left out installs in an editable checkout and is missing from
the wheel and the image (as outbox_relay.claim_check once was)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_outbox_relay_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "outbox_relay").rglob("__init__.py")}
    assert found - listed == set()
