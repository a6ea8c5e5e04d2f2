"""Hide credentials in anything the library prints, logs or raises about Redis hosts.

A ``hosts`` entry can carry a password in three places: the URL's user info
(``redis://:pw@host``) or query (``?password=pw``), a dict's connection options
(``{"host": ..., "password": ...}``, ``{"address": ..., "password": ...}``), and a
Sentinel set's ``sentinel_kwargs``. :func:`describe_host` renders any of them readable,
with every such value replaced by ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

MASK = "***"

# Option names whose values are secrets: password, ssl_password, sentinel passwords, tokens...
_SECRET_NAME = re.compile(r"pass|secret|token|credential", re.IGNORECASE)

# user:password@ inside any text (an exception message from another library, say); the
# password may hold a bare / or @ (not percent-encoded), so it runs to the last @ before
# whitespace (at worst more is hidden, never less).
_USERINFO_IN_TEXT = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^\s:/@]*):\S*@", re.IGNORECASE
)

# Where a URL's authority (user info, host, port) ends.
_AUTHORITY_END = re.compile(r"[/?#]")


def is_secret_name(name: object) -> bool:
    """Whether an option called ``name`` holds a credential."""
    return isinstance(name, str) and bool(_SECRET_NAME.search(name))


def mask_url(url: str) -> str:
    """``url`` with the password of its user info and secret query values replaced (also in
    a URL written without its scheme, ``user:password@host``, which urlsplit cannot parse)."""
    if "://" not in url and "@" in url:
        userinfo, _, rest = url.rpartition("@")
        return f"{userinfo.split(':', 1)[0]}:{MASK}@{rest}" if ":" in userinfo else url
    scheme, _, rest = url.partition("://")
    authority = _AUTHORITY_END.split(rest, maxsplit=1)[0]
    if ":" in authority and "@" not in authority and "@" in rest:
        # A password with a bare / ? or # (not percent-encoded): urlsplit would end the host
        # part inside it and show the rest. Everything up to the last @ is user info here
        # (at worst an @ in a query is taken for it: more is hidden, never less).
        userinfo, _, tail = rest.rpartition("@")
        masked_tail = mask_url(f"{scheme}://{tail}").partition("://")[2]
        return f"{scheme}://{userinfo.split(':', 1)[0]}:{MASK}@{masked_tail}"
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return scrub(url)
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(name) for name, _ in pairs):
            query = urlencode(
                [(name, MASK if is_secret_name(name) else value) for name, value in pairs],
                safe="*",
                quote_via=quote,
            )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scrub(text: str) -> str:
    """``text`` with ``scheme://user:password@`` credentials replaced wherever they occur."""
    return _USERINFO_IN_TEXT.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def redact(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, strings) with every credential masked."""
    if isinstance(value, str):
        return mask_url(value) if "://" in value or "@" in value else value
    if isinstance(value, Mapping):
        return {
            key: MASK if is_secret_name(key) and item is not None else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def describe_host(host: Any) -> str:
    """One ``hosts`` entry as text for messages, with credentials masked."""
    if isinstance(host, str):
        return mask_url(host)
    if isinstance(host, Mapping) and "sentinels" in host:
        shown = f"sentinels {list(host['sentinels'])} master {host.get('master_name')}"
        rest = {k: v for k, v in host.items() if k not in {"sentinels", "master_name"}}
        return f"{shown} {redact(rest)!r}" if rest else shown
    return repr(redact(host))
