"""Running a study: worker processes, the slot lock, Ctrl-C handling, the progress bar, resume.

Counting and resume: ``n_trials`` is the study's total of COMPLETE and PRUNED trials. A launch
runs only the missing ones; FAIL trials (errors, Ctrl-C, lost workers) do not count and are
replaced (grid points of failed trials are re-queued). Workers on one machine take a file lock
around "count, then create a trial", so the total is exact; workers on other machines sharing an
RDB re-check their trial's rank right after creating it and give it up (FAIL, ``surplus=true``,
no MLflow run) in the rare case of overshoot. SQLite/RDB storages run Optuna heartbeats, so
trials of a killed worker are failed after the grace period and re-run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from wavesweep import tracking
from wavesweep.fileio import file_lock
from wavesweep.study.frame import best_trial, study_metrics
from wavesweep.study.objective import COUNTED, objective
from wavesweep.study.spec import StudySpec
from wavesweep.study.storage import DEFAULT_STORAGE, create_study, has_heartbeat, load_study, open_storage, sqlite_file

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
    t0: float = field(default_factory=time.time)


def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
    done = sum(t.state in COUNTED for t in trials)
    return done, len(trials) - done


@contextlib.contextmanager
def _first_sigint_only() -> Iterator[None]:
    """The first Ctrl-C raises KeyboardInterrupt; later ones are ignored so cleanup can finish."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _worker_loop(launch: Launch, index: int, on_trial: Any = None) -> None:
    """Run trials until the study has ``n_trials`` counted trials, the timeout passes, or too many fail."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(launch.storage_url)
    existing = len(optuna.load_study(study_name=launch.spec.name, storage=storage).get_trials(deepcopy=False))
    # A resumed study must not replay the sampler's random stream: seed with the trial count too.
    study = load_study(launch.spec, storage, seed=launch.spec.seed + existing + 7919 * index, workers=launch.workers)
    heartbeat = has_heartbeat(storage)
    failures = 0
    while True:
        if launch.timeout is not None and time.time() - launch.t0 >= launch.timeout:
            log.info("worker %d: timeout reached", index)
            return
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        finished: list[optuna.trial.FrozenTrial] = []
        # The slot lock is held from "count the trials" until the new trial exists (the objective
        # releases it), so workers on this machine never start more than n_trials.
        with file_lock(launch.lock_path) as release:
            if launch.n_trials is not None:
                done, running = _counts(study)
                if done >= launch.n_trials:
                    return
                if done + running >= launch.n_trials:
                    release()
                    if not heartbeat:  # no way to tell a dead worker's trial: leave it
                        log.warning("%d trial(s) still RUNNING; not waiting for them (storage has no heartbeat)", running)
                        return
                    time.sleep(POLL_S)  # others are running the last trials (or are dead: heartbeat)
                    continue
            func = functools.partial(
                objective, spec=launch.spec, n_trials=launch.n_trials, parent_run_id=launch.parent_run_id,
                experiment=launch.experiment, release_slot=release,
            )  # fmt: skip
            study.optimize(func, n_trials=1, catch=(Exception,), callbacks=[lambda _s, t: finished.append(t)])
        last = finished[-1]
        if last.state == TrialState.FAIL and not last.user_attrs.get("surplus"):
            failures += 1
            if failures >= launch.spec.max_failures:
                raise RuntimeError(f"{failures} consecutive trials failed; last: {last.user_attrs.get('error', '?')}")
        elif last.state != TrialState.FAIL:
            failures = 0
        if on_trial is not None:
            on_trial(study)


def _worker_main(launch: Launch, index: int) -> None:
    """Entry point of a spawned worker process."""
    import torch

    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s worker{index} %(name)s: %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.workers))
    try:
        with _first_sigint_only():
            _worker_loop(launch, index)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except RuntimeError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


class _Progress:
    """tqdm bar over the study's counted trials, with the best value so far."""

    def __init__(self, spec: StudySpec, total: int | None, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.spec = spec
        self.bar = tqdm(total=total, desc=f"study {spec.name}", unit="trial", disable=not enabled, dynamic_ncols=True)

    def __call__(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state in COUNTED]
        post = {"pruned": sum(t.state == TrialState.PRUNED for t in trials), "failed": sum(t.state == TrialState.FAIL for t in trials)}
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        if complete and len(self.spec.objectives) == 1:
            best = max if self.spec.directions[0] == "maximize" else min
            post[f"best {self.spec.objectives[0].metric}"] = f"{best(t.value for t in complete):.4f}"
        elif complete:
            post["pareto"] = len(study.best_trials)
        self.bar.n = len(done)
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run_workers(launch: Launch, progress: _Progress) -> int:
    """This process is worker 0; ``launch.workers - 1`` more are spawned. Returns how many gave up.

    Ctrl-C reaches every process of the terminal's group; it is also forwarded once to the
    spawned workers (they ignore a second one), so each closes its running trial (Optuna FAIL,
    MLflow KILLED) before exiting.
    """
    import torch

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads and DB handles
    procs = [ctx.Process(target=_worker_main, args=(launch, i), name=f"wavesweep-worker{i}") for i in range(1, launch.workers)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.workers))
    gave_up = 0
    try:
        with _first_sigint_only():
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
    except KeyboardInterrupt:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the workers close their trials undisturbed
        try:
            for p in procs:
                if p.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGINT)
            for p in procs:
                p.join(timeout=120)
                if p.is_alive():
                    p.terminate()
        finally:
            signal.signal(signal.SIGINT, old)
        raise
    finally:
        torch.set_num_threads(threads)
    return gave_up + sum(p.exitcode not in (0, None) for p in procs)


