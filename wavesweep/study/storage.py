"""Optuna storage: open or create (under a lock), samplers and pruners by name, the study itself."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from wavesweep import store, tracking
from wavesweep.fileio import file_lock
from wavesweep.redact import remember_password, remember_url_credentials
from wavesweep.study.frame import encode_objectives, study_objectives

if TYPE_CHECKING:
    from wavesweep.study.spec import StudySpec

log = logging.getLogger(__name__)
DEFAULT_STORAGE = "sqlite:///optuna.db"
# Optuna heartbeats of running trials (RDB storages): a RUNNING trial without a heartbeat for
# GRACE_S belongs to a dead worker (kill -9, a lost machine) and is failed and re-queued.
# WAVESWEEP_HEARTBEAT_S / WAVESWEEP_GRACE_S override them (tests use seconds).
HEARTBEAT_S = 20
GRACE_S = 60
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
#: what each pruner is given at each evaluation chunk (study.objective.reporter): the cumulative
#: partial top-1, or (wilcoxon, which pairs the same examples across trials step by step) the
#: chunk's own accuracy. A study keeps one kind (user attribute ``intermediate_values``): a pruner
#: comparing one trial's values with another's of the other kind compares unlike numbers.
INTERMEDIATE = {"median": "cumulative", "wilcoxon": "per_chunk"}
INTERMEDIATE_WORDS = {"cumulative": "the cumulative top-1", "per_chunk": "each chunk's own top-1"}
INTERMEDIATE_ATTR = "intermediate_values"
# Optuna >= 4.9 names it RetryHeartbeatStaleTrialCallback; RetryFailedTrialCallback is the old name.
RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
_DRIVER_HINT = {
    "postgresql": 'pip install "psycopg[binary]" (or pip install -e ".[postgres]")',
    "mysql": 'pip install "PyMySQL" and use mysql+pymysql://',
}


def _is_journal(url: str) -> bool:
    return url.endswith(".journal") or url.startswith("journal:")


def _journal_path(url: str) -> Path:
    return Path(url.split(":", 1)[1] if url.startswith("journal:") else url).expanduser()


def check_storage_url(url: str) -> None:
    """Raise a one-line ``ValueError`` unless ``url`` names a usable Optuna storage; creates nothing.

    A journal file or SQLite database may be missing (it is created) but its folder must exist;
    an RDB URL needs a known database and its installed driver.
    """
    remember_url_credentials(url)  # before anything shows it: a URL that does not parse keeps them hidden too
    shown = redact_url(url)
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"storage {url!r} is empty; give a database URL (sqlite:///optuna.db, postgresql://HOST/DB) or a .journal file")
    if _is_journal(url):
        path = _journal_path(url)
        if path.is_dir():
            raise ValueError(f"storage {shown!r} is a directory; give a .journal file")
        if not path.parent.is_dir():
            raise ValueError(f"storage {shown!r}: folder {str(path.parent)!r} does not exist")
        return
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        hint = "; a directory is not a storage" if Path(url).expanduser().is_dir() else ""
        raise ValueError(f"storage {shown!r} is not a database URL (e.g. sqlite:///optuna.db, postgresql://HOST/DB) or a .journal file{hint}") from None
    remember_password(parsed.password)  # a password the URL pattern misses ('/', quotes) is redacted too
    shown = redact_url(url)
    try:
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise ValueError(f"storage {shown!r}: unknown database {parsed.drivername!r}; use sqlite, postgresql or mysql, or a .journal file") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = _DRIVER_HINT.get(parsed.get_backend_name(), f"install the Python driver {dialect.driver!r}")
        raise ValueError(f"storage {shown!r}: the {parsed.get_backend_name()} driver is missing ({exc.name or exc}); {hint}") from None
    if parsed.get_backend_name() == "sqlite":
        db = store.sqlite_file(url)
        if db is None or not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"storage {shown!r}: an in-memory SQLite storage is lost at exit; give a file, e.g. sqlite:///optuna.db")
        if db.is_dir():
            raise ValueError(f"storage {shown!r} is a directory; give a database file, e.g. sqlite:///{db / 'optuna.db'}")
        if not db.parent.is_dir():
            raise ValueError(f"storage {shown!r}: folder {str(db.parent)!r} does not exist (it is not created)")


def redact_url(url: str) -> str:
    return tracking.redact_url(url) if isinstance(url, str) else repr(url)


def _seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer number of seconds") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be >= 1")
    return value


def open_storage(url: str, *, must_exist: bool = False) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url``: an RDB URL (SQLite, PostgreSQL, ...) with heartbeats, or a journal file.

    Creating a fresh SQLite database runs schema creation; it happens under a file lock beside
    the database so concurrent launches do not race (other RDBs: retried once). ``must_exist``:
    a missing local file is an error. Heartbeats: a trial whose worker died is failed after
    ``grace_period``, its MLflow run closed FAILED, and the trial re-queued with the same params.
    """
    check_storage_url(url)
    if _is_journal(url):
        path = _journal_path(url)
        if must_exist and not path.is_file():
            raise FileNotFoundError(f"Optuna journal {str(path)!r} does not exist")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    db = store.sqlite_file(url)
    if db is not None and must_exist and not db.is_file():
        raise FileNotFoundError(f"Optuna storage {str(db)!r} does not exist")
    engine_kwargs = {"connect_args": {"timeout": 60}} if db is not None else {"pool_pre_ping": True}
    lock = file_lock(db.with_name(db.name + ".lock")) if db is not None else contextlib.nullcontext()
    kwargs = dict(
        engine_kwargs=engine_kwargs, heartbeat_interval=_seconds("WAVESWEEP_HEARTBEAT_S", HEARTBEAT_S),
        grace_period=_seconds("WAVESWEEP_GRACE_S", GRACE_S), heartbeat_stale_trial_callback=_on_stale_trial,
    )  # fmt: skip
    with lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception:  # noqa: BLE001 - two launchers creating one fresh PostgreSQL schema at once
            if db is not None:
                raise
            time.sleep(1 + random.random())
            return optuna.storages.RDBStorage(url, **kwargs)


