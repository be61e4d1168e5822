"""MLflow tracking: the store, trial runs, params/metrics/tables/artifacts, studies.

The tracking layer is this module and :mod:`wavesweep.model_registry` (the Model Registry, model
URIs, downloads), with :mod:`wavesweep.mlflow_ui` (the server of ``wavesweep ui``); no other
wavesweep module imports mlflow. Layout of what one trial records:

* parent run (``method`` tag ``trial``): the full config, base-model identity, the headline
  (dwt metrics under plain names, ``magnitude_*``/``random_*``/``base_*`` beside them), the paired
  comparisons, the compressed dwt checkpoint, the per-layer table, predictions (of the validation
  part too, when there is one, and before recovery, when there was one), warnings;
* one child run per method (``method`` tag ``dwt``/``magnitude``/``random``) with the same metric
  names for every method, so the UI compares methods column by column;
* replicates (``wavesweep.tracked_config``): N such trial runs below one configuration run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

import wavesweep
from wavesweep import interrupt
from wavesweep.config import TrialConfig
from wavesweep.failures import error_text
from wavesweep.fileio import file_lock
from wavesweep.redact import redact
from wavesweep.store import located, sqlite_file, tracking_uri

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "wavesweep"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CHECKPOINT_DIR = "checkpoints"  # run-relative artifact folder of compressed checkpoints


# --------------------------------------------------------------------------- store


def set_tracking_uri() -> str:
    """Point MLflow's own functions at ``tracking_uri()``; the CLI calls it once per process."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def client() -> MlflowClient:
    """A client of ``tracking_uri()`` (for a store that exists: ``init_tracking`` creates it)."""
    return MlflowClient(tracking_uri())


