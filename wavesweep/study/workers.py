"""Running a study: worker processes, the slot lock, Ctrl-C/SIGTERM handling, the progress bar, resume.

Counting and resume: ``n_trials`` is the study's total of COMPLETE and PRUNED trials. A launch
runs only the missing ones; FAIL trials (errors, Ctrl-C, SIGTERM, lost workers) do not count and
are replaced. Interrupted trials and trials of dead workers are retried with the same params
(``storage.requeue_failed``, Optuna's retry callback; a failed grid point always is). Workers on one
machine take a file lock around "count, then create a trial", so the total is exact; workers on
other machines sharing an RDB re-check their trial's rank right after creating it and give it up
(FAIL, ``surplus=true``, no MLflow run) in the rare case of overshoot. RDB storages (SQLite,
PostgreSQL) run Optuna heartbeats: a RUNNING trial whose worker died (kill -9) is failed after the
grace period and re-queued, and a launch waits for it rather than stopping short. A launch ends
with the total reached, or says how many trials are missing (``StudyOutcome.missing``).

Sampler seeds: every launcher (and every worker in it) seeds its sampler with the spec's seed
mixed with a random per-process salt, recorded as the trial user attribute ``sampler_seed``, so
independent launchers on several machines do not propose the same configurations. ``--sampler-seed``
gives a launch's seed as is (worker i: seed + i), for a study to be repeated exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import re
import secrets
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from wavesweep import interrupt, tracking
from wavesweep.failures import environment_error, error_text
from wavesweep.fileio import file_lock
from wavesweep.store import sqlite_file
from wavesweep.study.frame import best_trial, study_metrics
from wavesweep.study.objective import COUNTED, objective
from wavesweep.study.spec import StudySpec
from wavesweep.study.storage import (
    DEFAULT_STORAGE, check_storage_url, has_heartbeat, load_study, open_storage, open_study, requeue_failed,
)  # fmt: skip

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often an idle worker / the progress bar re-reads the storage


@dataclass
class Launch:
    """What every worker of one launch needs (picklable: sent to spawned workers)."""

    spec: StudySpec
    storage_url: str
    n_trials: int | None
    timeout: float | None
    parent_run_id: str
    experiment: str | None
    lock_path: Path
    workers: int = 1
    quiet: bool = False
    seed: int = 0  # this launch's sampler seed (worker i uses seed + i)
    t0: float = field(default_factory=time.time)


def launch_seed(spec_seed: int) -> int:
    """The spec's seed mixed with a random salt: launchers never share a sampler stream."""
    return (spec_seed * 1_000_003 + secrets.randbits(30)) % (2**31 - 1)


def max_workers() -> int:
    """The most worker processes one launch may start here: this machine's CPU cores (at least 2).
    Each is a process with its own torch, data and model (hundreds of MB) sharing those cores
    (torch threads: cores // workers), so more only slow it down; a typo (``--workers 1000``)
    must not start a thousand of them."""
    return max(2, os.cpu_count() or 1)


def check_workers(workers: Any) -> int:
    """``workers`` as an integer in 1..max_workers(), else a one-line ``ValueError`` naming it."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers={workers!r} must be an integer >= 1 (worker processes on this machine)")
    if workers > (top := max_workers()):
        raise ValueError(f"--workers={workers} is above the limit of {top} here (worker processes on this machine, "
                         f"at most one per CPU core: {os.cpu_count()})")  # fmt: skip
    return workers


def check_sampler_seed(seed: Any, workers: int = 1) -> int:
    """``seed`` when it is an integer whose workers' seeds (seed + i) are valid sampler seeds."""
    top = 2**31 - 1 - (workers - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
        raise ValueError(f"--sampler-seed={seed!r} must be an integer in 0..{top}"
                         + (f" (worker i uses it + i, {workers} workers)" if workers > 1 else ""))  # fmt: skip
    return seed


class _DropInterruptTracebacks(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C/SIGTERM with a traceback, then "Trial N failed with
    value None."; the CLI says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        msg = record.getMessage()
        if interrupt.stop_pending() and _FAILED_WITH_NONE.fullmatch(msg):
            return False
        return not isinstance(exc, KeyboardInterrupt) and "KeyboardInterrupt" not in msg and "Terminated(" not in msg


_FAILED_WITH_NONE = re.compile(r"Trial \d+ failed with value None\.?")


def quiet_optuna(quiet: bool) -> None:
    """Optuna's own logging: warnings (``quiet``: errors only), never an interrupt's traceback."""
    optuna.logging.set_verbosity(optuna.logging.ERROR if quiet else optuna.logging.WARNING)
    for h in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _DropInterruptTracebacks) for f in h.filters):
            h.addFilter(_DropInterruptTracebacks())