def load_named_study(name: str, url: str) -> optuna.Study:
    """The study ``name`` in the existing storage at ``url`` (what ``wavesweep report`` reads); a
    ValueError naming the storage and the studies it holds when there is no such study."""
    storage = open_storage(url, must_exist=True)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ValueError(f"no study {name!r} in {store.located(url)}; studies there: {', '.join(names) or 'none'}") from None


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Does ``storage`` run Optuna heartbeats (RDB storages do; journal files do not)?

    Asked through the storage's public ``get_heartbeat_interval``, never by ``isinstance``; give it
    the storage :func:`open_storage` returned (a study keeps no public handle on its storage).
    """
    get = getattr(storage, "get_heartbeat_interval", None)
    return callable(get) and get() is not None


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat), just failed by ``fail_stale_trials``: close its
    MLflow runs FAILED and re-queue it with the same params.

    A run already FINISHED (the worker died while recording the finished trial in Optuna) is
    retracted the same way, its children too, as ``workers._reconcile_mlflow`` does at the next
    launch: the retry runs in this launch, and the first run must not count beside it."""
    rid = trial.user_attrs.get("mlflow_run_id")
    if rid:
        try:
            client, _ = tracking.init_tracking()
            status = tracking.run_status(client, rid)
            if status == "RUNNING":
                tracking.close_run(client, rid, "FAILED", error="worker lost (no Optuna heartbeat)", tags={"optuna.state": "FAIL"})
            elif status == "FINISHED":
                tracking.close_run(client, rid, "FAILED", error="worker lost (no Optuna heartbeat) while recording its finished "
                                   "trial in Optuna; retracted", tags={"optuna.state": "FAIL"}, finished_too=True)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the next launch reconciles it; never stop the worker here
            log.warning("trial %d: could not close its MLflow run %s: %s", trial.number, rid, exc)
    if not trial.user_attrs.get("surplus"):
        retry(study, trial)
        log.warning("trial %d lost its worker (no heartbeat for %d s): failed, re-queued with the same params", trial.number,
                    _seconds("WAVESWEEP_GRACE_S", GRACE_S))  # fmt: skip


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue ``trial`` again (WAITING, same params) with Optuna's own retry callback.

    ``RetryHeartbeatStaleTrialCallback`` (``RetryFailedTrialCallback`` before Optuna 4.9) keeps
    params, distributions and system attributes (a grid point keeps its ``grid_id``) and records
    ``failed_trial``/``retry_history``; the user attributes (the old MLflow run id, the error) are
    left behind, so the retry gets its own.
    """
    clean = copy.deepcopy(trial)
    clean.user_attrs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        RetryCallback()(study, clean)


def retriable(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> bool:
    """A FAIL trial to run again with the same params: interrupted (Ctrl-C, SIGTERM), or its worker
    died (no ``error`` recorded), or any failed grid point (a grid must be covered). Errors of the
    trial itself are not retried: the same configuration would fail the same way."""
    if trial.state != TrialState.FAIL or trial.user_attrs.get("surplus"):
        return False
    if spec.sampler == "grid":
        # the point is its grid_id, given before any param is suggested: a trial that failed before
        # (or while) suggesting them still took its point, and the retry (grid_id kept) runs it
        return "grid_id" in trial.system_attrs
    if not trial.params and trial.system_attrs.get("fixed_params"):
        # an enqueued configuration (whole or in part) stopped before its objective suggested any
        # param: the retry keeps its fixed params (Optuna's retry copies the system attributes)
        return bool(trial.user_attrs.get("interrupted"))
    if set(trial.params) != {p.name for p in spec.space}:
        return False  # failed before all params were suggested: nothing to repeat
    return bool(trial.user_attrs.get("interrupted")) or "error" not in trial.user_attrs


def requeue_failed(study: optuna.Study, spec: StudySpec, limit: int | None = None) -> list[int]:
    """Re-queue (``retry``) retriable FAIL trials that no trial retries yet, oldest first, at most
    ``limit`` (the trials still missing); returns their numbers.

    A grid point is not re-queued when another trial already covers it.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}  # RetryCallback.retry_history
    key = lambda t: t.system_attrs.get("grid_id")  # noqa: E731 - a grid point, whether or not its params were suggested
    covered = {key(t) for t in trials if t.state != TrialState.FAIL} if spec.sampler == "grid" else set()
    out = []
    for t in trials:
        if limit is not None and len(out) >= limit:
            break
        if t.number in retried or not retriable(t, spec) or (spec.sampler == "grid" and key(t) in covered):
            continue
        retry(study, t)
        if spec.sampler == "grid":
            covered.add(key(t))
        out.append(t.number)
    return out


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


