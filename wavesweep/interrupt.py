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
import traceback
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


_state: dict[str, Any] = {"depth": 0, "signum": None, "caught": False, "cleanup": 0, "block": 0, "held": None, "final": False,
                          "unheld": None}
_STOPS = (signal.SIGINT, signal.SIGTERM)
RESEND_S = 2.0  # a stop that was swallowed (raised inside a GC callback) is raised again after this


def caught(exc: BaseException) -> str:
    """Called by the ``except KeyboardInterrupt`` that cleans up: the stop arrived (no re-raise needed);
    later signals repeat it and are dropped, so the cleanup can finish. Returns ``describe(exc)``."""
    _state["caught"] = True
    # The frames the stop unwound keep their locals while it is handled: a database cursor it cut
    # short (SQLite: a SELECT half read) holds its lock, and the cleanup's writes (runs closed
    # KILLED) waited 20 s for it, twice, and failed, leaving the runs RUNNING. Their locals go now.
    traceback.clear_frames(exc.__traceback__)
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
        if _state["caught"]:
            return  # the stop is being carried out: a repeat of it changes nothing
        if _state["cleanup"]:  # a cleanup in another thread: raised when the main thread's next one ends
            _hold(signum, frame)
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
        _restore(old)


def _hold(signum: int, frame: Any) -> None:
    """The handler while :func:`ignored` holds signals: note the first, raise nothing."""
    if _state["held"] is None:
        _state["held"] = signum


def _restore(old: dict[int, Any]) -> None:
    """Put back the handlers a block replaced, unless the process is exiting after a stop
    (:func:`ignore_until_exit`): then SIGINT and SIGTERM stay ignored."""
    for s, h in old.items():
        signal.signal(s, signal.SIG_IGN if _state["final"] else h)


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block (cleanup that must not be cut short, such as closing
    runs): a signal arriving meanwhile does not interrupt it, and is not lost either. When the
    outermost such block ends, a held signal is raised there as the stop it is (``KeyboardInterrupt``
    or ``Terminated`` inside :func:`stop_signals`), so a stop that lands while a failed or
    early-stopped trial closes its runs stops the work once they are closed, instead of being
    dropped while the study goes on. A signal that only repeats a stop already caught (a second
    Ctrl-C, the terminal's Ctrl-C and the launcher's forwarded copy, a scheduler's second SIGTERM)
    is dropped: that stop is being carried out."""
    _state["cleanup"] += 1
    outermost = _state["cleanup"] == 1
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _hold) for s in _STOPS} if main else {}
    if main and outermost:
        _state["unheld"] = old  # the handlers :func:`allowed` puts back for its block
    try:
        yield
    finally:
        _state["cleanup"] -= 1
        _restore(old)
        if main and outermost:
            _state["unheld"] = None
            held, _state["held"] = _state["held"], None
            if held is not None and not (_state["depth"] and _state["caught"]) and not _state["final"]:
                signal.raise_signal(held)  # the handler now in place raises it (or, outside any block, acts as it would have)


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """Take stops again during the block, inside an :func:`ignored` one: work that handles a stop
    itself (a study's objective: its trial FAIL and marked interrupted, its runs KILLED) inside
    bookkeeping that a stop must not cut (Optuna's, before and after the objective). A stop held
    until the block begins is raised at its start; one during it is raised where it lands; from
    its end stops are held again, until the ignored block ends. Outside an ignored block, or
    outside the main thread: nothing changes."""
    unheld = _state["unheld"]
    if unheld is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    depth, held = _state["cleanup"], _state["held"]
    _state.update(cleanup=0, held=None, unheld=None)
    for s, h in unheld.items():
        signal.signal(s, h)
    try:
        if held is not None and not (_state["depth"] and _state["caught"]) and not _state["final"]:
            signal.raise_signal(held)  # the handler now in place raises it
        yield
    finally:
        _state.update(cleanup=depth, unheld=unheld)
        for s in _STOPS:
            signal.signal(s, signal.SIG_IGN if _state["final"] else _hold)


def ignore_until_exit() -> None:
    """The process exits now that a stop was handled (the console command, a spawned worker): from
    here SIGINT and SIGTERM are ignored, and the blocks that end meanwhile do not put their handlers
    back, so a second signal cannot cut the last writes short or kill the process by the signal
    halfway through its exit; it exits with 130 or 143 as the first stop said."""
    _state["final"] = True
    if threading.current_thread() is threading.main_thread():
        for s in _STOPS:
            signal.signal(s, signal.SIG_IGN)
    _forget_unhandled_interrupt()


def _forget_unhandled_interrupt() -> None:
    """CPython kills a ``python -m`` process (MLproject's commands) with SIGINT at its exit, status
    -2 whatever code it exits with, when a KeyboardInterrupt went unhandled; and it records one as
    unhandled whenever it comes out of code that ``exec()`` or ``eval()`` of a string ran, caught
    later or not (a plain KeyboardInterrupt: Ctrl-C; SIGTERM's ``Terminated`` is not recorded).
    Imports run such code all the time (every dataclass and namedtuple defines its methods so): a
    Ctrl-C landing there was handled (one line, runs KILLED, 130) and then killed the process by
    the signal, unless another such ``exec()`` ran before the exit, as each one clears the record
    before it runs its code. This empty one does that. Called once the stop is handled and the
    signals are ignored: no KeyboardInterrupt can come after it."""
    exec("")  # noqa: S102 - an empty program: its only effect is that reset


@contextlib.contextmanager
def blocked_in_children() -> Iterator[None]:
    """Start processes during the block with SIGINT and SIGTERM blocked: they inherit the signal
    mask, so a stop that reaches one while it starts (a spawned worker imports torch, MLflow and
    Optuna for seconds before its handlers are in place) stays pending until it calls
    :func:`unblock` inside its :func:`stop_signals`, instead of raising a KeyboardInterrupt traceback
    out of an import. This thread's mask is restored at the end. Main thread, POSIX only."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import resource_tracker

    # multiprocessing starts its resource tracker with the first process and unblocks SIGINT and
    # SIGTERM in this thread once it has: started before the block, it leaves the block alone
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock() -> None:
    """Unblock SIGINT and SIGTERM in this thread (a process started by :func:`blocked_in_children`):
    a stop that arrived while it started is delivered now, to the handlers in place."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
