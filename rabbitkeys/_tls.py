"""TLS for the broker: one client ``ssl.SSLContext`` for ``amqps://`` and the https
management API, built from the files of the ``tls_*`` settings.

It takes the three paths, not the settings: ``_settings`` loads them in a validator, and
this module must not import it back.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NoReturn

from ._errors import ConfigError

__all__ = ["client_context", "failure_hint"]


def client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext | None:
    """The context that verifies the broker (against ``ca_file``, else the system's CAs)
    and presents ``cert_file`` (its key in ``key_file``, or in the same file) when set;
    None when none of the three (the ``tls_*`` settings) is given, leaving the client
    libraries to their defaults (system CAs; for AMQP also the URL's
    ``cafile``/``certfile``/``keyfile`` query options).

    Raises :class:`ConfigError` naming the variable when a file cannot be loaded. The files
    are read on each call: a certificate rotated on disk is picked up at the next connect.
    """
    ca, cert, key = ca_file, cert_file, key_file
    if ca is None and cert is None and key is None:
        return None
    if key is not None and cert is None:
        raise ConfigError("RABBITKEYS_TLS_KEY_FILE is set without RABBITKEYS_TLS_CERT_FILE")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"RABBITKEYS_TLS_CA_FILE: cannot load {ca}: {_reason(exc)}") from None
    if cert is not None:
        try:
            # an encrypted key would make OpenSSL prompt on the terminal: refuse it instead
            context.load_cert_chain(cert, key, password=_no_password)
        except (OSError, ValueError) as exc:
            variables = "RABBITKEYS_TLS_CERT_FILE" + (
                " / RABBITKEYS_TLS_KEY_FILE" if key is not None else ""
            )
            files = f"{cert}" + (f" / {key}" if key is not None else "")
            raise ConfigError(
                f"{variables}: cannot load the client certificate and key {files}: "
                f"{_reason(exc)} (the key must be PEM, unencrypted)"
            ) from None
    return context


def failure_hint(reason: str, *, ca_file: Path | None, cert_file: Path | None) -> str:
    """What to set, when a TLS connection failed with ``reason`` in a way that usually
    means a setting (appended to the error message; empty otherwise). ``ca_file`` and
    ``cert_file`` are the settings in force."""
    lowered = reason.lower()
    if "certificate verify failed" in lowered:
        action = "set" if ca_file is None else "check"
        return (
            " (the broker's certificate is not signed by a CA this process trusts: "
            f"{action} RABBITKEYS_TLS_CA_FILE, the PEM bundle of the CA that signed it)"
        )
    # With TLS 1.3 the broker checks the client's certificate after the client's side of the
    # handshake is done: its refusal arrives as an alert, or, when the client wrote first,
    # as a closed or reset connection (seen under load here). The hint says "if".
    closed = ("certificate required", "unexpectedly closed", "connection reset")
    if cert_file is None and any(sign in lowered for sign in closed):
        return (
            " (the broker closed the TLS connection: if it requires a client certificate, "
            "set RABBITKEYS_TLS_CERT_FILE and RABBITKEYS_TLS_KEY_FILE)"
        )
    return ""


def _no_password() -> NoReturn:
    raise ValueError("the private key is encrypted")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__