# A sampler is tried on a throw-away in-memory study over the spec's space before anything runs:
# some options pass the constructor and fail only once the sampler's model takes over (TPE's
# n_ei_candidates: 0 fails at trial 11, after ten real trials). The dry run goes that far, up to
# DRY_RUN_TRIALS; GP's model phase (seconds of fitting) is left to the real study.
DRY_RUN_TRIALS = 300


def dry_run_trials(spec: StudySpec) -> int:
    """How many throw-away trials reach the sampler's model phase (0: no dry run)."""
    opts = spec.sampler_options
    if spec.sampler == "tpe":
        return int(opts.get("n_startup_trials", 10)) + 2
    if spec.sampler == "nsga2":  # the second generation is the first made by crossover
        return 2 * int(opts.get("population_size", 50)) + 1
    if spec.sampler == "random":
        return 2
    return 0


def dry_run_sampler(spec: StudySpec) -> None:
    """Raise ``ValueError`` naming the sampler when it fails on a throw-away study of the spec's
    space (random objective values, the spec's directions) within :func:`dry_run_trials`."""
    n = dry_run_trials(spec)
    if not 0 < n <= DRY_RUN_TRIALS:
        return
    values = random.Random(0)
    directions = [o.direction for o in spec.objectives]
    done = 0
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # no "A new study created in memory" lines
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(directions=directions, sampler=make_sampler(spec, spec.seed, 1))
            for done in range(n):
                trial = study.ask()
                for p in spec.space:
                    p.suggest(trial)
                study.tell(trial, [values.random() for _ in directions])
    except Exception as exc:  # noqa: BLE001 - any failure of the sampler is the spec's
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{SAMPLERS[spec.sampler].__name__} fails at trial {done + 1} of a dry run on this space ({msg})") from None
    finally:
        optuna.logging.set_verbosity(verbosity)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cls = PRUNERS[spec.pruner]
    if cls is None:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**spec.pruner_options)


