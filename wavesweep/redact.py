"""The one credential redaction: every param, tag, log message and error wavesweep records or
prints goes through :func:`redact` (tracking's ``log_batch``, the CLI's error line and its
logging filter).

Credentials belong in the environment, not in URLs on a command line: PostgreSQL reads
``~/.pgpass`` and ``PGPASSWORD``/``PGUSER``/... when the URL has no password (see the README).
"""

from __future__ import annotations

import logging
import re

__all__ = ["redact", "RedactingFilter"]

_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):[^@\s'\"/]*@")
_KEY_CREDENTIALS = re.compile(r"(?P<head>\b(?:password|passwd|pwd|token|secret|api_key)=)[^&\s'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``***``: the password of every ``scheme://user:password@``
    URL and ``password=...``-style query values. The one redaction used for every param, tag,
    log message and error wavesweep records or prints."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
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
