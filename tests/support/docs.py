"""The documentation's pages and their generator (docs/gen/reference.py), for tests/docs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def generator() -> ModuleType:
    """docs/gen/reference.py, imported once (it is no package: MkDocs loads it by path)."""
    name = "outbox_relay_docs_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "gen" / "reference.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def pages() -> list[Path]:
    """Every Markdown page of the site (not the generator's folder)."""
    return sorted(path for path in DOCS.rglob("*.md") if "gen" not in path.relative_to(DOCS).parts)


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def hand_written(text: str) -> str:
    """A page without its generated parts."""
    return re.sub(r"<!-- generated: .*?<!-- end generated: [a-z-]+ -->", "", text, flags=re.DOTALL)


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language` in a page, in order ("": those without one)."""
    blocks: list[str] = []
    inside: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if inside is None and line.startswith("```"):
            inside, lines = line[3:].strip(), []
        elif inside is not None and line == "```":
            if inside == language:
                blocks.append("\n".join(lines) + "\n")
            inside = None
        elif inside is not None:
            lines.append(line)
    return blocks


def section(text: str, heading: str) -> str:
    """The part of a page under `heading` (a line such as `## Quick start`), up to the
    next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    after = text.split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n#{{1,{level}}} ", after, maxsplit=1)[0]