def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
    done = sum(t.state in COUNTED for t in trials)
    return done, len(trials) - done


def _worker_loop(launch: Launch, index: int, on_trial: Any = None) -> None:
    """Run trials until the study has ``n_trials`` counted trials, the timeout passes, or too many fail.

    Without heartbeats (a journal file) a RUNNING trial of another process may belong to a dead
    worker and is never waited for: the loop returns and the launch reports the shortfall.
    """
    quiet_optuna(launch.quiet)
    storage = open_storage(launch.storage_url)
    seed = launch.seed + index
    study = load_study(launch.spec, storage, seed=seed, workers=launch.workers)
    heartbeat = has_heartbeat(storage)
    failures = 0
    while True:
        if launch.timeout is not None and time.time() - launch.t0 >= launch.timeout:
            log.info("worker %d: timeout reached", index)
            return
        finished: list[optuna.trial.FrozenTrial] = []
        # The slot lock is held from "count the trials" until the new trial exists (the objective
        # releases it), so workers on this machine never start more than n_trials.
        with file_lock(launch.lock_path) as release:
            if heartbeat:
                # Under the lock, as every other call is: on SQLite nothing makes Optuna's "read the
                # state, write FAIL" atomic, so workers that found one lost trial at once each failed
                # it and each re-queued it, and its configuration ran once per worker.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, MLflow FAILED, re-queued
            # another worker's or launcher's trial stopped by Ctrl-C or SIGTERM while this one runs on:
            # queued again here (a failed grid point at once: Optuna's grid counts it as visited and
            # would end the study with it never run; a relaunch then found nothing missing)
            _requeue_others(study, launch)
            if launch.n_trials is not None:
                done, running = _counts(study)
                if done >= launch.n_trials:
                    return
                if done + running >= launch.n_trials:
                    release()
                    if not heartbeat:
                        return  # cannot tell a dead worker's trial from a live one: run_study reports it
                    time.sleep(POLL_S)  # others are running the last trials (or are dead: heartbeat)
                    continue

            def func(trial: optuna.Trial, release: Any = release) -> Any:
                try:
                    with interrupt.allowed():  # a stop is taken here, where the objective handles it
                        trial.set_user_attr("sampler_seed", seed)  # recorded: which stream proposed this trial
                        return objective(trial, spec=launch.spec, n_trials=launch.n_trials, parent_run_id=launch.parent_run_id,
                                         experiment=launch.experiment, release_slot=release)  # fmt: skip
                except KeyboardInterrupt:  # also one held until the objective began: its trial is retried
                    trial.set_user_attr("interrupted", True)
                    raise

            # Stops are held during Optuna's bookkeeping of the trial and taken inside the objective
            # (or after optimize returns). One landing in study.ask() left the trial it had created
            # RUNNING with no heartbeat: never found lost, waited for by the study's later launches
            # for ever. One landing as the trial's heartbeat thread started skipped the `with` exit
            # that stops it: the thread ran for ever and the process, exiting, waited for it.
            with interrupt.ignored():
                study.optimize(func, n_trials=1, catch=(Exception,), callbacks=[lambda _s, t: finished.append(t)])
        last = finished[-1]
        if last.state == TrialState.FAIL and not last.user_attrs.get("surplus"):
            log.warning("trial %d failed: %s", last.number, last.user_attrs.get("error", "?"))
            failures += 1
            if failures >= launch.spec.max_failures:
                raise RuntimeError(f"{failures} consecutive trials failed; last: {last.user_attrs.get('error', '?')}")
            if launch.spec.sampler == "grid":
                # Optuna's grid counts a failed point as visited and, once the others are taken, would
                # run a visited one again in its place: the failed point is queued again now (its
                # grid_id kept), so the grid is covered once (a point that keeps failing stops the
                # launch after max_failures)
                with file_lock(launch.lock_path):
                    if (k := requeue_failed(study, launch.spec, limit=None)):
                        log.info("re-queued failed grid point(s) %s with their params", k)
        elif last.state != TrialState.FAIL:
            failures = 0
        if on_trial is not None:
            on_trial(study)


