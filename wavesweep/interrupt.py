"""SIGINT and SIGTERM as one kind of stop: an exception that unwinds, closes runs, and sets the exit code.

``timeout``, Slurm, Kubernetes and ``docker stop`` send SIGTERM; a terminal sends SIGINT. Both raise
in the main thread (``KeyboardInterrupt``, or its subclass ``Terminated`` for SIGTERM), so every
``except KeyboardInterrupt`` cleanup (MLflow runs KILLED with an ``error`` tag, Optuna trials
FAIL) runs for both. Exit codes follow the shell's 128 + signal number: 130 (SIGINT), 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled everywhere a Ctrl-C is (it is a ``KeyboardInterrupt``)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def describe(exc: BaseException) -> str:
    """``SIGTERM`` or ``KeyboardInterrupt``: what stopped the work, for ``error`` tags."""
    return "SIGTERM" if isinstance(exc, Terminated) else "KeyboardInterrupt"


def exit_code(exc: BaseException) -> int:
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """During the block the first SIGINT raises ``KeyboardInterrupt`` and the first SIGTERM raises
    ``Terminated``; later ones are ignored so the cleanup can finish. Outside the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM during the block (cleanup that must not be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
