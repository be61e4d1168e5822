"""What a failure looks like to the user: one line on stderr (redacted, capped), and the run that
``mlflow run`` created for the process marked with it.

Three kinds: usage errors (a bad value, a missing file; exit 2), failures of the machine or a
service (a full disk, an unreachable database; exit 1), and the rest, which are bugs and keep
their traceback. Used by :mod:`wavesweep.cli`, the only module that prints.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)
_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.$")
MAX_ERROR_CHARS = 2000  # a value echoed in an error (a huge list from a spec) is cut, not printed whole


def is_mlflow_error(exc: Exception) -> bool:
    """MLflow's own misuse errors (unknown run id, missing artifact) are user errors too."""
    mod = sys.modules.get("mlflow.exceptions")
    return mod is not None and isinstance(exc, mod.MlflowException)


AFTER_CLOSE_TAG = "error_after_close"


def tag_launched_run(run_id: str | None, error: str, status: str = "FAILED") -> None:
    """Record ``error`` on the run ``mlflow run`` created (tag ``error``, status), unless the trial
    code already did; never masks the error being reported.

    A run wavesweep already closed (a study run FINISHED, then a stop or an error while its report
    was written or its best model registered) keeps its status: that records the study or trial,
    which is complete. The error goes in the tag ``error_after_close`` instead."""
    if not run_id:
        return
    try:
        from wavesweep import tracking

        client, _ = tracking.init_tracking(run_id=run_id)
        run = client.get_run(run_id)
        if "error" in run.data.tags:
            return  # recorded where it happened
        if run.info.status != "RUNNING":
            tracking.log_batch(client, run_id, tags={AFTER_CLOSE_TAG: error[:5000]})
        else:
            tracking.close_run(client, run_id, status, error=error, children=False)
    except Exception as exc:  # noqa: BLE001 (the original error is what the user must see)
        logging.getLogger("wavesweep").warning("could not tag run %s with the error: %s", run_id, exc)


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when empty), capped, credentials redacted."""
    from wavesweep.redact import redact

    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    if _WORKER.match(msg):  # torch re-raises a worker's error as "Caught X in DataLoader worker ..." + its traceback
        last = text.splitlines()[-1].strip()
        msg = last.split(": ", 1)[1] if last.startswith(f"{type(exc).__name__}: ") else last
    return _capped(redact(msg))  # redacted whole: a URL cut inside its password would no longer be found


def _capped(text: str) -> str:
    if len(text) > MAX_ERROR_CHARS:
        return f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def error_text(exc: BaseException) -> str:
    """``"Type: message"``: what a run's ``error`` tag and a failed trial's ``error`` attribute
    hold. The message as raised (capped at :data:`MAX_ERROR_CHARS`, credentials redacted), except
    an error torch re-raised from a DataLoader worker, which is the worker's own error (its last
    line, as :func:`one_line` prints it), not "Caught X in DataLoader worker 0" and the worker's
    traceback."""
    from wavesweep.redact import redact

    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if _WORKER.match(text.splitlines()[0]):
        return f"{type(exc).__name__}: {one_line(exc)}"
    return _capped(redact(f"{type(exc).__name__}: {text}"))


def environment_error(exc: BaseException) -> str | None:
    """A failure outside wavesweep that is fixed on the machine, not in the code: a full disk, a
    read-only file system, a database server that cannot be reached or refuses. Its one line, or None; the exception's
    chain is searched (MLflow and SQLAlchemy wrap the ``OSError`` / driver error)."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {str(err.filename)!r}" if err.filename else ""
            return f"no space left on the device{where}: free some space or {_move(err.filename, 'elsewhere')}"
        if isinstance(err, OSError) and err.errno == errno.EROFS:  # a store (or the lock beside it) on a read-only mount
            where = f" {str(err.filename)!r}" if err.filename else ""
            return f"read-only file system: cannot write{where}: {_move(err.filename, 'on a writable file system', 'at a folder on a writable file system')}"
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM) and err.filename:  # a folder of another user
            return (f"permission denied on {str(err.filename)!r}: give yourself access to it, or "
                    f"{_move(err.filename, 'in a folder you may write', 'at a folder you may write')}")  # fmt: skip
        if isinstance(err, FileExistsError) and err.filename and Path(os.fsdecode(err.filename)).is_file():  # a file, not a folder
            return (f"{str(err.filename)!r} is a file where a folder is needed: move it away, or "
                    f"{_move(err.filename, 'elsewhere')}")  # fmt: skip
        sa_exc = sys.modules.get("sqlalchemy.exc")
        if sa_exc is not None and isinstance(err, sa_exc.OperationalError):
            return f"database: {one_line(err.orig if err.orig is not None else err)}"
        err = err.__cause__ or err.__context__
    return None


def _move(filename: Any, where: str, cache_where: str | None = None) -> str:
    """The remedy for a file that could not be written: the cache (base models, base evaluations)
    moves with WAVESWEEP_CACHE, anything else is a store's (MLflow's, Optuna's, a report)."""
    from wavesweep.store import cache_dir

    if filename:
        cache = cache_dir().resolve()
        if cache in Path(os.fsdecode(filename)).resolve().parents:
            return f"point WAVESWEEP_CACHE {cache_where or where} (it is {str(cache)!r})"
    return f"put the store {where}"


@contextlib.contextmanager
def one_value_per_channel(setting: str, batch_size: int, model: Any, examples: int | None = None) -> Iterator[None]:
    """torch's "Expected more than 1 value per channel when training" (a BatchNorm layer over 1x1
    maps, or after a Linear, in a training batch of one) as one line naming the setting to change,
    or, where the training split holds ``examples`` < 2 (every batch is the whole split, whatever
    ``setting`` says), that split."""
    try:
        yield
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        if examples is not None and examples < 2:
            raise ValueError(
                f"the training split holds {examples} example: a BatchNorm layer of {type(model).__name__} sees one "
                f"value per channel in a training batch of {examples} ({str(exc).splitlines()[0]}), whatever "
                f"{setting} is; give it at least 2 training examples"
            ) from None
        raise ValueError(
            f"{setting}={batch_size}: a BatchNorm layer of {type(model).__name__} sees one value per channel in a "
            f"training batch of {batch_size} ({str(exc).splitlines()[0]}); use {setting} >= 2"
        ) from None
