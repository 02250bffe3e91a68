"""The README's Layout table matches the tree: a reader finds every module by it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        if line.startswith("| `") and len(cells) >= 2:
            for path in re.findall(r"`([^`]+)`", cells[0]):
                rows[path] = line
    return rows


def test_every_path_the_layout_names_exists() -> None:
    missing = [path for path in _layout_rows() if not (ROOT / path).exists()]
    assert missing == []


def test_every_module_is_named_in_the_layout() -> None:
    rows = _layout_rows()
    unnamed = []
    for module in sorted([*ROOT.glob("outbox_relay/**/*.py"), *ROOT.glob("adapters/*.py")]):
        relative = module.relative_to(ROOT).as_posix()
        if module.name == "__init__.py" or relative in rows:
            continue
        # Named by file name in its folder's row, or in the row of a sibling it serves.
        folder_rows = [
            row
            for path, row in rows.items()
            if path.rstrip("/") == module.parent.relative_to(ROOT).as_posix()
            or Path(path).parent == module.parent.relative_to(ROOT)
        ]
        if not any(f"`{module.name}`" in row or f"`{relative}`" in row for row in folder_rows):
            unnamed.append(relative)
    assert unnamed == []