def _requeue_others(study: optuna.Study, launch: Launch) -> None:
    """Queue again the retriable FAIL trials no trial retries yet (``storage.requeue_failed``): every
    failed grid point, and the interrupted trials of any sampler, at most as many as the launch still
    misses. Called under the slot lock, as the launch's own re-queue is."""
    limit = None
    if launch.spec.sampler != "grid" and launch.n_trials is not None:
        done, running = _counts(study)
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        limit = max(0, launch.n_trials - done - running - waiting)
    if (k := requeue_failed(study, launch.spec, limit=limit)):
        log.info("re-queued trial(s) %s that failed or were stopped in another process, with their params", k)


def _stop_with_launcher() -> None:
    """Linux: SIGTERM this spawned worker when its launcher dies (``kill -9`` of the launcher's pid
    alone, the OOM killer): it closes its trial KILLED, as a stop of the launcher does, instead of
    running on, orphaned, for a launch that is gone. Elsewhere nothing is set."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    launcher = parent.pid
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(launch: Launch, index: int) -> None:
    """Entry point of a spawned worker process."""
    import torch

    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s worker{index} %(name)s: %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.workers))
    try:
        with interrupt.stop_signals():
            try:
                interrupt.unblock()  # started with SIGINT/SIGTERM blocked: a stop that came meanwhile is raised here
                _stop_with_launcher()
                _worker_loop(launch, index)
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the trial is closed (FAIL / KILLED)
                _worker_stopped(exc)
    except KeyboardInterrupt as exc:
        _worker_stopped(exc)
    except RuntimeError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


def _worker_stopped(exc: KeyboardInterrupt) -> None:
    """Exit 130 or 143; a repeat of the stop (the terminal's Ctrl-C and the launcher's forwarded
    copy) is ignored until the worker has, not killing it by the signal on its way out."""
    interrupt.caught(exc)
    interrupt.ignore_until_exit()
    raise SystemExit(interrupt.exit_code(exc)) from None


class _Progress:
    """tqdm bar over the study's counted trials, with the best value so far (named as the value is:
    val_top1 when trials select on their validation part).

    It starts at the count already in the study (a resume), so its rate and ETA come from this
    launch's trials only.
    """

    def __init__(self, spec: StudySpec, total: int | None, enabled: bool, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.spec = spec
        self.bar = tqdm(total=total, initial=initial, desc=f"study {spec.name}", unit="trial", disable=not enabled,
                        dynamic_ncols=True)  # fmt: skip

    def __call__(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state in COUNTED]
        post = {"pruned": sum(t.state == TrialState.PRUNED for t in trials), "failed": sum(t.state == TrialState.FAIL for t in trials)}
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        if complete and len(self.spec.objectives) == 1:
            best = max if self.spec.directions[0] == "maximize" else min
            # the value is the selection metric (val_top1 with a validation part), not the objective's test score
            post[f"best {self.spec.selection_metrics[0]}"] = f"{best(t.value for t in complete):.4f}"
        elif complete:  # Pareto-optimal configurations: a repeat (repeat_of) is its original's, counted once
            post["pareto"] = sum("repeat_of" not in t.user_attrs for t in study.best_trials)
        self.bar.set_postfix(post, refresh=False)
        if len(done) > self.bar.n:
            self.bar.update(len(done) - self.bar.n)  # update(), not n = ...: tqdm's rate needs the increments
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run_workers(launch: Launch, progress: _Progress) -> int:
    """This process is worker 0; ``launch.workers - 1`` more are spawned. Returns how many gave up.

    Ctrl-C reaches every process of the terminal's group; Ctrl-C or SIGTERM received here is
    also forwarded once to the spawned workers (a worker already stopping ignores the repeat), so
    each closes its running trial (Optuna FAIL, MLflow KILLED) before exiting. A worker killed outright (kill -9)
    does not count as giving up: its trial is failed and re-queued by the heartbeat.
    """
    import torch

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads and DB handles
    procs = [ctx.Process(target=_worker_main, args=(launch, i), name=f"wavesweep-worker{i}") for i in range(1, launch.workers)]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.workers))
    gave_up = 0
    try:
        with interrupt.stop_signals():
            # A worker imports for seconds before its handlers are in place: it starts with the stop
            # signals blocked and takes one that came meanwhile once they are (exit 130/143, one line).
            with interrupt.blocked_in_children():
                for p in procs:
                    p.start()
            try:
                _worker_loop(launch, 0, on_trial=progress)
            except RuntimeError as exc:
                log.error("worker 0: %s", exc)
                gave_up += 1
            study = optuna.load_study(study_name=launch.spec.name, storage=open_storage(launch.storage_url))
            while any(p.is_alive() for p in procs):  # the others finish their last trials
                for p in procs:
                    p.join(timeout=POLL_S / len(procs))
                progress(study)
    except KeyboardInterrupt as exc:
        what = interrupt.caught(exc)
        with interrupt.ignored():  # let the workers close their trials undisturbed
            _stop_workers(procs, signal.SIGTERM if isinstance(exc, interrupt.Terminated) else signal.SIGINT, why=what)
        raise
    except Exception:
        # Worker 0 (this process) failed outside a trial: its storage or tracking store gone, full or
        # read-only. The launch has failed: the spawned workers are stopped as a SIGTERM stops them
        # (their trials closed KILLED, re-queued by the next launch), not left running trials under
        # a study run closed FAILED, with this process waiting for them at exit.
        with interrupt.ignored():
            _stop_workers(procs, signal.SIGTERM)
        raise
    finally:
        torch.set_num_threads(threads)
    for p in procs:
        if p.exitcode is not None and p.exitcode < 0:
            log.warning("worker %s was killed by signal %d; its trial is re-run after the heartbeat grace period", p.name, -p.exitcode)
    return gave_up + sum(p.exitcode == 1 for p in procs)


def _stop_workers(procs: list[Any], sig: int, why: str = "") -> None:
    """Send ``sig`` once to the spawned workers still alive and wait for them to close their trials.
    With ``why`` (a stop: Ctrl-C or SIGTERM), say so in one line while they do: closing a trial
    (Optuna FAIL, MLflow KILLED) takes seconds, and the terminal would otherwise look hung."""
    procs = [p for p in procs if p.pid is not None]  # a stop while they were started: some never were
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)
    if why and alive:
        n = len(alive)
        log.warning("%s: waiting for %d spawned worker%s to stop (a running trial is closed: Optuna FAIL, MLflow KILLED; "
                    "the next launch retries it)", why, n, "s" if n > 1 else "")
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()


def _reconcile_mlflow(study: optuna.Study, client: Any) -> None:
    """Trials failed without their process closing the MLflow run (a killed worker): close it
    FAILED. A run FINISHED beside a FAIL trial (a worker killed while recording a finished trial
    in Optuna) is retracted the same way, its children too: the trial is retried, and its first
    run must not count beside the retry's."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        rid = t.user_attrs.get("mlflow_run_id")
        status = tracking.run_status(client, rid) if rid else None
        if status == "RUNNING":
            tracking.close_run(client, rid, "FAILED", error="trial failed in Optuna; its worker is gone", tags={"optuna.state": "FAIL"})
        elif status == "FINISHED":
            tracking.close_run(client, rid, "FAILED", error="trial failed in Optuna after its run finished (its worker stopped "
                               "while recording it); retracted", tags={"optuna.state": "FAIL"}, finished_too=True)  # fmt: skip


