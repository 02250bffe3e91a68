"""Option validation shared by the built-in adapters: pydantic models, one-line errors."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, model_validator

from outbox_relay.config import config_error
from outbox_relay.errors import AdapterOptionsError

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(model: type[M], options: Mapping[str, Any]) -> M:
    """Validate `options`; raise AdapterOptionsError whose path is the option's key."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        # The config's own formatter, in the words of options. The hint for a mistyped
        # option names the adapter's top-level options, also for a key inside a nested
        # block (tls, sasl); the value given is not shown.
        error = config_error(exc, noun="option", known_keys=lambda _parent: list(model.model_fields), show_input=False)
        raise AdapterOptionsError(error.reason, path=error.path) from None


class TlsOptions(Options):
    """TLS to a broker: a CA to verify it, and optionally a client certificate."""

    # A PEM bundle of the CAs the broker's certificate must chain to, in place of the
    # system's (unset: the system's CAs).
    ca_file: str | None = None
    # A client certificate (PEM) for mutual TLS, with key_file: for a broker that
    # authenticates clients by certificate.
    cert_file: str | None = None
    # The client certificate's private key (PEM), with cert_file.
    key_file: str | None = None
    # The password of an encrypted key_file, from the environment (`${TLS_KEY_PASSWORD}`);
    # unset: the key is not encrypted.
    key_password: SecretStr | None = None
    # false: accept a certificate that does not name the host connected to (it must still
    # chain to the CAs); for a broker reached by an address its certificate lacks.
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> TlsOptions:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


def tls_context(tls: TlsOptions) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca_file)
    context.check_hostname = tls.check_hostname
    if tls.cert_file and tls.key_file:
        password = tls.key_password.get_secret_value() if tls.key_password else None
        context.load_cert_chain(tls.cert_file, tls.key_file, password)
    return context
