"""The one credential redaction: every param, tag, log message and error wavesweep records or
prints goes through :func:`redact` (tracking's ``log_batch``, the CLI's error line and its
logging filter).

Credentials belong in the environment, not in URLs on a command line: PostgreSQL reads
``~/.pgpass`` and ``PGPASSWORD``/``PGUSER``/... when the URL has no password (see the README).
"""

from __future__ import annotations

import logging
import re

__all__ = ["redact", "remember_password", "remember_url_credentials", "RedactingFilter"]

_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):[^@\s'\"/]*@")
# password=, sslpassword=, client_secret=, access_token=, ...
_KEY_CREDENTIALS = re.compile(r"(?P<head>\b\w*(?:password|passwd|pwd|token|secret|api_key)=)[^&\s'\"]+", re.IGNORECASE)
#: passwords of URLs wavesweep was given that the URL pattern does not catch (a '/', quote or space
#: in the password, which SQLAlchemy accepts unencoded): redacted as plain strings wherever they appear
_PASSWORDS: set[str] = set()


def remember_password(password: str | None, probe: str = "x://u:{}@h") -> None:
    """Redact ``password`` (parsed from a URL wavesweep was given, e.g. by SQLAlchemy's ``make_url``)
    from now on wherever it appears, when :func:`redact`'s patterns alone would leave it visible in
    ``probe`` (where it stood: a URL's userinfo, or a query value)."""
    if not password:
        return
    from urllib.parse import quote, quote_plus

    for form in {password, quote(password, safe=""), quote_plus(password)}:
        if redact(probe.format(form)) == probe.format("***"):
            continue  # the patterns already hide it whole: no plain-string match (which could hit ordinary words)
        _PASSWORDS.add(form)


#: a URL's password as SQLAlchemy's ``make_url`` reads it: after ``user:``, up to the first ``@``
_USERINFO_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*:(?P<password>[^@]*)@")
_SECRET_KEY = re.compile(r"(?:password|passwd|pwd|token|secret|api_key)$", re.IGNORECASE)


def remember_url_credentials(url: object) -> None:
    """Remember (:func:`remember_password`) the secrets of a URL wavesweep was given (a tracking
    URI, a storage URL), parsed as a database driver reads them, before anything prints it: its
    password, even one with a ``/``, quote or space that the URL pattern misses, and the values of
    ``password=``-style query parameters, spaces and quotes included. A URL that does not parse
    keeps its secrets hidden all the same."""
    if not isinstance(url, str) or "://" not in url:
        return
    if (m := _USERINFO_PASSWORD.match(url)) is not None:
        remember_password(m["password"])
    _scheme, _, rest = url.partition("://")
    if "?" in rest:
        from urllib.parse import parse_qsl

        for key, value in parse_qsl(rest.split("?", 1)[1], keep_blank_values=False):
            if _SECRET_KEY.search(key):
                remember_password(value, probe="x://h/d?" + key + "={}")


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``: the password of every ``scheme://user:password@``
    URL, ``password=...``-style query values, and passwords recorded by :func:`remember_password`.
    The one redaction used for every param, tag, log message and error wavesweep records or prints."""
    if not isinstance(text, str):
        return text
    for password in sorted(_PASSWORDS, key=len, reverse=True):
        text = text.replace(password, "***")
    if "@" not in text and "=" not in text:
        return text
    return _KEY_CREDENTIALS.sub(r"\g<head>***", _URL_CREDENTIALS.sub(r"\g<head>:***@", text))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts credentials in every record's message (installed by the CLI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True
