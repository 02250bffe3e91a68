"""Option validation shared by the built-in adapters: pydantic models, one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from outbox_relay.errors import AdapterOptionsError

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(model: type[M], options: Mapping[str, Any]) -> M:
    """Validate `options`; raise AdapterOptionsError whose path is the option's key."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        errors = exc.errors()
        # An unknown option is usually the cause of a "missing" one next to it (a typo).
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        path = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            message = f"unknown option {error['loc'][-1]!r}{hint}"
        elif error["type"] == "missing":
            message = "required option is missing"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        raise AdapterOptionsError(message, path=path or None) from None
