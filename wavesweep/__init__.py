"""wavesweep: prune trained networks in the wavelet domain, by magnitude and at random,
at the same budget, and report the truth about the result."""

import hashlib as _hashlib
from pathlib import Path as _Path

__version__ = "0.1.0"


def _source_digest(package: _Path) -> str:
    """The first 12 hex digits of the sha256 over the package's ``.py`` files: each file's path
    relative to ``package`` (POSIX form, sorted) and its bytes. Hidden names (an editor's lock file
    ``.#stats.py``, a dangling link) and anything but a regular file are not source; a file that
    cannot be read counts by its name alone, never stopping the import."""
    h = _hashlib.sha256()
    files = [f for f in package.rglob("*.py") if not any(part.startswith(".") for part in f.relative_to(package).parts)]
    for rel in sorted(f.relative_to(package).as_posix() for f in files if f.is_file()):
        try:
            data = (package / rel).read_bytes()
        except OSError:
            data = b"(unreadable)"
        h.update(rel.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:12]


#: the digest of the source this process imported wavesweep from, taken as the package is first
#: imported (an edit saved later is not what runs): part of ``tracking.code_version()``
SOURCE_DIGEST = _source_digest(_Path(__file__).resolve().parent)
