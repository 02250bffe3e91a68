"""The console on the relay's health port (`console.enabled`): what `outbox-relay run`
hands the relay to serve beside its probes (observability/health.py, Mount), so that
the health port needs nothing of the console.

The console's extra is imported when the port opens it, not before: a relay without
the extra fails its start with one line saying what to install, and only when the
console is on.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from outbox_relay.config import Config
from outbox_relay.errors import ConfigError
from outbox_relay.observability.http_server import Mounted

if TYPE_CHECKING:
    from outbox_relay.console.app import Console


class RelayConsole:
    """One relay's console under /console, opened and closed by its health port."""

    def __init__(self, config: Config):
        self._config = config
        self._console: Console | None = None

    def open(self) -> tuple[str, Mounted]:
        try:
            from outbox_relay.console import bridge
            from outbox_relay.console.app import PREFIX, Console
            from outbox_relay.console.auth import TokenTooShort, UntrustableHeader
        except ImportError as exc:
            raise ConfigError(
                f"console.enabled needs the console's extra: pip install 'outbox-relay[console]' "
                f"({exc.name} is missing)",
                path="console.enabled",
            ) from None
        try:
            console = Console(self._config)
        except (TokenTooShort, UntrustableHeader) as exc:
            raise ConfigError(str(exc), path="console") from None
        console.open()
        self._console = console
        return PREFIX, functools.partial(bridge.answer, console.asgi)

    def close(self) -> None:
        console, self._console = self._console, None
        if console is not None:
            console.close()
