"""Secrets out of everything dreamd writes: the store URL's password never reaches the store
(runs.config_json), a checkpoint's dreamd.toml, a log line or an error message.

    redact_url("postgresql+psycopg://dreamd:p@ss@db:5432/runs")  # 'postgresql+psycopg://dreamd:***@db:5432/runs'
    quote_userinfo("postgresql://dreamd:p@ss@db/runs")           # 'postgresql://dreamd:p%40ss@db/runs'

The user part of a URL ends at the LAST '@' before the host: a raw '@' in a password (which
RFC 3986 wants percent-encoded) is taken as part of the password, so neither its tail nor a
wrong host is shown. Query-string secrets (`?password=...`, psycopg's conninfo keys) are
replaced too. Keep passwords out of the URL altogether with libpq's own files: PGPASSFILE (or
~/.pgpass) and PGPASSWORD work unchanged (docs/operations.md, "Secrets").
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_SECRET_PARAMS = re.compile(r"(?i)([?&](?:password|passwd|sslpassword|sslkey)=)[^&]*")


def _split(url: str) -> tuple[str, str | None, str, str] | None:
    """(scheme://, userinfo or None, host part, rest) or None for a URL without '://'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    end = len(rest)
    for stop in ("/", "?"):
        # the authority ends at the first '/' or '?' AFTER the last '@' (a password may hold both)
        at = rest.rfind("@")
        i = rest.find(stop, at + 1)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    at = authority.rfind("@")
    if at == -1:
        return scheme + sep, None, authority, tail
    return scheme + sep, authority[:at], authority[at + 1:], tail


def redact_url(url: object) -> str:
    """The URL as it may be shown and stored: password and secret query values as ***."""
    text = str(url)
    parts = _split(text)
    if parts is None:
        return _SECRET_PARAMS.sub(r"\1***", text)
    head, userinfo, host, tail = parts
    if userinfo is not None and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    auth = f"{userinfo}@" if userinfo is not None else ""
    return head + auth + host + _SECRET_PARAMS.sub(r"\1***", tail)


def quote_userinfo(url: str) -> str:
    """The URL with its user and password percent-encoded (a raw '@', ':' or '/' in a password
    then parses as the password); an already encoded one is left as it is."""
    parts = _split(url)
    if parts is None or parts[1] is None:
        return url
    head, userinfo, host, tail = parts
    user, colon, password = userinfo.partition(":")
    enc = lambda s: quote(unquote(s), safe="")  # noqa: E731
    return f"{head}{enc(user)}{':' + enc(password) if colon else ''}@{host}{tail}"
