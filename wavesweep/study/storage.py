"""Optuna storage: open or create (under a lock), samplers and pruners by name, the study itself."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from wavesweep import tracking
from wavesweep.fileio import file_lock

if TYPE_CHECKING:
    from wavesweep.study.spec import StudySpec

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_S = 20  # Optuna heartbeat of a running trial (RDB storages)
GRACE_S = 60  # a RUNNING trial without heartbeat for this long belongs to a dead worker
SAMPLERS: dict[str, type] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[str, type | None] = {
    "none": None,
    "median": optuna.pruners.MedianPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
}


def _is_journal(url: str) -> bool:
    return url.endswith(".journal") or url.startswith("journal:")


def sqlite_file(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]).expanduser().resolve() if url.startswith("sqlite:///") else None


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url``: an RDB URL (SQLite, PostgreSQL, ...) with heartbeats, or a journal file.

    Creating a fresh SQLite database runs schema creation; it happens under a file lock beside
    the database so concurrent launches do not race. ``must_exist``: a missing local file is an error.
    """
    if _is_journal(url):
        path = Path(url.split(":", 1)[1] if url.startswith("journal:") else url).expanduser()
        if must_exist and not path.is_file():
            raise FileNotFoundError(f"Optuna journal {str(path)!r} does not exist")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    db = sqlite_file(url)
    if db is not None and must_exist and not db.is_file():
        raise FileNotFoundError(f"Optuna storage {str(db)!r} does not exist")
    engine_kwargs = {"connect_args": {"timeout": 60}} if db is not None else {}
    lock = file_lock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()
    with lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=_on_stale_trial,
        )  # fmt: skip


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """RDB storages run Optuna heartbeats (a dead worker's trial is failed); journal files do not."""
    return isinstance(storage, optuna.storages.RDBStorage)


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat): close its MLflow run too."""
    rid = trial.user_attrs.get("mlflow_run_id")
    if rid:
        client, _ = tracking.init_tracking()
        if tracking.run_status(client, rid) == "RUNNING":
            tracking.set_run_status(client, rid, "FAILED", error="worker lost (no Optuna heartbeat)", tags={"optuna.state": "FAIL"})


def make_sampler(spec: StudySpec, seed: int, workers: int) -> optuna.samplers.BaseSampler:
    cls = SAMPLERS[spec.sampler]
    opts = dict(spec.sampler_options)
    if cls is optuna.samplers.GridSampler:
        # The grid is shuffled by the seed and trials refer to it by index (grid_id): every process
        # and every launch must use the same seed.
        return cls(spec.grid_space(), seed=spec.seed)
    if cls is optuna.samplers.TPESampler and workers > 1:
        opts.setdefault("constant_liar", True)  # parallel workers: do not all sample the same region
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(seed=seed, **opts)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cls = PRUNERS[spec.pruner]
    if cls is None:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**spec.pruner_options)


def load_study(spec: StudySpec, storage: Any, *, seed: int = 0, workers: int = 1) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec, seed, workers), pruner=make_pruner(spec))


def create_study(spec: StudySpec, storage_url: str) -> optuna.Study:
    """Create the study (or load it when it exists, checking it has the spec's objectives)."""
    storage = open_storage(storage_url)
    study = optuna.create_study(
        storage=storage, study_name=spec.name, directions=spec.directions, load_if_exists=True,
        sampler=make_sampler(spec, spec.seed, 1), pruner=make_pruner(spec),
    )  # fmt: skip
    want = [[o.metric, o.direction] for o in spec.objectives]
    have = study.user_attrs.get("objectives")
    if have is None:
        study.set_user_attr("objectives", want)
        study.set_user_attr("spec", spec.text)
    elif have != want:
        raise ValueError(
            f"study {spec.name!r} in {tracking.redact_url(storage_url)} was created with objectives {have}, "
            f"the spec asks for {want}; give the spec another study: name"
        )
    return study
