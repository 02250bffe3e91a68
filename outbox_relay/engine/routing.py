"""Routes: which broker, and which destination on it, a topic goes to."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from outbox_relay.config import ClaimCheckConfig, RouteConfig

# A topic pattern's wildcards as fnmatch reads them: `*`, `?`, and a class `[...]` or
# `[!...]` (a `]` right after the opening is a member); an unclosed `[` is a literal.
_WILDCARD = re.compile(r"\*|\?|\[!?\]?[^\]]*\]")


def literal_text(pattern: str) -> str:
    """The characters of a topic pattern that every topic it matches contains, in order
    (`tenant:*` gives `tenant:`; a pattern without wildcards, the one topic it matches)."""
    return _WILDCARD.sub("", pattern)


@dataclass(frozen=True, slots=True)
class Target:
    broker: str
    destination: str
    explicit: bool = False
    # Where payloads over its threshold go first (the route's, else the top-level one).
    claim_check: ClaimCheckConfig | None = field(default=None, compare=False)


class Router:
    """First matching route wins; a topic that matches none has no target."""

    def __init__(self, routes: Sequence[RouteConfig], claim_check: ClaimCheckConfig | None = None):
        self._routes = tuple(routes)
        self._claim_check = claim_check
        self.resolve = functools.lru_cache(maxsize=4096)(self._resolve)

    def _resolve(self, topic: str) -> Target | None:
        for route in self._routes:
            if route.matches(topic):
                return Target(
                    route.broker,
                    route.destination or topic,
                    route.destination is not None,
                    route.claim_check or self._claim_check,
                )
        return None

    @property
    def default_claim_check(self) -> ClaimCheckConfig | None:
        """The top-level claim_check (for a topic no route matches)."""
        return self._claim_check

    def claim_check_stores(self) -> list[ClaimCheckConfig]:
        """Every claim-check configuration a route may use, each once."""
        configs = [route.claim_check for route in self._routes] + [self._claim_check]
        return list(dict.fromkeys(c for c in configs if c is not None))

    def brokers_in_use(self) -> set[str]:
        return {route.broker for route in self._routes}
