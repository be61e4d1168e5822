"""SIGINT and SIGTERM as one kind of stop: an exception that unwinds, closes runs, and sets the exit code.

``timeout``, Slurm, Kubernetes and ``docker stop`` send SIGTERM; a terminal sends SIGINT. Both raise
in the main thread (``KeyboardInterrupt``, or its subclass ``Terminated`` for SIGTERM), so every
``except KeyboardInterrupt`` cleanup (MLflow runs KILLED with an ``error`` tag, Optuna trials
FAIL) runs for both. Exit codes follow the shell's 128 + signal number: 130 (SIGINT), 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
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


_state: dict[str, Any] = {"depth": 0, "signum": None, "caught": False, "cleanup": 0, "block": 0}
RESEND_S = 2.0  # a stop that was swallowed (raised inside a GC callback) is raised again after this


def caught(exc: BaseException) -> str:
    """Called by the ``except KeyboardInterrupt`` that cleans up: the stop arrived (no re-raise needed);
    later signals are ignored so the cleanup can finish. Returns ``describe(exc)``."""
    _state["caught"] = True
    return describe(exc)


def stop_pending() -> bool:
    """Whether a stop (SIGINT, SIGTERM) arrived in the current :func:`stop_signals` block."""
    return bool(_state["depth"]) and _state["signum"] is not None


def _resend(signum: int, block: int) -> None:
    """Python runs a signal handler between any two bytecodes, also inside a weakref or ``__del__``
    callback, where the raised exception is printed and dropped ("Exception ignored in ...").
    Until some ``except`` has ``caught`` the stop, deliver the signal again: within the block it
    arrived in only (a later block of the same process is another piece of work, not this stop)."""

    def same_stop() -> bool:
        return _state["block"] == block and bool(_state["depth"]) and not _state["caught"]

    while same_stop():
        time.sleep(RESEND_S)
        if same_stop() and not _state["cleanup"]:
            os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """During the block SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises ``Terminated``, until
    an ``except`` calls ``caught``; later ones are then ignored so the cleanup can finish. Outside the
    main thread: no-op. Nested blocks share the outermost one's state."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _state["caught"] or _state["cleanup"]:
            return
        if _state["signum"] is None:
            _state["signum"] = signum
            threading.Thread(target=_resend, args=(signum, _state["block"]), daemon=True, name="wavesweep-resend-signal").start()
        raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt

    def quiet_unraisable(unraisable: Any) -> None:
        # A stop raised inside a GC/weakref callback is dropped by Python and re-sent by _resend:
        # it is not an error worth a traceback on stderr. Everything else is printed as usual.
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and not _state["caught"]:
            return
        previous_hook(unraisable)

    if _state["depth"] == 0:
        _state.update(signum=None, caught=False, cleanup=0, block=_state["block"] + 1)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = quiet_unraisable
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        sys.unraisablehook = previous_hook
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM during the block (cleanup that must not be cut short)."""
    _state["cleanup"] += 1
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        _state["cleanup"] -= 1
        for s, h in old.items():
            signal.signal(s, h)