def load_study(spec: StudySpec, storage: Any, *, seed: int = 0, workers: int = 1) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec, seed, workers), pruner=make_pruner(spec))


#: study user attribute saying the identity digests are of the values the trials run with
#: (:func:`_identity`); absent in studies recorded before: theirs are of the spec as written
IDENTITY_FORM_ATTR = "identity_form"
IDENTITY_FORM = "resolved"


def _identity(spec: StudySpec, *, as_written: bool = False) -> dict[str, tuple[str, str, dict[str, str]]]:
    """``{user attribute: (what it covers, digest, parts)}``: the fixed trial parameters (with the
    replicates), the search space and the sampler, each a short digest of its canonical JSON, and
    its parts (each fixed value, each searched parameter's definition, the sampler's name and
    options) as canonical JSON each, so that a changed spec is told which of them changed
    (:func:`encode_parts`).

    The values are those the trials run with: each fixed value as the TrialConfig field takes it
    (``percentile: 10`` and ``10.0`` are one value), a fixed value equal to the field's default
    left out (``scope: layer`` given or not is one spec), a range's ends and step in its kind (an
    int range's step 1 whether given or not), a categorical's numbers as numbers (Optuna suggests
    the choices as written and compares them by ``==`` on a resume: ``"true"`` is not ``true``).
    ``as_written``: the digests of studies recorded before (``spec.fixed`` and the ranges as the
    YAML gave them), still accepted for them (:func:`open_study`)."""
    import dataclasses
    import hashlib
    import json

    from wavesweep.config import TrialConfig

    def canon(obj: Any) -> str:
        return json.dumps(obj, sort_keys=True, default=str)

    def digest(obj: Any) -> str:
        return hashlib.sha256(canon(obj).encode()).hexdigest()[:16]

    if as_written:
        fixed = {**spec.fixed, "replicates": spec.replicates}
        space = [dataclasses.asdict(p) for p in spec.space]
    else:
        run, default = TrialConfig.from_mapping(dict(spec.fixed)), TrialConfig()
        fixed = {k: getattr(run, k) for k in spec.fixed if getattr(run, k) != getattr(default, k)}
        fixed["replicates"] = spec.replicates
        space = []
        for p in spec.space:
            d = dataclasses.asdict(p)
            if p.kind == "categorical":
                # as Optuna compares them on a resume (its distribution's choices by ==): 10 and 10.0
                # are one choice, "true" and true are not (Optuna refuses the other as a new value space)
                d["choices"] = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in p.choices]
            else:
                num = int if p.kind == "int" else float
                d |= {"low": num(p.low), "high": num(p.high),
                      "step": int(p.step or 1) if p.kind == "int" else (None if p.step is None else float(p.step))}
            space.append(d)
    # a grid's seed orders its points, which trials refer to by index: it is part of the grid
    sampler = {"name": spec.sampler, **spec.sampler_options, **({"seed": spec.seed} if spec.sampler == "grid" else {})}
    return {
        "fixed_sha256": ("fixed parameters (base, fixed, replicates)", digest(fixed),
                         {k: canon(v) for k, v in fixed.items()}),
        "space_sha256": ("search space", digest(space), {p["name"]: canon(p) for p in space}),
        "sampler_sha256": ("sampler or sampler options", digest(sampler), {k: canon(v) for k, v in sampler.items()}),
    }


