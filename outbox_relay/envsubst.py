"""``${VAR}`` and ``${VAR:-default}`` in config strings, from the environment.

Substitution happens on parsed string values, never on the YAML text, so a
variable's value can never change the structure of the file. ``$$`` is a literal ``$``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# A default may hold `$$` (a literal `$`) but no nested `${...}`: that is an error.
_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>(?:[^}$]|\$\$)*))?\}")
_BAD = re.compile(r"\$\{[^}]*\}?")


class UnsetVariable(ValueError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"environment variable {name} is not set")


def substitute(value: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name")
        if name in env and env[name] != "":
            return env[name]
        if match.group("default") is not None:
            return match.group("default").replace("$$", "$")
        if name in env:
            return ""
        raise UnsetVariable(name)

    result = _VAR.sub(replace, value)
    leftover = _BAD.search(_VAR.sub("", value))
    if leftover:
        raise ValueError(f"malformed variable reference {leftover.group(0)!r}: use ${{NAME}} or ${{NAME:-default}}")
    return result


def substitute_tree(node: Any, env: Mapping[str, str], path: tuple[str, ...] = ()) -> Any:
    """Substitute in every string of a parsed YAML tree; errors carry the key path."""
    if isinstance(node, str):
        try:
            return substitute(node, env)
        except ValueError as exc:
            raise SubstitutionError(path, str(exc)) from exc
    if isinstance(node, dict):
        return {k: substitute_tree(v, env, (*path, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_tree(v, env, (*path, str(i))) for i, v in enumerate(node)]
    return node


class SubstitutionError(ValueError):
    def __init__(self, path: tuple[str, ...], message: str):
        self.path = path
        super().__init__(message)
