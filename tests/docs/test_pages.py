"""The hand-written pages name only files that exist, and link only to files that exist."""

from __future__ import annotations

import re
import sys

import pytest

from tests.support.docs import DOCS, ROOT, hand_written, pages

# A repository path in a code span: from one of the top-level folders or files.
_TOP = r"(?:outbox_relay|adapters|schema|tests|scripts|helm|benchmarks|soak|docker|docs|\.ci)/[\w./-]*|Dockerfile"
_PATH = re.compile(rf"`({_TOP})(?:::(\w+)(?:::(\w+))?)?(?:\[[^`]*\])?`")


def named_paths(text: str) -> list[tuple[str, str | None]]:
    """(path, test or function name after `::`) of each repository path a page names."""
    return [(match[1].rstrip("."), match[3] or match[2]) for match in _PATH.finditer(text)]


@pytest.mark.parametrize("path", pages(), ids=lambda path: path.relative_to(DOCS).as_posix())
def test_every_path_a_page_names_exists(path: str) -> None:
    missing = []
    for named, function in named_paths(hand_written(path.read_text(encoding="utf-8"))):
        where = ROOT / named
        if not where.exists():
            missing.append(named)
        elif function and where.is_file() and not re.search(rf"(def|class) {function}\b", where.read_text()):
            missing.append(f"{named}::{function}")
    assert missing == []


def test_the_pattern_finds_paths_and_test_names() -> None:
    found = named_paths("`tests/a.py::test_b`, `scripts/test`, `outbox_relay/x.py::Y::z`, `pip`, `test_c.py`")
    assert found == [("tests/a.py", "test_b"), ("scripts/test", None), ("outbox_relay/x.py", "z")]


@pytest.mark.parametrize("path", pages(), ids=lambda path: path.relative_to(DOCS).as_posix())
def test_every_link_to_a_repository_file_finds_it(path: str) -> None:
    # The build's own hook: it raises for a link to a file that does not exist.
    sys.path.insert(0, str(DOCS / "gen"))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS / "gen"))
    hooks.repository_links(path.read_text(encoding="utf-8"), path, "https://example.invalid/repo")