def _default_parts() -> dict[str, str]:
    """Every TrialConfig field's default as :func:`_identity` writes a part."""
    import dataclasses
    import json

    from wavesweep.config import TrialConfig

    return {f.name: json.dumps(getattr(TrialConfig(), f.name), sort_keys=True, default=str) for f in dataclasses.fields(TrialConfig)}


def _parts_attr(attr: str) -> str:
    """The study user attribute that holds an identity attribute's parts (:func:`encode_parts`)."""
    return attr.replace("_sha256", "_parts")


#: study user attributes are short scalars (table cells in optuna-dashboard and `optuna studies`)
PARTS_MAX_CHARS = 200
#: a part's value is kept as it is up to this length, else as a digest ("#" and 6 hex digits)
PART_VALUE_CHARS = 16


def encode_parts(parts: dict[str, str]) -> str | None:
    """``'layout="filter";level=2;weights=#1a2b3c'``: each part's canonical JSON when short, else
    a digest of it; all digests when that is still longer than :data:`PARTS_MAX_CHARS`; None when
    even that is (the mismatch message then names no part)."""
    import hashlib

    def dig(v: str) -> str:
        return "#" + hashlib.sha256(v.encode()).hexdigest()[:6]

    for limit in (PART_VALUE_CHARS, -1):
        text = ";".join(f"{k}={v if len(v) <= limit and not set(v) & set(';=#') else dig(v)}"
                        for k, v in sorted(parts.items()))
        if len(text) <= PARTS_MAX_CHARS:
            return text
    return None


