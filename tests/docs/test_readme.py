"""The README is the front door: short, with the two commands, and every link into the
documentation finds its page and heading (the site's build checks the pages' own links)."""

from __future__ import annotations

import re

from markdown.extensions.toc import slugify

from tests.support.docs import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    assert len(README.splitlines()) < 200
    # scripts/fresh-machine and .ci/run run these, as the README says.
    assert "scripts/demo     # the demo: embedded PostgreSQL, a sample app, the relay, a summary" in README
    assert "scripts/test     # the whole test suite, provisioning everything it needs" in README


def _anchors(text: str) -> set[str]:
    outside_code = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return {slugify(heading, "-") for heading in re.findall(r"^#+ (.+)$", outside_code, flags=re.MULTILINE)}


def test_every_link_of_the_readme_finds_its_page_and_heading() -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        where = ROOT / path
        if not where.exists() or (fragment and fragment not in _anchors(where.read_text(encoding="utf-8"))):
            broken.append(target)
    assert broken == []