def _requeue_failed_grid_points(study: optuna.Study, spec: StudySpec) -> int:
    """Grid studies: re-queue grid points whose only trials failed (GridSampler counts them visited)."""
    if spec.sampler != "grid":
        return 0
    trials = study.get_trials(deepcopy=False)
    key = lambda params: tuple(sorted(params.items()))  # noqa: E731
    covered = {key(t.params) for t in trials if t.state != TrialState.FAIL}  # includes WAITING re-queued ones
    names = {p.name for p in spec.space}
    n = 0
    for t in trials:
        if t.state == TrialState.FAIL and set(t.params) == names and key(t.params) not in covered and not t.user_attrs.get("surplus"):
            # As optuna.storages.RetryFailedTrialCallback does: a WAITING copy keeping the grid_id, so
            # GridSampler treats it as that grid point (enqueue_trial would lose the grid_id).
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                system_attrs={**t.system_attrs, "failed_trial": t.number},
            ))  # fmt: skip
            covered.add(key(t.params))
            n += 1
    return n


def _reconcile_mlflow(study: optuna.Study, client: Any) -> None:
    """Trials failed without their process closing the MLflow run (a killed worker): close it FAILED."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        rid = t.user_attrs.get("mlflow_run_id")
        if rid and tracking.run_status(client, rid) == "RUNNING":
            tracking.close_run(client, rid, "FAILED", error="trial failed in Optuna; its worker is gone", tags={"optuna.state": "FAIL"})


@dataclass
class StudyOutcome:
    study: optuna.Study
    run_id: str  # the study's MLflow run
    status: str  # FINISHED (n_trials reached or timeout) or FAILED (a launch gave up)
    reason: str = ""


def run_study(
    spec: StudySpec,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    workers: int = 1,
    progress: bool = False,
    launched_run_id: str | None = None,
) -> StudyOutcome:
    """Run (or resume) ``spec``; returns the study, the study's MLflow run id and the final status.

    Status: "FINISHED" (n_trials reached or timeout), "FAILED" (a worker gave up after
    ``max_failures`` consecutive failures). KeyboardInterrupt propagates after the running
    trials were closed (Optuna FAIL, MLflow KILLED) and the study run KILLED.
    ``launched_run_id``: the run ``mlflow run -e study`` created (it fixes the experiment).
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    n_total = n_trials if n_trials else spec.total_trials
    if spec.sampler == "grid" and n_total and n_total > spec.grid_size():
        raise ValueError(f"n_trials={n_total} exceeds the grid's {spec.grid_size()} points")
    timeout = timeout if timeout is not None else spec.timeout
    if n_total is None and timeout is None:
        raise ValueError("give n_trials or timeout")
    url = storage or spec.storage or DEFAULT_STORAGE
    # Databases first (MLflow store, Optuna schema and study), then workers.
    experiment = None if launched_run_id else spec.experiment
    client, exp_id = tracking.init_tracking(experiment=experiment, run_id=launched_run_id)
    study = create_study(spec, url)
    parent = tracking.start_study_run(
        client, exp_id, study_name=spec.name, storage=url, spec_file=spec.path, spec_text=spec.text,
        params=spec.summary_params(), existing_run_id=study.user_attrs.get("mlflow_run_id"), launched_run_id=launched_run_id,
    )  # fmt: skip
    if study.user_attrs.get("mlflow_run_id") != parent:
        study.set_user_attr("mlflow_run_id", parent)
    _reconcile_mlflow(study, client)
    if (k := _requeue_failed_grid_points(study, spec)):
        log.info("re-queued %d grid point(s) of failed trials", k)
    db = sqlite_file(url)
    lock_dir = db.parent if db is not None else Path(".wavesweep")
    launch = Launch(
        spec=spec, storage_url=url, n_trials=n_total, timeout=timeout, parent_run_id=parent, experiment=experiment,
        lock_path=(lock_dir / f".{spec.name}.slots.lock").resolve(), workers=workers,
    )  # fmt: skip
    bar = _Progress(spec, n_total, progress)
    status, reason = "FINISHED", ""
    try:
        bar(study)
        if workers == 1:
            with _first_sigint_only():
                _worker_loop(launch, 0, on_trial=bar)
        elif (k := _run_workers(launch, bar)):
            status, reason = "FAILED", f"{k} of {workers} workers gave up after {spec.max_failures} consecutive failed trials (see the log)"
    except KeyboardInterrupt:
        bar.close()
        tracking.close_run(client, parent, "KILLED", error="interrupted (KeyboardInterrupt)", metrics=study_metrics(study), children=False)
        raise
    except RuntimeError as exc:
        status, reason = "FAILED", str(exc)
    finally:
        bar.close()
    best = best_trial(study)
    tags = {"best_trial_number": best.number, "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", "")} if best else {}
    tracking.close_run(client, parent, status, error=reason or None, metrics=study_metrics(study), tags=tags, children=False)
    return StudyOutcome(study, parent, status, reason)
