"""The one credential redaction: every param, tag, log message and error wavesweep records or
prints goes through :func:`redact` (tracking's ``log_batch``, the CLI's error line and its
logging filter).

Credentials belong in the environment, not in URLs on a command line: PostgreSQL reads
``~/.pgpass`` and ``PGPASSWORD``/``PGUSER``/... when the URL has no password (see the README).
"""

from __future__ import annotations

import logging
import re

__all__ = ["redact", "remember_password", "RedactingFilter"]

_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):[^@\s'\"/]*@")
# password=, sslpassword=, client_secret=, access_token=, ...
_KEY_CREDENTIALS = re.compile(r"(?P<head>\b\w*(?:password|passwd|pwd|token|secret|api_key)=)[^&\s'\"]+", re.IGNORECASE)
#: passwords of URLs wavesweep was given that the URL pattern does not catch (a '/', quote or space
#: in the password, which SQLAlchemy accepts unencoded): redacted as plain strings wherever they appear
_PASSWORDS: set[str] = set()


def remember_password(password: str | None) -> None:
    """Redact ``password`` (parsed from a URL wavesweep was given, e.g. by SQLAlchemy's ``make_url``)
    from now on wherever it appears, when :func:`redact`'s URL pattern alone would leave it visible."""
    if not password:
        return
    from urllib.parse import quote

    for form in {password, quote(password, safe="")}:
        probe = f"x://u:{form}@h"
        if form not in redact(probe):
            continue  # the pattern already hides it: no plain-string match (which could hit ordinary words)
        _PASSWORDS.add(form)


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
