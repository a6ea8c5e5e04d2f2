"""The ``broker`` option checked at start-up: an ``amqp://`` or ``amqps://`` URL aiormq can use.

aiormq reads its options from the URL's query and ignores any name it does not know, and
it reads the TLS ones (``cafile`` and the rest) only for ``amqps://``. So a misspelt option,
a TLS option on an ``amqp://`` URL (the connection would then run in clear text) or a CA
file that does not exist would surface late, as a connection that retries until
``retry_timeout`` or one that is not what was asked for. Each is refused here, once, with
the URL shown without its password. Nothing here imports aiormq.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Callable
from urllib.parse import SplitResult, parse_qsl, urlsplit

from .masking import mask_url

#: The query options aiormq 7 reads, with what each must be.
TLS_OPTIONS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")
OTHER_OPTIONS = ("heartbeat", "timeout", "name", "auth")
AUTH_MECHANISMS = ("plain", "external")

EXAMPLE = "write e.g. broker='amqps://user:password@rabbit.example:5671/vhost?cafile=/path/ca.pem'"


class BadBrokerURL(ValueError):
    """The ``broker`` URL cannot work; the message shows it without credentials."""


def check_broker_url(url: str) -> str:
    """Return ``url`` if aiormq can use it as given; else raise :class:`BadBrokerURL`."""
    parts = urlsplit(url)
    shown = mask_url(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise BadBrokerURL(f"broker must be an 'amqp://' or 'amqps://' URL; got {shown}")
    try:
        port = parts.port  # urlsplit checks the port only when asked for it
    except ValueError:
        port = 0
    if port == 0:
        raise BadBrokerURL(
            f"broker URL {shown} has no valid port (1-65535); a password containing "
            "/ ? # @ or : must be percent-encoded (urllib.parse.quote(password, safe=''))"
        )
    if not parts.hostname:
        raise BadBrokerURL(
            f"broker URL {shown} names no host; write amqp://user:password@host:5672/vhost"
        )
    _check_query(parts, shown)
    return url


def _check_query(parts: SplitResult, shown: str) -> None:
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - set(TLS_OPTIONS) - set(OTHER_OPTIONS))
    if unknown:
        known = ", ".join(TLS_OPTIONS + OTHER_OPTIONS)
        raise BadBrokerURL(
            f"broker URL {shown} has unknown option(s) {', '.join(unknown)}; aiormq reads "
            f"only {known}"
        )
    tls = sorted(name for name in options if name in TLS_OPTIONS)
    if tls and parts.scheme != "amqps":
        raise BadBrokerURL(
            f"broker URL {shown} gives TLS option(s) {', '.join(tls)} with amqp://, which "
            "connects without TLS and ignores them; use amqps://"
        )
    for name, value in options.items():
        problem = _CHECKS[name](value)
        if problem:
            raise BadBrokerURL(f"broker URL {shown}: {name} {problem}")
    if "keyfile" in options and "certfile" not in options:
        raise BadBrokerURL(f"broker URL {shown}: keyfile needs certfile (the client certificate)")
    if parts.scheme == "amqps" and {"cafile", "capath", "cadata", "certfile"} & set(options):
        _check_tls(options, shown)


def _check_tls(options: dict[str, str], shown: str) -> None:
    """Build the TLS context once, as aiormq will, so a file that is not a certificate or
    a key fails here rather than at every connection attempt."""
    try:
        context = ssl.create_default_context(
            cafile=options.get("cafile"),
            capath=options.get("capath"),
            cadata=base64.b64decode(options["cadata"]) if "cadata" in options else None,
        )
        if "certfile" in options:
            context.load_cert_chain(options["certfile"], options.get("keyfile"))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BadBrokerURL(f"broker URL {shown}: its TLS files do not load ({exc})") from None


def _file(value: str) -> str | None:
    return None if os.path.isfile(value) else f"names no readable file: {value!r}"


def _directory(value: str) -> str | None:
    return None if os.path.isdir(value) else f"names no directory: {value!r}"


def _base64(value: str) -> str | None:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "must be base64 (DER certificates; + and / percent-encoded)"
    return None


def _flag(value: str) -> str | None:
    return None if value in ("0", "1") else f"must be 0 or 1, not {value!r}"


def _seconds(value: str) -> str | None:
    return None if value.isdigit() else f"must be a whole number of seconds, not {value!r}"


def _auth(value: str) -> str | None:
    if value.lower() in AUTH_MECHANISMS:
        return None
    return f"must be one of {', '.join(AUTH_MECHANISMS)}, not {value!r}"


def _any(value: str) -> str | None:
    return None


_CHECKS: dict[str, Callable[[str], str | None]] = {
    "cafile": _file,
    "capath": _directory,
    "cadata": _base64,
    "certfile": _file,
    "keyfile": _file,
    "no_verify_ssl": _flag,
    "heartbeat": _seconds,
    "timeout": _seconds,
    "name": _any,
    "auth": _auth,
}

__all__ = ["EXAMPLE", "BadBrokerURL", "check_broker_url"]
