"""A section of the README named elsewhere is still there: the README was cut to a front
door and its sections moved into docs/, so a comment, a docstring, a chart value or a
page that sends the reader to one by name must name one it still has (or send them to
the docs page instead)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.docs import ROOT

DIRS = ("outbox_relay", "adapters", "schema", "helm", "scripts", "docs", "tests", "benchmarks", "soak", ".ci")
# The forms a reference takes: README, "Section" / README "Section" / README: "Section"
# (quoted, possibly wrapped over comment lines), and (README, Section) / (README: Section).
QUOTED = re.compile(r"""(chart's )?\bREADME[,:]? "([^"]+)\"""")
BARE = re.compile(r"(chart's )?\(README[,:] ([^)\"]+)\)")
# A line break inside a comment or docstring, with the next line's comment marker.
WRAP = re.compile(r"[ \t]*\n[ \t]*(?:#+|--|//|\*)?[ \t]*")


def headings(readme: Path) -> set[str]:
    """The Markdown headings of `readme`, outside its code blocks."""
    found, fenced = set(), False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(line.lstrip("#").strip())
    return found


def sources() -> list[Path]:
    files = [path for name in DIRS for path in (ROOT / name).rglob("*") if path.is_file()]
    return sorted(
        path
        for path in files
        if "__pycache__" not in path.parts
        and not path.relative_to(ROOT).as_posix().startswith("benchmarks/results/")
        and path != Path(__file__)
    )


def test_every_readme_section_named_elsewhere_is_a_heading_of_that_readme() -> None:
    known = {False: headings(ROOT / "README.md"), True: headings(ROOT / "helm/outbox-relay/README.md")}
    stale = []
    for path in sources():
        try:
            text = WRAP.sub(" ", path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue  # a picture, a binary
        for pattern in (QUOTED, BARE):
            for chart, section in pattern.findall(text):
                if section.strip() not in known[bool(chart)]:
                    stale.append(f"{path.relative_to(ROOT)}: README section {section!r}")
    assert not stale, "no such README section (point to the docs page that has it now):\n" + "\n".join(stale)