@dataclass
class StudyOutcome:
    study: optuna.Study
    run_id: str  # the study's MLflow run
    status: str  # FINISHED (n_trials reached or timeout) or FAILED (a launch gave up or fell short)
    reason: str = ""
    missing: int = 0  # counted trials still missing from n_trials (0 when reached, or with no n_trials)
    running: int = 0  # trials still RUNNING when this launch ended (other launchers')
    timed_out: bool = False

    @property
    def final(self) -> bool:
        """True when nothing is still running: the summary is the study's, not a partial view."""
        return self.running == 0


STUDY_RUN_WAIT_S = 60.0  # how long a launcher waits for the study run of the launcher that created the study


def _recorded_study_run(study: optuna.Study, created: bool) -> str | None:
    """The study's MLflow run id as recorded in the study (``None``: this launch opens one).

    Launchers started at once on a fresh study: the one that created it opens the study run and
    records it before any trial exists; the others wait for it here, or each would open a study
    run of its own and nest its trials there. A study that has trials but no run recorded (made
    outside wavesweep) is not waited for, nor one whose creator recorded none in
    ``STUDY_RUN_WAIT_S`` (it failed or was stopped before).
    """
    rid = study.user_attrs.get("mlflow_run_id")
    if rid or created:
        return rid
    end = time.monotonic() + STUDY_RUN_WAIT_S
    while not study.get_trials(deepcopy=False):
        if time.monotonic() >= end:
            log.warning("study %s: the launcher that created it recorded no MLflow study run in %.0f s: this launch opens one",
                        study.study_name, STUDY_RUN_WAIT_S)  # fmt: skip
            return None
        time.sleep(0.5)
        if rid := study.user_attrs.get("mlflow_run_id"):
            return rid
    return study.user_attrs.get("mlflow_run_id")


