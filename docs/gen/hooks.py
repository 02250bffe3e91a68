"""MkDocs hooks (mkdocs.yml: hooks): what `mkdocs build` does beyond rendering.

- The generated parts of the reference pages are written afresh from the code
  (docs/gen/reference.py), so the site cannot drift from it.
- A code span with a pipe in a table row shows as GitHub shows it.
- A link to a file of the repository outside docs/ (`../../schema/schema.sql`, which
  GitHub follows as it is) becomes a link to that file on the repository's site; a
  link to a file that does not exist fails the build, as a broken page link does under
  `--strict`.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference

_LINK = re.compile(r"(\]\()(?P<target>[^)\s#]+)(?P<fragment>#[^)\s]*)?(\))")
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def repository_links(markdown: str, page_path: Path, repo_url: str) -> str:
    """Links that leave docs/ for a file of the repository, as links to its site.

    `page_path` is the page's source file. Code blocks are left alone."""
    docs = reference.DOCS.resolve()
    root = reference.ROOT.resolve()

    def rewrite(match: re.Match[str]) -> str:
        target = match["target"]
        if re.match(r"[a-z]+:", target) or target.startswith("/"):
            return match.group(0)
        resolved = (page_path.parent / target).resolve()
        if resolved.is_relative_to(docs):
            return match.group(0)  # a page or an asset: MkDocs checks those
        if not resolved.is_relative_to(root) or not resolved.exists():
            raise PluginError(f"{page_path.relative_to(root)}: link to {target}, which does not exist")
        kind = "tree" if resolved.is_dir() else "blob"
        url = f"{repo_url.rstrip('/')}/{kind}/main/{resolved.relative_to(root).as_posix()}"
        return f"{match.group(1)}{url}{match['fragment'] or ''}{match.group(4)}"

    parts = _FENCE.split(markdown)  # text, fence marker, text, fence marker...
    out = []
    inside = False
    for index, part in enumerate(parts):
        if index % 2 == 1:  # a fence marker
            inside = not inside
            out.append(part)
        else:
            out.append(part if inside else _LINK.sub(rewrite, part))
    return "".join(out)


def table_code_pipes(markdown: str) -> str:
    """A code span in a table row that holds `\\|` as HTML code with the pipe itself.

    GitHub wants a pipe inside a table's code span escaped, and shows it without the
    backslash; Python-Markdown keeps the backslash inside code. The pages are written
    for GitHub; this makes the site show what GitHub shows."""

    def code(match: re.Match[str]) -> str:
        return "<code>" + html.escape(match.group(1).replace("\\|", "|")).replace("|", "&#124;") + "</code>"

    def row(line: str) -> str:
        return re.sub(r"`([^`]*\\\|[^`]*)`", code, line) if line.lstrip().startswith("|") else line

    return "\n".join(row(line) for line in markdown.split("\n"))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- generated: " in markdown:
        markdown = reference.fill(markdown)
    markdown = table_code_pipes(markdown)
    return repository_links(markdown, Path(page.file.abs_src_path), config["repo_url"])