def decode_parts(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def changed_parts(have: str, want: dict[str, str], defaults: dict[str, str] | None = None) -> str:
    """``'level: 2 -> 3; layout: (absent) -> "kernel"; wavelet: changed'``: what differs between
    the recorded parts (:func:`encode_parts`) and the spec's, by name. A part recorded as a digest
    is compared by digest and said to have changed. ``defaults``: the value a part left out stands
    for (a fixed value equal to the TrialConfig default), written as ``3 (default)``."""
    import hashlib

    old = decode_parts(have)
    out = []
    defaults = defaults or {}
    for k in sorted(set(old) | set(want)):
        a, b = old.get(k), want.get(k)
        if k in defaults:  # left out as the default: say which value that is
            a, b = (f"{defaults[k]} (default)" if v is None else v for v in (a, b))
        if a is not None and b is not None:
            if a.startswith("#"):
                if a != "#" + hashlib.sha256(b.encode()).hexdigest()[:6]:
                    out.append(f"{k}: changed")
            elif a != b:
                out.append(f"{k}: {a} -> {b if len(b) <= 40 else 'changed'}")
        elif a is None:
            out.append(f"{k}: added" if len(b) > 40 else f"{k}: (absent) -> {b}")
        else:
            out.append(f"{k}: removed" if a.startswith("#") else f"{k}: {a} -> (absent)")
    return "; ".join(out)


def create_study(spec: StudySpec, storage_url: str, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study (or load it when it exists, checking it has the spec's objectives) in
    ``storage`` (:func:`open_storage` of ``storage_url`` when not given)."""
    return open_study(spec, storage_url, storage)[0]


def open_study(spec: StudySpec, storage_url: str, storage: optuna.storages.BaseStorage | None = None) -> tuple[optuna.Study, bool]:
    """:func:`create_study`, and whether this call created the study: of launchers starting at once
    on a fresh study exactly one did (the storage refuses a second study of one name), and that
    one opens the study's MLflow run."""
    storage = open_storage(storage_url) if storage is None else storage
    kwargs = dict(storage=storage, study_name=spec.name, sampler=make_sampler(spec, spec.seed, 1), pruner=make_pruner(spec))
    try:
        study = optuna.create_study(directions=spec.directions, load_if_exists=False, **kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        created = False
    want = [(o.metric, o.direction) for o in spec.objectives]
    if "objectives" not in study.user_attrs:
        # Study user attributes are short scalars (optuna-dashboard and `optuna studies` show them
        # as table cells); the spec itself is an artifact of the study's MLflow run (spec/).
        study.set_user_attr("objectives", encode_objectives(want))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.selection_metrics)  # what the values are (val_top1 with a validation part)
    elif (have := study_objectives(study)) != want:
        raise ValueError(
            f"study {spec.name!r} in {tracking.redact_url(storage_url)} was created with objectives "
            f"{encode_objectives(have)}, the spec asks for {encode_objectives(want)}; give the spec another study: name"
        )
    selected = study.metric_names
    if selected is not None and list(selected) != spec.selection_metrics:  # e.g. val_fraction changed between launches
        raise ValueError(
            f"study {spec.name!r} in {tracking.redact_url(storage_url)} selects on {', '.join(selected)}, the spec on "
            f"{', '.join(spec.selection_metrics)} (val_fraction changed?); give the spec another study: name"
        )
    resolved = study.user_attrs.get(IDENTITY_FORM_ATTR) == IDENTITY_FORM
    written = _identity(spec, as_written=True)
    keep = []  # every attribute is checked before any is written: a refused launch changes nothing
    for attr, (what, digest, parts) in _identity(spec).items():  # what the trials compute and how they are proposed
        have = study.user_attrs.get(attr)
        recorded = study.user_attrs.get(_parts_attr(attr))  # absent in studies recorded before parts were kept
        # a new study, one recorded before this check, or one whose digests are of the spec as written
        # (recorded before IDENTITY_FORM; from now on its digests are of the values run)
        if have is None or have == digest or (not resolved and have == written[attr][1]):
            keep.append((attr, digest, parts, have != digest, recorded))
            continue
        changed = ""
        if isinstance(recorded, str):
            # parts recorded in either form (a study recorded before IDENTITY_FORM: as written, or
            # partly rewritten by a launch stopped between two writes): the reading with fewer changes
            found = [changed_parts(recorded, parts, _default_parts() if attr == "fixed_sha256" else None)]
            if not resolved:
                found.append(changed_parts(recorded, written[attr][2]))
            changed = min((c for c in found if c), key=len, default="")
        raise ValueError(
            f"study {spec.name!r} in {tracking.redact_url(storage_url)} ran its trials with other {what}"
            f"{f' ({changed})' if changed else ''}; mixing them would compare trials that are not alike: give the "
            f"changed spec another study: name (n_trials, timeout, storage, max_failures, pruner and description "
            f"may change between launches)"
        )
    kind, had = INTERMEDIATE.get(spec.pruner), study.user_attrs.get(INTERMEDIATE_ATTR)
    if kind is not None and had is not None and kind != had:
        raise ValueError(
            f"study {spec.name!r} in {tracking.redact_url(storage_url)} gave its pruner {INTERMEDIATE_WORDS.get(had, had)} "
            f"at each evaluation chunk; pruner {spec.pruner!r} is given {INTERMEDIATE_WORDS[kind]}, and would compare its "
            f"trials' values with the others': "
            f"keep a pruner of the same kind (or none), or give the spec another study: name"
        )
    for attr, digest, parts, rewrite, recorded in keep:
        if rewrite:
            study.set_user_attr(attr, digest)
        if (rewrite or recorded is None) and (encoded := encode_parts(parts)) is not None:
            study.set_user_attr(_parts_attr(attr), encoded)
    if not resolved:
        study.set_user_attr(IDENTITY_FORM_ATTR, IDENTITY_FORM)
    if kind is not None and had is None:
        study.set_user_attr(INTERMEDIATE_ATTR, kind)
    if spec.text and study.user_attrs.get("spec_sha256") != (digest := tracking.spec_sha256(spec.text)):
        if "spec_sha256" in study.user_attrs:
            # the checks above passed: only what may change between launches changed (n_trials, timeout, ...)
            log.info("study %s: the spec differs from the last launch's in what may change between launches (n_trials, "
                     "timeout, storage, max_failures, pruner, description; sha256 %s, now %s): the study run's spec/ "
                     "artifact now holds this one", spec.name, study.user_attrs["spec_sha256"][:12], digest[:12])  # fmt: skip
        study.set_user_attr("spec_sha256", digest)
    return study, created
