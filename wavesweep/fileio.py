"""The one way wavesweep writes a file and takes a lock.

``atomic_write``: readers see either no file or the complete one (temporary file in the same
folder, fsync, ``os.replace``; the temporary file is removed on any error, and one left by a
process killed outright is removed by a later write of the same file).
``file_lock``: an exclusive ``fcntl`` lock on a lock file, for the duration of a block (or until
the ``release`` function it yields is called).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Who writes an :func:`atomic_write` temporary file, in its name: this host and process (its pid). A process
#: killed outright (kill -9, out of memory) leaves its file behind (a base model's is 45-100 MB); a
#: later write of the same file on the same host removes it once that process is gone.
_HOST = "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:64] or "host"
#: An orphan must also be this old (seconds since its last write): a process of another PID
#: namespace on this host (a container sharing the folder and the host name) is not seen alive.
ORPHAN_AGE_S = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_orphans(path: Path) -> None:
    """Remove the temporary files of earlier writes of ``path`` whose writer (a process of this
    host, named in the file's name) is gone and which nothing has written to for
    :data:`ORPHAN_AGE_S`. Files of other hosts, of live processes, and of other names stay."""
    prefix = f".{path.name}.{_HOST}-"
    now = time.time()
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid, _, rest = name[len(prefix):].partition(".")
        if not pid.isdigit() or not rest or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        orphan = path.parent / name
        with contextlib.suppress(OSError):
            if now - orphan.stat().st_mtime >= ORPHAN_AGE_S:
                orphan.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` "wb" or "w"); on a clean exit
    of the block it is flushed, fsynced and renamed to ``path``. The file's mode is 0666 less
    the umask (0644 under the usual umask), as ``open`` would give, not mkstemp's 0600.

    A write that fails with an ``OSError`` naming no file (a full disk under ``torch.save``,
    ``np.savez`` or a flush: the error holds only the errno) is raised again as that ``OSError``
    with ``path`` as its filename, so the one-line message says which file did not fit."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode {mode!r} is not one of wb, w")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; a written file gets the usual mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _unnamed_os_error(exc)
        if cause is not None:
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise


def _unnamed_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` with an errno and no filename that ``exc`` is or wraps (torch's writer raises
    a RuntimeError from it), or None; any other exception (a stop, a ValueError) is left as it is."""
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err if err.filename is None else None
        err = err.__cause__ or err.__context__
    return None


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file that stops ``folder`` from being made: the nearest of it and its parents that
    exists, when that is not a folder (the rest would be created); None when nothing is in the way."""
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[Callable[[], None]]:
    """Hold an exclusive lock on ``path`` (created, with its folder, if absent) during the block.

    Works across processes on one machine (``fcntl.flock``). The block receives ``release``, a
    function that lets the lock go early (calling it again does nothing); otherwise the lock is
    released when the block ends or the process dies. ``on_wait()`` is called once, before
    waiting, when another process holds the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

        try:
            yield release
        finally:
            release()