def _others_running(study: optuna.Study, storage: Any) -> int:
    """How many trials other launchers are running now, once this launch has stopped its own
    (they are FAIL by then): RUNNING trials whose heartbeat is alive (a dead launcher's are failed
    first). 0 in a storage without heartbeats (a journal file), where a dead worker's trial cannot be
    told from a live one; 0 if the storage cannot be read (the study run is then closed)."""
    try:
        if not has_heartbeat(storage):
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    except Exception as exc:  # noqa: BLE001 - closing the study run must not fail on it
        log.debug("could not count the running trials: %s", exc)
        return 0


def check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} must be a positive, finite number of seconds")
    return float(timeout)


def enqueue(study: optuna.Study, configs: list[dict[str, Any]]) -> int:
    """Queue chosen configurations (``{space name: value}``) to run first; ones the study has are skipped."""
    before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    for params in configs:
        study.enqueue_trial(params, skip_if_exists=True)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) - before


def run_study(
    spec: StudySpec,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    workers: int = 1,
    progress: bool = False,
    launched_run_id: str | None = None,
    quiet: bool = False,
    enqueue_configs: list[dict[str, Any]] | None = None,
    requeue_running: bool = False,
    sampler_seed: int | None = None,
) -> StudyOutcome:
    """Run (or resume) ``spec``; returns the study, the study's MLflow run id and the final status.

    Status: "FINISHED" (n_trials reached, or the timeout), "FAILED" (a worker gave up after
    ``max_failures`` consecutive failures, or the total cannot be reached: ``missing`` says by how
    many). KeyboardInterrupt (Ctrl-C, or ``interrupt.Terminated`` for SIGTERM) propagates after
    the running trials were closed (Optuna FAIL, MLflow KILLED) and the study run KILLED.
    ``launched_run_id``: the run ``mlflow run -e study`` created (it fixes the experiment).
    ``enqueue_configs``: configurations (``{space name: value}``) to run before sampled ones.
    ``requeue_running``: the caller knows that no launcher is running (a journal file has no
    heartbeats to tell): every RUNNING trial is failed, its MLflow run closed FAILED, and it is
    re-queued with the same params like any lost trial.
    ``sampler_seed``: this launch's sampler seed as given, not salted (worker i uses it + i): the
    same study launched afresh with the same seed, one worker, proposes the same configurations.
    """
    check_workers(workers)
    if sampler_seed is not None:
        check_sampler_seed(sampler_seed, workers)
    n_total = n_trials if n_trials else spec.total_trials
    if spec.sampler == "grid" and n_total and n_total > spec.grid_size():
        raise ValueError(f"n_trials={n_total} exceeds the grid's {spec.grid_size()} points")
    timeout = check_timeout(timeout) if timeout is not None else spec.timeout
    if n_total is None and timeout is None:
        raise ValueError("give n_trials or timeout")
    url = storage or spec.storage or DEFAULT_STORAGE
    check_storage_url(url)  # a bad URL stops here with one line, before anything is created
    quiet_optuna(quiet)
    # Databases first (MLflow store, Optuna schema and study), then workers.
    experiment = None if launched_run_id else spec.experiment
    client, exp_id = tracking.init_tracking(experiment=experiment, run_id=launched_run_id)
    opened = open_storage(url)  # kept: a study has no public handle on its storage (heartbeats below)
    study, created = open_study(spec, url, opened)
    parent = tracking.start_study_run(
        client, exp_id, study_name=spec.name, storage=url, spec_file=spec.path, spec_text=spec.text,
        params=spec.summary_params(), existing_run_id=_recorded_study_run(study, created), launched_run_id=launched_run_id,
    )  # fmt: skip
    # From here the study run exists: a stop anywhere up to its closing (setup, the trials, the
    # summary after them) closes it KILLED, so no launch leaves it RUNNING.
    closed = False
    try:
        if study.user_attrs.get("mlflow_run_id") != parent:
            study.set_user_attr("mlflow_run_id", parent)
        # The trials go where the study run is: a resumed study run keeps its experiment, whatever
        # this launch's $MLFLOW_EXPERIMENT_NAME or `mlflow run --experiment-name` says (MLflow nests
        # a run under its parent only within one experiment).
        parent_exp = client.get_experiment(client.get_run(parent).info.experiment_id).name
        if parent_exp != (asked := client.get_experiment(exp_id).name):
            log.warning("study %s: its MLflow run %s is in experiment %r, not %r: its trials go there too", spec.name, parent,
                        parent_exp, asked)  # fmt: skip
        experiment = parent_exp
        db = sqlite_file(url)
        lock_dir = db.parent if db is not None else Path(".wavesweep")
        launch = Launch(
            spec=spec, storage_url=url, n_trials=n_total, timeout=timeout, parent_run_id=parent, experiment=experiment,
            lock_path=(lock_dir / f".{spec.name}.slots.lock").resolve(), workers=workers, quiet=quiet,
            seed=launch_seed(spec.seed) if sampler_seed is None else sampler_seed,
        )  # fmt: skip
        if sampler_seed is None:
            log.info("study %s: sampler seed %d (spec seed %d mixed with a per-launch salt)", spec.name, launch.seed, spec.seed)
        with file_lock(launch.lock_path):  # not while a worker on this machine is counting
            if has_heartbeat(opened):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)  # a killed launch's trials: FAIL and re-queued
            if requeue_running:
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    study.tell(t.number, state=TrialState.FAIL)  # its worker is gone: the caller's word
                    log.warning("trial %d was RUNNING with no launcher running: failed, re-queued with the same params", t.number)
            _reconcile_mlflow(study, client)
            done0, _ = _counts(study)
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            if (k := requeue_failed(study, spec, limit=None if n_total is None else n_total - done0 - waiting)):
                log.info("re-queued %d interrupted or lost trial(s) with their params: %s", len(k), k)
            if enqueue_configs and (k := enqueue(study, enqueue_configs)):
                log.info("enqueued %d chosen configuration(s) to run first", k)
        done0, _ = _counts(study)
        bar = _Progress(spec, n_total, progress, initial=min(done0, n_total or done0))
        status, reason = "FINISHED", ""
        redirect = contextlib.nullcontext()
        if progress:
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
        try:
            with redirect:
                bar(study)
                if workers == 1:
                    with interrupt.stop_signals():
                        _worker_loop(launch, 0, on_trial=bar)
                elif (k := _run_workers(launch, bar)):
                    status, reason = "FAILED", f"{k} of {workers} workers gave up after {spec.max_failures} consecutive failed trials (see the log)"
        except RuntimeError as exc:
            status, reason = "FAILED", str(exc)
        finally:
            bar.close()
        done, running = _counts(study)
        missing = max(0, n_total - done) if n_total else 0
        timed_out = timeout is not None and time.time() - launch.t0 >= timeout
        if missing and status == "FINISHED" and not timed_out:
            status = "FAILED"
            stuck = f"; {running} trial(s) are RUNNING in a storage without heartbeats (a journal file), whose workers may be dead (once no launcher runs: relaunch with --requeue-running)" if running else ""
            reason = f"{missing} of {n_total} trials missing{stuck}"
        out = StudyOutcome(study, parent, status, reason, missing=missing, running=running, timed_out=timed_out)
        best = best_trial(study)
        tags = {"best_trial_number": best.number, "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", "")} if best else {}
        if out.final or status == "FAILED":
            # FAILED while trials still run (a journal storage's trial whose worker may be dead, or this
            # launch gave up): closed with the reason, so no run stays RUNNING; a launcher still running
            # closes it again when it finishes.
            if status == "FINISHED":  # another launch may have closed it FAILED while this one ran
                tracking.keep_error_as_history(client, parent)
            tracking.close_run(client, parent, status, error=reason or None, metrics=study_metrics(study), tags=tags, children=False)
        else:  # other launchers are still running trials: the last one to finish closes the study run
            tracking.log_batch(client, parent, metrics=study_metrics(study))
        closed = True  # a stop from here on leaves the study run as recorded
        return out
    except KeyboardInterrupt as exc:
        if not closed:
            with interrupt.ignored():
                error = f"interrupted ({interrupt.caught(exc)})"
                others = _others_running(study, opened)
                if others:  # another launcher's trials run on: the last launcher to finish closes the study run
                    log.warning("study %s: %d trial(s) of other launchers are still running; its MLflow run %s stays "
                                "open for them", spec.name, others, parent)  # fmt: skip
                    tracking.close_quietly(lambda: tracking.log_batch(client, parent, metrics=study_metrics(study)),
                                           f"study run {parent}")  # fmt: skip
                else:
                    tracking.close_quietly(lambda: tracking.close_run(client, parent, "KILLED", error=error,
                                                                      metrics=study_metrics(study), children=False),
                                           f"study run {parent}")  # fmt: skip
        raise
    except Exception as exc:
        # An error after the study run was opened (the Optuna storage full, read-only or gone, an
        # MLflow write refused): the study run is closed FAILED with it, not left RUNNING. A stop
        # meanwhile must not cut the closing short; the error is what the caller reports.
        if not closed:
            with interrupt.ignored():
                # the cause the CLI prints (Optuna wraps a full disk in "StorageInternalError: An exception ...")
                error = environment_error(exc) or error_text(exc)

                def close_failed() -> None:
                    try:
                        metrics = study_metrics(study)
                    except Exception:  # noqa: BLE001 - the storage may be what failed: close without them
                        metrics = None
                    tracking.close_run(client, parent, "FAILED", error=error, metrics=metrics, children=False)

                tracking.close_quietly(close_failed, f"study run {parent}")
        raise
