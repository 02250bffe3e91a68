"""The Layout page (docs/reference/layout.md) matches the tree: a reader finds every module by it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout_rows() -> dict[str, str]:
    text = (ROOT / "docs" / "reference" / "layout.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = line.split(" | ")
        if line.startswith("| `") and len(cells) >= 2:
            for path in re.findall(r"`([^`]+)`", cells[0]):
                rows[path] = line
    return rows


def _folder(path: str) -> Path:
    """The folder a row speaks of: the path itself for `dir/`, else the file's folder."""
    return Path(path) if path.endswith("/") else Path(path).parent


def test_every_path_the_layout_names_exists() -> None:
    missing = [path for path in _layout_rows() if not (ROOT / path).exists()]
    assert missing == []


def test_every_module_a_row_names_exists() -> None:
    # `name.py` in a row is a file of the row's folder; `a/b.py` is a path from the top.
    missing = []
    for path, row in _layout_rows().items():
        for name in re.findall(r"`([\w/]+\.py)`", row):
            where = ROOT / name if "/" in name else ROOT / _folder(path) / name
            if not where.exists():
                missing.append(f"{path}: {name}")
    assert missing == []


def test_every_module_is_named_in_the_layout() -> None:
    rows = _layout_rows()
    unnamed = []
    for module in sorted([*ROOT.glob("outbox_relay/**/*.py"), *ROOT.glob("adapters/*.py")]):
        relative = module.relative_to(ROOT)
        if module.name == "__init__.py" or relative.as_posix() in rows:
            continue
        # Named by file name in a row of its own folder (its folder's row, or a sibling's).
        folder_rows = [row for path, row in rows.items() if _folder(path) == relative.parent]
        if not any(f"`{module.name}`" in row or f"`{relative.as_posix()}`" in row for row in folder_rows):
            unnamed.append(relative.as_posix())
    assert unnamed == []