def init_tracking(experiment: str | None = None, *, run_id: str | None = None) -> tuple[MlflowClient, str]:
    """Create the store's schema (``tracking_uri()``) and the experiment; returns a client and the experiment id.

    The experiment is ``experiment``, else the one of ``run_id`` (a run ``mlflow run`` created),
    else, as MLflow itself resolves it, ``$MLFLOW_EXPERIMENT_NAME``, then ``$MLFLOW_EXPERIMENT_ID``,
    else ``wavesweep``. Creating a fresh SQLite store runs schema
    migrations; several processes doing that at once race, so creation happens under an
    exclusive file lock beside the database.
    """
    uri = tracking_uri()
    db = sqlite_file(uri)
    lock = file_lock(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext()
    with lock:
        if db is not None:
            _set_aside_if_cut_short(db)
        # A SQLite store's creation is not one transaction: MLflow's migrations commit table by
        # table, and a stop between a table and its version stamp left a store that no command
        # could open again ("table trace_info already exists"). A stop waits until it is created.
        # (Not for a server's database: a Ctrl-C must not wait for a connection that hangs.)
        with interrupt.ignored() if db is not None else contextlib.nullcontext():
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # forces schema creation / migration, under the lock
        exp_id = _ensure_experiment(client, experiment, run_id)
    return client, exp_id


CUT_SHORT_AFTER_S = 60.0  # a store left empty this long ago is not one another process is creating now


def _set_aside_if_cut_short(db: Path) -> Path | None:
    """Move aside a SQLite store whose creation was cut short, so that it is created afresh;
    returns where it went, or None when it is left as it is.

    Cut short (a kill -9, a crash, a lost machine while MLflow created its tables: a stop waits
    for them now) it holds some of MLflow's tables and nothing else, no experiment and no run,
    and MLflow cannot finish it: every command failed with "table trace_info already exists"
    until the file was deleted by hand. Only such a file, untouched for ``CUT_SHORT_AFTER_S``
    (not one an MLflow process is creating), is moved, with its journal: nothing in it is lost."""
    import sqlite3

    try:
        if not db.is_file() or time.time() - db.stat().st_mtime < CUT_SHORT_AFTER_S:
            return None
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "experiments" not in tables:  # an empty file (MLflow creates it) or not MLflow's (MLflow says so)
                return None
            if any(con.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in ("experiments", "runs") if t in tables):
                return None  # MLflow's default experiment is written once its tables are complete
        finally:
            con.close()
    except (OSError, sqlite3.Error):
        return None
    aside = db.with_name(f"{db.name}.cut-short-{time.strftime('%Y%m%dT%H%M%S')}")
    db.rename(aside)
    for suffix in ("-journal", "-wal", "-shm"):
        if (side := db.with_name(db.name + suffix)).exists():
            side.rename(aside.with_name(aside.name + suffix))
    log.warning("%s holds some of MLflow's tables and no experiment or run: its creation was cut short (a kill, a "
                "crash). Moved to %s; the store is created afresh", db, aside)  # fmt: skip
    return aside


def _ensure_experiment(client: MlflowClient, name: str | None, run_id: str | None) -> str:
    if run_id and name is None:  # started by `mlflow run`: the run it created fixes the experiment
        return _kind_tagged(client, client.get_experiment(client.get_run(run_id).info.experiment_id))
    if name is None and not os.environ.get("MLFLOW_EXPERIMENT_NAME") and (exp_id := os.environ.get("MLFLOW_EXPERIMENT_ID")):
        return _kind_tagged(client, client.get_experiment(exp_id))  # an unknown id is MLflow's error, naming it
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return _kind_tagged(client, exp)
    try:
        # The kind tag makes MLflow 3's UI open the experiment in its model-training view
        # (runs table, charts, compare) rather than the GenAI/traces view.
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except MlflowException:  # another process created it between our look-up and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _kind_tagged(client: MlflowClient, exp: Any) -> str:
    """``exp``'s id, after giving it the model-training kind tag if it has no kind yet (an
    experiment `mlflow run` or ``mlflow experiments create`` made); a kind already set is kept."""
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}) and exp.lifecycle_stage == "active":
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        except MlflowException as exc:  # the tag only picks the UI's view: never a reason to stop
            log.debug("experiment %s: kind tag not set (%s)", exp.experiment_id, exc)
    return exp.experiment_id


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """wavesweep's version, the git commit of the source tree when it is a checkout, and a digest of
    the package's source files as they were when this process first imported wavesweep
    (``wavesweep.SOURCE_DIGEST``), once per process: ``0.1.0+<commit>.src.<digest>``, or
    ``0.1.0+src.<digest>`` without git. The commit alone missed edits not committed, and a
    copy without ``.git`` (``git archive``, a wheel) had only the version: a replicate recorded by
    other code was then reused as if the same code had run."""
    package = Path(wavesweep.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=package, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{wavesweep.__version__}+{sha + '.' if sha else ''}src.{wavesweep.SOURCE_DIGEST}"


# --------------------------------------------------------------------------- logging helpers


def format_value(v: Any) -> str:
    """A param, tag or model-version tag value as MLflow stores it: JSON for lists and dicts, else ``str``."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def as_logged(params: dict[str, Any]) -> dict[str, str]:
    """``params`` as :func:`log_batch` records them (and a run's ``data.params`` reads them back)."""
    return {k: redact(format_value(v)) for k, v in params.items()}


def log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | list[tuple[str, float, int]] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """Log params, metrics and tags in as few ``log_batch`` calls as MLflow's limits allow.

    ``metrics`` is ``{key: value}`` (step 0) or a list of ``(key, value, step)``. Params that the
    run already has (``mlflow run`` logs its ``-P`` values itself) are skipped, not re-logged.
    Every param and tag value is :func:`redact`-ed.
    """
    existing = client.get_run(run_id).data.params if params else {}
    ps = [Param(k, v) for k, v in as_logged(params or {}).items() if k not in existing]
    ts = [RunTag(k, redact(format_value(v))) for k, v in (tags or {}).items()]
    now = int(time.time() * 1000)
    triples = [(k, v, 0) for k, v in metrics.items()] if isinstance(metrics, dict) else list(metrics or [])
    ms = [Metric(k, float(v), now, int(step)) for k, v, step in triples if v is not None]
    # MLflow: <= 100 params/tags and <= 1000 entities per batch.
    while ps or ts or ms:
        p_chunk, ps = ps[:100], ps[100:]
        t_chunk, ts = ts[:100], ts[100:]
        room = 1000 - len(p_chunk) - len(t_chunk)
        m_chunk, ms = ms[:room], ms[room:]
        client.log_batch(run_id, metrics=m_chunk, params=p_chunk, tags=t_chunk)


def _log_files(
    client: MlflowClient,
    run_id: str,
    files: dict[str, str | bytes],
    artifact_path: str | None = None,
    copies: dict[str, Path] | None = None,
) -> None:
    """Write ``{relative path: content}`` (and copy ``{relative path: file}``) into a temp dir and
    log it all as the run's artifacts in one upload."""
    with tempfile.TemporaryDirectory() as tmp:
        for fname, content in files.items():
            p = Path(tmp) / fname
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
        for fname, src in (copies or {}).items():
            p = Path(tmp) / fname
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, p)  # same file system: no copy of the checkpoint bytes
            except OSError:
                shutil.copyfile(src, p)
            if p.stat().st_size != Path(src).stat().st_size:  # upload only complete files
                raise OSError(f"{fname}: copied {p.stat().st_size} of {Path(src).stat().st_size} bytes")
        with _removed_on_failure(client, run_id, [f"{artifact_path}/{n.name}" if artifact_path else n.name for n in Path(tmp).iterdir()]):
            client.log_artifacts(run_id, tmp, artifact_path)


@contextlib.contextmanager
def _removed_on_failure(client: MlflowClient, run_id: str, paths: list[str]):
    """If the block fails (a full disk mid-upload), delete the artifacts ``paths`` of ``run_id`` where
    the artifact store allows it, so no half-written file stays behind; the error is re-raised."""
    try:
        yield
    except BaseException:
        try:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
            for path in paths:
                repo.delete_artifacts(path)
        except Exception as exc:  # noqa: BLE001 - a store without delete: say so, keep the original error
            log.warning("run %s: could not remove partial artifacts %s: %s", run_id, paths, exc)
        raise


def _log_table(client: MlflowClient, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
    with _removed_on_failure(client, run_id, [artifact_file]):
        client.log_table(run_id, data=frame, artifact_file=artifact_file)


def run_name(cfg: TrialConfig, method: str) -> str:
    pct = f"{cfg.percentile:g}"
    desc = f"{cfg.wavelet} L{cfg.level} p{pct} {cfg.layout}"
    return {"trial": f"trial {desc}", "dwt": f"dwt {desc}"}.get(method, f"{method} (matched to {desc})")


# --------------------------------------------------------------------------- trial runs


class TrialRun:
    """A trial's parent run: created below ``parent_run_id`` (a study), or adopted (``adopt_run_id``,
    the run ``mlflow run`` created), or created on its own; closed with a status."""

    def __init__(self, client: MlflowClient, experiment_id: str, cfg: TrialConfig, *, parent_run_id: str | None = None,
                 adopt_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> None:  # fmt: skip
        self.client = client
        self.cfg = cfg
        self.extra_tags = dict(extra_tags or {})  # a study's, a replicate's: its method runs carry them too
        tags = {"method": "trial", "wavesweep.kind": "trial", PROCESS_TAG: process_id(), **self.extra_tags}
        if adopt_run_id and not parent_run_id:
            self.run_id = adopt_run_id
            self.owned = False
            log_batch(client, self.run_id, tags={MLFLOW_RUN_NAME: run_name(cfg, "trial"), **tags})
        else:
            if parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            self.run_id = create_run(client, experiment_id, run_name=run_name(cfg, "trial"), tags=tags, where="while it was created")
            self.owned = True
        self.child_ids: dict[str, str] = {}
        try:
            self.experiment_id = experiment_id if self.owned else client.get_run(self.run_id).info.experiment_id
            log_batch(client, self.run_id, params={**cfg.to_dict(), "code_version": code_version()})
        except BaseException as exc:  # the run exists: a stop or an error here must not leave it RUNNING
            _close_on(exc, client, self.run_id, "while recording its parameters")
            raise

    def child(self, method: str) -> str:
        rid = create_run(self.client, self.experiment_id, run_name=run_name(self.cfg, method), where="while it was created",
                         tags={**self.extra_tags, MLFLOW_PARENT_RUN_ID: self.run_id, "method": method, "wavesweep.kind": "method"})  # fmt: skip
        self.child_ids[method] = rid
        return rid

    def finish(self, status: str = "FINISHED", error: str | None = None, tags: dict[str, str] | None = None) -> None:
        """Close the parent and every child with ``status``; record ``error`` and ``tags`` on all of them.

        A successful adopted run is left open: ``mlflow run`` closes the run it created."""
        # On failure look the children up too: a stop (SIGTERM) landing inside create_run leaves a
        # child that exists in the store but not in child_ids.
        children: list[str] | bool = list(self.child_ids.values()) if status == "FINISHED" else True
        close_run(self.client, self.run_id, status, error=error, tags=tags, children=children,
                  terminate=self.owned or status != "FINISHED")  # fmt: skip


# --------------------------------------------------------------------------- runs of dead processes

PROCESS_TAG = "wavesweep.process"


def process_id(pid: int | None = None) -> str:
    """Process ``pid`` (default: this one, whose PID namespace it must share) as ``host/boot
    id/PID namespace/pid/start time``: unique across pid reuse, reboots and containers (Linux
    ``/proc``); ``""`` where that cannot be read (no check is made there)."""
    pid = os.getpid() if pid is None else pid
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return ""
    return f"{socket.gethostname()}/{boot}/{ns}/{pid}/{start}"


def process_gone(tag: str, started_ms: int | None = None) -> bool:
    """Whether the process ``tag`` (:func:`process_id`) is known to be gone: on this machine, and
    either rebooted since (another boot id, and its run ``started_ms``, epoch ms, before this boot:
    a machine of the same host name has another boot id too) or, in this PID namespace, no process
    with its pid and start time. False
    when it cannot be told (another machine or container, no ``/proc``, a pid that runs but whose
    ``/proc`` entry this user may not read: another user's under ``hidepid``)."""
    parts = tag.split("/")
    here = process_id().split("/")
    if len(parts) != 5 or len(here) != 5 or parts[0] != here[0] or not parts[3].isdigit():
        return False
    if parts[1] != here[1]:  # rebooted since, or another machine of the same name (its run may have begun after our boot)
        return started_ms is not None and started_ms / 1000 < _boot_time()
    if parts[2] != here[2]:  # another PID namespace (a container on this host): its pids are not ours to read
        return False
    now = process_id(int(parts[3]))
    if now:
        return now != tag  # a new process under its pid, or itself
    try:  # /proc/<pid> unreadable: no such process, or another user's under /proc's hidepid
        os.kill(int(parts[3]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it runs, as another user
        return False
    return False  # it runs, its start time unreadable: not known to be gone


def _boot_time() -> float:
    """When this machine booted, in seconds since the epoch (``btime`` in ``/proc/stat``); -inf
    where unreadable (no run is then known to predate it)."""
    try:
        return float(next(line.split()[1] for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")))
    except (OSError, StopIteration, IndexError, ValueError):
        return float("-inf")


#: seconds after which a run `mlflow run` created, still without its entry point's tags, is named
#: by the next trial (the entry point tags it within seconds of starting; a conda environment
#: built first can take minutes)
UNCLAIMED_AFTER_S = 1800


def close_runs_of_dead_processes(client: MlflowClient, experiment_id: str) -> list[str]:
    """Close KILLED the trial and configuration runs of ``experiment_id`` left RUNNING by a process
    of this machine that is gone without closing them (``kill -9``, the OOM killer, a crash of the
    interpreter), their children with them, with tag ``error`` saying so; returns their ids. A
    study's runs are left to the study (its heartbeat, its next launch). Any failure here is logged:
    tidying must never stop the trial that does it."""
    closed = []
    try:
        found = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
        for run in found:
            tags = run.data.tags
            if (tags.get("wavesweep.kind") not in ("trial", "configuration") or "optuna.study" in tags
                    or not process_gone(tags.get(PROCESS_TAG, ""), run.info.start_time)):  # fmt: skip
                continue
            if tags.get(MLFLOW_PARENT_RUN_ID) in {r.info.run_id for r in found}:
                continue  # a replicate below a configuration run: closed with it
            pid = tags[PROCESS_TAG].split("/")[3]
            close_run(client, run.info.run_id, "KILLED",
                      error=f"process {pid} ended without closing this run (kill -9, out of memory, a crash); "
                            "closed by a later wavesweep command")  # fmt: skip
            closed.append(run.info.run_id)
        # a method run whose trial run was closed by another hand while its process was recording
        # the method runs (`mlflow run` closes the run it launched FAILED once its entry point is
        # killed): no process will close it, and the search above looks for RUNNING trial runs
        running = {r.info.run_id for r in found}
        for run in found:
            tags = run.data.tags
            parent_id = tags.get(MLFLOW_PARENT_RUN_ID)
            if tags.get("wavesweep.kind") != "method" or "optuna.study" in tags or not parent_id or parent_id in running:
                continue
            parent = client.get_run(parent_id)
            if parent.info.status == "RUNNING" or not process_gone(parent.data.tags.get(PROCESS_TAG, ""), parent.info.start_time):
                continue
            pid = parent.data.tags[PROCESS_TAG].split("/")[3]
            close_run(client, run.info.run_id, "KILLED", children=False,
                      error=f"process {pid} ended while recording this method run, and its trial run was closed "
                            f"{parent.info.status} without it; closed by a later wavesweep command")  # fmt: skip
            closed.append(run.info.run_id)
        # a run `mlflow run` created whose entry point never tagged it: `mlflow run` killed with
        # kill -9 while its entry point's Python started. Nothing says whose it is, so it is not closed
        now_ms = time.time() * 1000
        unclaimed = [r.info.run_id for r in found if "mlflow.project.entryPoint" in r.data.tags
                     and "wavesweep.kind" not in r.data.tags and PROCESS_TAG not in r.data.tags
                     and now_ms - (r.info.start_time or now_ms) > UNCLAIMED_AFTER_S * 1000]  # fmt: skip
        if unclaimed:
            log.warning("%d run(s) `mlflow run` created have been RUNNING for over %d minutes without their entry point "
                        "starting (an `mlflow run` killed with kill -9?): %s; if none is alive, close each with "
                        "MlflowClient().set_terminated(RUN_ID, 'KILLED')", len(unclaimed), UNCLAIMED_AFTER_S // 60,
                        ", ".join(unclaimed))  # fmt: skip
    except (MlflowException, OSError) as exc:
        log.warning("could not close runs left RUNNING by processes that are gone: %s", exc)
    if closed:
        log.warning("closed %d run(s) KILLED that a process gone without closing them had left RUNNING: %s",
                    len(closed), ", ".join(closed))
    return closed


def close_run(
    client: MlflowClient,
    run_id: str,
    status: str,
    *,
    error: str | None = None,
    tags: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    children: list[str] | bool = True,
    terminate: bool = True,
    finished_too: bool = False,
) -> None:
    """Close ``run_id`` with ``status`` (FINISHED, FAILED, KILLED), with tag ``error`` and ``tags``.

    ``children``: the method runs below it (``True``: look them up; below a configuration run, its
    replicate trial runs too; ``False``: none), closed first with the same status and tags; the
    ones still RUNNING, or all of them with ``finished_too`` (retracting a finished run whose
    Optuna trial failed after all). ``metrics`` go on ``run_id`` only; ``terminate=False`` records
    everything but leaves it open (to its launcher: its process tag is cleared).
    """
    extra = {**(tags or {}), **({"error": error[:5000]} if error else {})}
    if children is True:
        run = client.get_run(run_id)
        found = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'")
        running = found if finished_too else [r for r in found if r.info.status == "RUNNING"]
        if run.data.tags.get("wavesweep.kind") == "configuration":  # its replicate trial runs, with their method runs
            for r in (r for r in running if r.data.tags.get("wavesweep.kind") == "trial"):
                close_run(client, r.info.run_id, status, error=error, tags=tags, finished_too=finished_too)
        children = [r.info.run_id for r in running if r.data.tags.get("wavesweep.kind") == "method"]
    for rid in children or []:
        _best_effort(log_batch, client, rid, tags=extra)  # a full disk must not leave the run RUNNING
        client.set_terminated(rid, status)
    # left open (an adopted run, which `mlflow run` closes after this process ends): no longer this
    # process's, so not closed KILLED as a run a gone process left RUNNING
    left = {} if terminate else {PROCESS_TAG: ""}
    _best_effort(log_batch, client, run_id, tags={**extra, **left}, metrics=metrics or {})
    if terminate:
        client.set_terminated(run_id, status)


def close_quietly(close: Callable[[], Any], what: str) -> None:
    """Run ``close`` (closing runs) while an exception is being handled: a failure to close (a
    locked database, a full disk) is logged, never raised in place of what is being handled. A
    stop (Ctrl-C, SIGTERM) replaced by a "database is locked" would be taken for an ordinary
    failed trial: the study would go on, deaf to further signals, and the trial never be retried."""
    try:
        close()
    except Exception as exc:  # noqa: BLE001 - logged; the exception being handled is re-raised by the caller
        log.error("could not close %s: %s: %s", what, type(exc).__name__, exc)


def create_run(client: MlflowClient, experiment_id: str, *, run_name: str, tags: dict[str, str], where: str) -> str:
    """``client.create_run``, its id returned, with a stop held until the id is known: a stop
    (Ctrl-C, SIGTERM) landing inside ``create_run`` once the store had written the run left it
    RUNNING for good, known to no one (found by a Ctrl-C fuzz of studies: a repeated
    configuration's run). A stop held meanwhile is raised once the run exists, and closes it
    KILLED (``where`` says what was being done) before it propagates."""
    run_id = None
    try:
        with interrupt.ignored():
            run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    except BaseException as exc:
        if run_id is not None:
            _close_on(exc, client, run_id, where)
        raise
    return run_id


def _close_on(exc: BaseException, client: MlflowClient, run_id: str, where: str) -> None:
    """Close ``run_id`` (alone) for ``exc`` raised ``where`` it was being set up: KILLED for a stop,
    FAILED otherwise; best-effort, signals ignored meanwhile. The caller re-raises ``exc``."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    error = f"{where}: {error_text(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        interrupt.caught(exc)  # the stop is handled from here: a repeat of it must not cut short what follows
    with interrupt.ignored():
        close_quietly(lambda: close_run(client, run_id, status, error=error, children=False), f"run {run_id}")


def _best_effort(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - logged; closing the run matters more than its tags
        log.warning("could not record on a closing run: %s", exc)


def _layer_series(frame: pd.DataFrame) -> list[tuple[str, float, int]]:
    """Per-layer metrics: one series per quantity over the layer index (step), so the UI charts
    them by layer; layer names are in the ``layers.json`` table (no one-point metric per layer)."""
    out: list[tuple[str, float, int]] = []
    for i, row in enumerate(frame.itertuples(index=False)):
        series = {"layer_weight_sparsity": row.weight_sparsity, "layer_coeff_sparsity": row.coeff_sparsity,
                  "layer_rel_l2_error": row.rel_l2_error}  # fmt: skip
        if row.level_effective is not None and not pd.isna(row.level_effective):
            series["layer_effective_level"] = row.level_effective
        for k, v in series.items():
            out.append((k, float(v), i))
    return out


def log_trial(run: TrialRun, result, *, checkpoint_files: dict[str, Path]) -> None:
    """Record a finished ``trial.TrialResult`` on ``run``: children, metrics, tables, artifacts,
    and the compressed checkpoints ``{method: path}`` under ``checkpoints/``."""
    client, cfg = run.client, result.config
    metrics = result.metrics()
    base = result.base
    base_params = {
        "base_model": base.model_name, "base_dataset": base.dataset_name, "base_seed": base.seed,
        "base_source": base.source, "base_checksum": base.checksum, "base_path": str(base.path),
        **({"base_uri": base.uri} if getattr(base, "uri", "") else {}),
        **{f"base_{k}": v for k, v in base.build_kwargs.items()},
        "n_eval": result.eval_info["n_eval"],
        # the device the trial ran on (the param device may be "auto"): on CUDA a trained base model
        # has another recipe (bf16 autocast, channels-last), and the timings are that device's
        **({"resolved_device": result.eval_info["device"]} if "device" in result.eval_info else {}),
        **({"memory_format": result.eval_info["memory_format"]} if "memory_format" in result.eval_info else {}),
    }  # fmt: skip
    frames = {m: o.stats.to_frame() for m, o in result.outcomes.items()}
    for method, out in result.outcomes.items():
        rid = run.child(method)
        params = {**cfg.to_dict(), **base_params, "method": method}
        if method != "dwt":
            params |= {"matched_to": "dwt", "match_scope": cfg.scope}
            if out.prune.config.get("seed") is not None:  # random's draw; magnitude draws nothing (no "None" param)
                params["prune_seed"] = out.prune.config["seed"]
        log_batch(client, rid, params=params, metrics=[*((k, v, 0) for k, v in metrics[method].items()), *_layer_series(frames[method])])
        _log_table(client, rid, frames[method], "layers.json")
    log_batch(client, run.run_id, params=base_params, metrics=[*((k, v, 0) for k, v in metrics["parent"].items()), *_layer_series(frames["dwt"])],
              tags={"warnings": len(result.warnings)})  # fmt: skip
    _log_table(client, run.run_id, frames["dwt"], "layers.json")
    preds = pd.DataFrame({"target": result.base_eval.targets, "base": result.base_eval.preds,
                          **{m: o.eval.preds for m, o in result.outcomes.items()}})  # fmt: skip
    files: dict[str, str | bytes] = {
        "config.yaml": yaml.safe_dump({"trial": cfg.to_dict(), "base": base_params, "code_version": code_version()}, sort_keys=False),
        "warnings.txt": "\n".join(result.warnings) + ("\n" if result.warnings else ""),
        "predictions.csv": preds.to_csv(index=False),
        **{f"layers_{m}.csv": f.to_csv(index=False) for m, f in frames.items()},
        "paired.json": json.dumps({k: v.__dict__ for k, v in result.paired.items()}, indent=2),
    }
    if result.base_val_eval is not None:  # the validation part: what a study selects on (val_top1, val_gain_*)
        val = pd.DataFrame({"target": result.base_val_eval.targets, "base": result.base_val_eval.preds,
                            **{m: o.val_eval.preds for m, o in result.outcomes.items()}})  # fmt: skip
        files["predictions_val.csv"] = val.to_csv(index=False)
    if all(o.prerec_eval is not None for o in result.outcomes.values()):  # the pruned models before recovery: prerec_*
        pre = pd.DataFrame({"target": result.base_eval.targets, **{m: o.prerec_eval.preds for m, o in result.outcomes.items()}})
        files["predictions_prerec.csv"] = pre.to_csv(index=False)
    copies = {f"{CHECKPOINT_DIR}/{path.name}": Path(path) for path in checkpoint_files.values()}
    _log_files(client, run.run_id, files, copies=copies)


# --------------------------------------------------------------------------- reading runs back

_SQL_INFINITY = 1.7976931348623157e308  # MLflow's SQL store keeps +-inf as the largest finite double


def search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    """Every run of ``experiment_id`` that ``filter_string`` matches (all pages of ``search_runs``)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def metric_value(v: float) -> float:
    """A metric as it was logged: MLflow's SQL store reads back +-inf as +-1.797e308."""
    return float(v) if abs(v) != _SQL_INFINITY else float("inf") if v > 0 else float("-inf")


@contextlib.contextmanager
def claim_lock():
    """Serialise, among the processes of this machine that share a SQLite store, the search for and
    the moving of runs that a new run takes over from a stopped one (a configuration resuming its
    finished replicates): the second process finds them already moved. A tracking server has no
    such lock (see ``tracked_config``)."""
    db = sqlite_file(tracking_uri())
    with file_lock(db.with_name(db.name + ".claim.lock")) if db else contextlib.nullcontext():
        yield



def get_trial_run(client: MlflowClient, run_id: str):
    """The trial (parent) run for ``run_id``, accepting a method child's id too, and for a
    configuration run (replicates) the trial run of its replicate 0 (the base seed)."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"no run {run_id} in the MLflow store {located(tracking_uri())} "
                         "(a run id from another store? set MLFLOW_TRACKING_URI)") from None
    if run.data.tags.get("wavesweep.kind") == "method":
        run = client.get_run(run.data.tags[MLFLOW_PARENT_RUN_ID])
    if run.data.tags.get("wavesweep.kind") == "configuration":
        first = client.search_runs([run.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}' and tags.replicate = '0'")
        if not first:  # a stopped configuration whose finished replicates a resumed one took over
            raise ValueError(_without_replicate_0(client, run))
        run = first[0]
    kind = run.data.tags.get("wavesweep.kind")
    if kind is None and run.info.status != "FINISHED":  # `mlflow run` made it; wavesweep stopped before tagging it
        error = run.data.tags.get("error")
        raise ValueError(f"run {run_id} is {run.info.status}{f' ({error})' if error else ''}: "
                         "only a FINISHED trial run can be registered")  # fmt: skip
    if kind != "trial":
        raise ValueError(f"run {run_id} is not a wavesweep trial run (tag wavesweep.kind={kind!r})")
    return run


def _without_replicate_0(client: MlflowClient, run: Any) -> str:
    """The line for a configuration run with no replicate 0 below it: where its replicates went (the
    last of the configurations that took them over, one resumed after another), or that it stopped
    before its first replicate began."""
    head = f"configuration run {run.info.run_id} ({run.info.status}) has no replicate 0 below it"
    moved, seen = run.data.tags.get("resumed_by"), {run.info.run_id}
    last = None
    while moved and moved not in seen and len(seen) < 100:  # each resumed one may be stopped and resumed in turn
        seen.add(moved)
        try:
            last = client.get_run(moved)
        except MlflowException:
            break
        moved = last.data.tags.get("resumed_by")
    if last is not None:
        return f"{head}: its replicates were taken over by configuration run {last.info.run_id} ({last.info.status}); register that one"
    kids = client.search_runs([run.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'", max_results=1)
    return head + ("; register one of its replicate runs" if kids else ": it stopped before its first replicate began")


def trial_layers(client: MlflowClient, run_id: str) -> dict[str, list[Any]] | None:
    """Per-layer lists of a trial run (from its ``layers_dwt.csv`` and ``layers_magnitude.csv``):
    name, dwt coefficient and weight sparsity, magnitude weight sparsity, requested and effective
    level; None when the run has no such files."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dwt = pd.read_csv(client.download_artifacts(run_id, "layers_dwt.csv", tmp))
            mag = pd.read_csv(client.download_artifacts(run_id, "layers_magnitude.csv", tmp))
        except (MlflowException, OSError) as exc:
            log.info("no per-layer files on run %s: %s", run_id, exc)
            return None
    level = lambda col: [None if pd.isna(v) else int(v) for v in dwt[col]]  # noqa: E731
    return {
        "name": [str(x) for x in dwt["name"]], "dwt_coeff_sparsity": dwt["coeff_sparsity"].astype(float).tolist(),
        "dwt_weight_sparsity": dwt["weight_sparsity"].astype(float).tolist(),
        "magnitude_weight_sparsity": mag["weight_sparsity"].astype(float).tolist(),
        "level_requested": level("level_requested"), "level_effective": level("level_effective"),
    }  # fmt: skip


def selection_predictions(client: MlflowClient, run_id: str, method: str = "dwt") -> tuple[Any, Any] | None:
    """``(predictions, targets)`` (int64 arrays, dataset order) of ``method`` over the examples a
    trial run's early-stopping chunks scored: its validation part where it had one
    (``predictions_val.csv``), else its test part (``predictions.csv``); None when the run has
    neither file."""
    with tempfile.TemporaryDirectory() as tmp:
        listed = {f.path for f in client.list_artifacts(run_id)}
        name = next((n for n in ("predictions_val.csv", "predictions.csv") if n in listed), None)
        if name is None:
            return None
        frame = pd.read_csv(client.download_artifacts(run_id, name, tmp))
    return frame[method].to_numpy("int64"), frame["target"].to_numpy("int64")


def trial_config_of(run) -> TrialConfig:
    """The trial's configuration from its params. ``mlflow run`` logs an empty MLproject default
    as the shell's quoted empty string (``''``), and the run keeps that value (a param is
    written once): it reads as empty, as the trial itself saw it."""
    names = set(TrialConfig.__dataclass_fields__)
    return TrialConfig.from_mapping({k: "" if v in ("''", '""') else v for k, v in run.data.params.items() if k in names})


def download_checkpoint(client: MlflowClient, run_id: str, method: str, dst: Path) -> Path:
    path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{method}.wsz", str(dst))
    return Path(path)


# --------------------------------------------------------------------------- studies
# A study is one parent run (tag ``wavesweep.kind=study``) above its trial runs. The Optuna
# side lives in ``wavesweep.study``; these helpers are the only MLflow calls it makes.


redact_url = redact  # ``url`` with any password replaced by ``***`` (kept for callers)


def keep_error_as_history(client: MlflowClient, run_id: str) -> None:
    """A study run reopened or finished by a later launch: an earlier launch's ``error`` tag moves
    to ``error.previous`` (history, not the run's present state)."""
    tags = client.get_run(run_id).data.tags
    if "error" in tags:
        client.set_tag(run_id, "error.previous", tags["error"])
        client.delete_tag(run_id, "error")


def start_study_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    study_name: str,
    storage: str,
    spec_file: Path | None,
    spec_text: str,
    params: dict[str, Any],
    existing_run_id: str | None = None,
    launched_run_id: str | None = None,
) -> str:
    """Create, or reopen on resume, the study's parent run; returns its run id.

    ``existing_run_id`` (kept by the Optuna study) is reopened when this tracking store has it
    as the run of the same study. Otherwise a run started by ``mlflow run -e study``
    (``launched_run_id``) becomes the study run, or a new run is created. A ``mlflow run`` run
    that resumes a study recorded elsewhere is tagged with the study run it contributed to.
    """
    run_id = None
    if existing_run_id:
        try:
            run = client.get_run(existing_run_id)
        except MlflowException:
            run = None
        if run is not None and run.data.tags.get("optuna.study") == study_name and run.info.lifecycle_stage == "active":
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            keep_error_as_history(client, run_id)
    launched = launched_run_id
    if run_id is None and launched:
        run_id = launched
        client.set_tag(run_id, MLFLOW_RUN_NAME, f"study {study_name}")
    elif run_id is None:
        run_id = create_run(client, experiment_id, run_name=f"study {study_name}", tags={}, where="while it was created")
    tags = {
        "wavesweep.kind": "study", "method": "study", "optuna.study": study_name,
        # where, absolute: `mlflow run` runs in the project directory, so a relative path says too little
        "optuna.storage": located(storage), "study.spec_sha256": spec_sha256(spec_text) if spec_text else "",
        "study.spec_file": str(Path(spec_file).resolve()) if spec_file else "", "code_version": code_version(),
    }  # fmt: skip
    try:
        tags |= _latest_launch_tags(client.get_run(run_id).data, params)
        log_batch(client, run_id, params=params, tags=tags)
        # The spec's text is an artifact (spec/NAME.yaml), not a tag: tags are table cells in the UI.
        if spec_text:
            _log_files(client, run_id, {spec_file.name if spec_file else "spec.yaml": redact(spec_text)}, "spec")
        if launched and launched != run_id:
            log_batch(client, launched, tags={"wavesweep.kind": "study-launch", "optuna.study": study_name, "study_run_id": run_id})
    except BaseException as exc:  # the run is open: a stop or an error here must not leave it RUNNING
        _close_on(exc, client, run_id, "while opening the study run")
        raise
    return run_id


#: tag prefix of a study run's settings that a later launch changed (``latest_launch.pruner``)
LATEST_LAUNCH = "latest_launch."


def _latest_launch_tags(data, params: dict[str, Any]) -> dict[str, str]:
    """A reopened study run's params are its first launch's (MLflow params cannot change), but a
    launch may change some settings (the pruner, a sampler seed): each one this launch runs with
    differently, and each one an earlier launch tagged so, as tag ``latest_launch.NAME`` holding
    this launch's value (logged once as a warning); nothing for a run whose params all agree."""
    out = {}
    for k, v in as_logged(params).items():
        if (k in data.params and data.params[k] != v) or LATEST_LAUNCH + k in data.tags:
            out[LATEST_LAUNCH + k] = v
            if data.params.get(k) != v and data.tags.get(LATEST_LAUNCH + k) != v:
                log.warning("study run: this launch runs with %s=%s; its param %s keeps the first launch's %s "
                            "(tag %s%s holds the latest)", k, v, k, data.params.get(k), LATEST_LAUNCH, k)  # fmt: skip
    return out


def record_repeat(
    client: MlflowClient,
    experiment_id: str,
    cfg: TrialConfig,
    *,
    parent_run_id: str,
    repeat_of_trial: int,
    repeat_of_run_id: str,
    tags: dict[str, Any] | None = None,
    on_run: Callable[[str], None] | None = None,
) -> str:
    """A study trial that repeats the configuration of an earlier complete trial, which is not run
    again: one run below the study run (tags ``wavesweep.kind=repeat``, ``method=repeat``,
    ``repeat_of_trial``, ``repeat_of_run_id``: the earlier trial's run, which holds the numbers),
    closed FINISHED at once, with no params, metrics or artifacts of its own (a search over
    metrics or params finds each configuration once). ``on_run(run_id)`` is called as soon as the
    run exists. Returns its run id."""
    rid = create_run(client, experiment_id, run_name=f"repeat of trial {repeat_of_trial}: {run_name(cfg, 'trial')}",
                     tags={MLFLOW_PARENT_RUN_ID: parent_run_id, "method": "repeat", "wavesweep.kind": "repeat"},
                     where="while recording a repeated configuration")  # fmt: skip
    try:
        if on_run is not None:
            on_run(rid)
        log_batch(client, rid, tags={**(tags or {}), "repeat_of_trial": repeat_of_trial, "repeat_of_run_id": repeat_of_run_id})
        client.set_terminated(rid, "FINISHED")
    except BaseException as exc:  # the run exists: a stop or an error here must not leave it RUNNING
        _close_on(exc, client, rid, "while recording a repeated configuration")
        raise
    return rid


def spec_sha256(spec_text: str) -> str:
    """A study spec's identity: sha256 of its text as stored (``spec/`` artifact: secrets redacted)."""
    return hashlib.sha256(redact(spec_text).encode("utf-8")).hexdigest()


def default_experiment_note(run_id: str | None) -> str | None:
    """A hint when ``mlflow run`` put ``run_id`` in MLflow's Default experiment (no
    ``--experiment-name``), where it sits apart from every other wavesweep run; else None."""
    if not run_id:
        return None
    with contextlib.suppress(MlflowException):
        if client().get_run(run_id).info.experiment_id == "0":
            return (f"note: run {run_id} is in MLflow's Default experiment; other wavesweep runs are in "
                    f"'{DEFAULT_EXPERIMENT}': launch with `mlflow run . --experiment-name {DEFAULT_EXPERIMENT} ...`")  # fmt: skip
    return None


def run_status(client: MlflowClient, run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None when the store does not have it."""
    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def log_study_report(client: MlflowClient, run_id: str, files: Iterable[Path]) -> None:
    """Upload a report's ``files`` (plots, summary CSV and Markdown) under ``report/`` on the study
    run: those files only, linked into a folder of this upload's own first, so another
    launcher writing the same report folder at the same time (its temporary files, its renames)
    cannot break the upload or slip into it."""
    _log_files(client, run_id, {}, "report", copies={Path(f).name: Path(f) for f in files})
