"""Optuna studies from ``sweeps/*.yaml`` specs: search, resume, parallel workers, early stopping.

The only module that imports optuna. Every study trial is one ``runner.run_tracked_trial`` (the
code path of ``mlflow run`` and ``wavesweep trial``), nested under the study's MLflow run.

Spec (YAML; every key optional except ``space``/``objectives`` as noted)::

    study: digits-resnet18          # study name (default: the file's stem)
    description: free text
    storage: sqlite:///optuna.db    # Optuna storage URL or a *.journal file (default: optuna.db here)
    experiment: wavesweep           # MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or wavesweep)
    base: {model: resnet18, dataset: digits, eval_limit: 500, seed: 0}   # base model and data
    fixed: {mode: periodization, timing_batches: 2}                      # other fixed trial values
    space:                          # TrialConfig field -> list (categorical) or range
      wavelet: [haar, bior1.3]
      level: {low: 1, high: 5}
      percentile: {low: 10, high: 90, step: 5}      # also: log: true
    objectives: {top1: maximize}    # any metric of tracking.trial_metrics()["parent"], in order
    sampler: tpe                    # or {name: tpe|random|grid|gp|nsga2, seed: 0, <sampler options>}
    pruner: none                    # or {name: median|wilcoxon, <pruner options>}
    n_trials: 20                    # total wanted in the study (COMPLETE + PRUNED); grid: default = grid size
    timeout: null                   # seconds per launch
    max_failures: 3                 # consecutive failed trials that stop a launch

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
import difflib
import fcntl
import inspect
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from wavesweep import runner, tracking
from wavesweep.config import TrialConfig
from wavesweep.fileio import file_lock

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_S = 20  # Optuna heartbeat of a running trial (RDB storages)
GRACE_S = 60  # a RUNNING trial without heartbeat for this long belongs to a dead worker
POLL_S = 2.0  # how often an idle worker / the progress bar re-reads the storage
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials that count towards n_trials

TOP_KEYS = (
    "study", "description", "storage", "experiment", "base", "fixed", "space", "objectives",
    "sampler", "pruner", "n_trials", "timeout", "max_failures",
)  # fmt: skip
BASE_KEYS = ("model", "dataset", "eval_limit", "seed", "weights", "data_root", "device", "batch_size")
RANGE_KEYS = ("low", "high", "step", "log")
DIRECTIONS = ("maximize", "minimize")
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
# Options that need Python objects, never YAML values.
_NOT_OPTIONS = {"search_space", "seed", "constraints_func", "gamma", "weights", "independent_sampler",
                "mutation", "crossover", "elite_population_selection_strategy", "child_generation_strategy",
                "after_trial_strategy"}  # fmt: skip
_PRUNABLE_OBJECTIVE = "top1"  # the chunk reports are partial dwt top-1: only that objective can be pruned on


# --------------------------------------------------------------------------- spec


class SpecError(ValueError):
    """A spec problem at ``key`` (a path of keys); the loader adds the file and line."""

    def __init__(self, key: tuple[str, ...], message: str, *, line: int | None = None) -> None:
        super().__init__(f"{'.'.join(key)}: {message}")
        self.key = key
        self.message = message
        self.line = line  # when the key path alone does not locate it (a duplicate key)


def objective_metrics() -> list[str]:
    """Every metric name an objective may use: the keys of ``tracking.trial_metrics(...)["parent"]``."""
    from wavesweep.stats import PairedComparison

    timing = ("infer_median_ms", "infer_p95_ms", "infer_ms_per_example", "infer_examples_per_s")
    per = [*tracking.METRIC_KEYS, *tracking.STAT_KEYS, "pruned_fraction", *timing,
           "drop_top1", "drop_top5", "drop_f1_macro", "increase_loss"]  # fmt: skip
    names = [*per, *(f"base_{k}" for k in (*tracking.METRIC_KEYS, *timing)), "n_eval"]
    names += [f"{m}_{k}" for m in ("magnitude", "random") for k in per]
    paired = [f.name for f in fields(PairedComparison) if f.name != "n_boot"]
    names += [f"dwt_vs_{m}_{k}" for m in ("magnitude", "random") for k in paired]
    names += ["gain_top1_vs_magnitude", "gain_top1_vs_random"]
    return names


@dataclass(frozen=True)
class Param:
    """One search-space dimension over the TrialConfig field ``name``."""

    name: str
    kind: str  # "categorical", "int" or "float"
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self) -> list[Any]:
        """The values a grid sampler visits (ranges need a step)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None or self.log:
            raise SpecError(("space", self.name), "the grid sampler needs a list or a range with a step (and no log)")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        vals = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in vals] if self.kind == "int" else [round(float(v), 12) for v in vals]


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec (see the module docstring for the YAML form).

    ``fixed`` holds every non-searched TrialConfig value the spec sets (``base`` and ``fixed``
    merged); fields set nowhere take TrialConfig's defaults.
    """

    name: str
    space: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    experiment: str | None = None
    max_failures: int = 3
    description: str = ""
    seed: int = 0  # sampler seed
    path: Path | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SpecError(("study",), f"study name must be a non-empty string, got {self.name!r}")
        cfg_fields = {f.name for f in fields(TrialConfig)}
        for key in self.fixed:
            if key not in cfg_fields:
                raise SpecError(("fixed", key), _unknown("trial parameter", key, cfg_fields))
        names = [p.name for p in self.space]
        for p in self.space:
            if p.name not in cfg_fields:
                raise SpecError(("space", p.name), _unknown("trial parameter", p.name, cfg_fields))
            if p.name in self.fixed:
                raise SpecError(("space", p.name), "is also fixed (base/fixed): give it in one place")
            if names.count(p.name) > 1:
                raise SpecError(("space", p.name), "appears twice")
        self._check_values()
        if not self.objectives:
            raise SpecError(("objectives",), "name at least one objective, e.g. {top1: maximize}")
        known = set(objective_metrics())
        for o in self.objectives:
            if o.metric not in known:
                raise SpecError(("objectives", o.metric), _unknown("objective metric", o.metric, known))
            if o.direction not in DIRECTIONS:
                raise SpecError(("objectives", o.metric), f"direction {o.direction!r} is not one of {', '.join(DIRECTIONS)}")
            if o.metric.startswith(("infer_", "magnitude_infer", "random_infer", "base_infer")) and not self.fixed.get("timing_batches", 1):
                raise SpecError(("objectives", o.metric), "timing metrics need timing_batches > 0")
        if len({o.metric for o in self.objectives}) != len(self.objectives):
            raise SpecError(("objectives",), "an objective appears twice")
        if self.sampler not in SAMPLERS:
            raise SpecError(("sampler",), _unknown("sampler", self.sampler, SAMPLERS))
        if self.pruner not in PRUNERS:
            raise SpecError(("pruner",), _unknown("pruner", self.pruner, PRUNERS))
        if self.pruner != "none":
            if len(self.objectives) > 1:
                raise SpecError(("pruner",), "multi-objective studies cannot prune; use pruner: none")
            o = self.objectives[0]
            if (o.metric, o.direction) != (_PRUNABLE_OBJECTIVE, "maximize"):
                raise SpecError(("pruner",), f"early stopping reports partial dwt top1, so it needs the objective top1: maximize (got {o.metric}: {o.direction})")
        _check_options(("sampler",), SAMPLERS[self.sampler], self.sampler_options)
        if PRUNERS[self.pruner] is not None:
            _check_options(("pruner",), PRUNERS[self.pruner], self.pruner_options)
        elif self.pruner_options:
            raise SpecError(("pruner", next(iter(self.pruner_options))), "pruner none takes no options")
        if self.sampler == "grid":
            size = self.grid_size()
            if self.n_trials is not None and self.n_trials > size:
                raise SpecError(("n_trials",), f"n_trials={self.n_trials} exceeds the grid's {size} points")
        if self.n_trials is not None and (not isinstance(self.n_trials, int) or isinstance(self.n_trials, bool) or self.n_trials < 1):
            raise SpecError(("n_trials",), f"n_trials must be a positive integer, got {self.n_trials!r}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise SpecError(("timeout",), f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.n_trials is None and self.timeout is None and self.sampler != "grid":
            raise SpecError(("n_trials",), "give n_trials or timeout (or both)")
        if not isinstance(self.max_failures, int) or self.max_failures < 1:
            raise SpecError(("max_failures",), f"max_failures must be a positive integer, got {self.max_failures!r}")
        if self.storage is not None and not isinstance(self.storage, str):
            raise SpecError(("storage",), f"storage must be a URL or a .journal path, got {self.storage!r}")

    def _check_values(self) -> None:
        """Every fixed value and every choice / range end must make a valid TrialConfig on its own."""
        for key, value in self.fixed.items():
            _check_trial_value(("fixed", key), {key: value})
        try:
            TrialConfig.from_mapping(dict(self.fixed))
        except (ValueError, TypeError) as exc:
            raise SpecError(("fixed",), str(exc)) from None
        typ = {f.name: type(f.default) for f in fields(TrialConfig)}
        for p in self.space:
            if p.kind == "categorical":
                if not p.choices:
                    raise SpecError(("space", p.name), "an empty list of choices")
                for v in p.choices:
                    if not isinstance(v, (str, int, float, bool)):
                        raise SpecError(("space", p.name), f"choice {v!r} is not a scalar")
                    _check_trial_value(("space", p.name), {**self.fixed, p.name: v})
                continue
            if typ[p.name] not in (int, float):
                raise SpecError(("space", p.name), f"a range needs a numeric parameter; {p.name} is {typ[p.name].__name__}: give a list")
            if p.kind != {int: "int", float: "float"}[typ[p.name]]:
                raise SpecError(("space", p.name), f"{p.name} is {typ[p.name].__name__}")
            for end in ("low", "high"):
                v = getattr(p, end)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or (p.kind == "int" and not float(v).is_integer()):
                    raise SpecError(("space", p.name, end), f"{end}={v!r} is not {'an integer' if p.kind == 'int' else 'a number'}")
                _check_trial_value(("space", p.name, end), {**self.fixed, p.name: v})
            if p.low > p.high:
                raise SpecError(("space", p.name, "low"), f"low={p.low} is above high={p.high}")
            if p.step is not None and (not isinstance(p.step, (int, float)) or p.step <= 0 or (p.kind == "int" and not float(p.step).is_integer())):
                raise SpecError(("space", p.name, "step"), f"step={p.step!r} must be a positive {'integer' if p.kind == 'int' else 'number'}")
            if p.log and p.low <= 0:
                raise SpecError(("space", p.name, "log"), f"a log range needs low > 0, got low={p.low}")
            if p.log and p.step is not None and p.kind == "float":
                raise SpecError(("space", p.name, "step"), "a float range cannot have both step and log")

    def grid_size(self) -> int:
        return int(np.prod([len(p.grid()) for p in self.space])) if self.space else 1

    def grid_space(self) -> dict[str, list[Any]]:
        return {p.name: p.grid() for p in self.space}

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def total_trials(self) -> int | None:
        """The study's total (``n_trials``; for a grid without one, the grid size)."""
        if self.n_trials is None and self.sampler == "grid":
            return self.grid_size()
        return self.n_trials

    def summary_params(self) -> dict[str, Any]:
        """Flat description for the study's MLflow run params."""
        out: dict[str, Any] = {
            "study": self.name, "sampler": self.sampler, "pruner": self.pruner,
            "objectives": ",".join(f"{o.metric}:{o.direction}" for o in self.objectives),
            "space": ",".join(p.name for p in self.space), "sampler_seed": self.seed,
        }  # fmt: skip
        out |= {f"fixed.{k}": v for k, v in self.fixed.items()}
        for p in self.space:
            out[f"space.{p.name}"] = list(p.choices) if p.kind == "categorical" else f"{p.kind}[{p.low},{p.high}]" + (
                f" step {p.step}" if p.step else "") + (" log" if p.log else "")  # fmt: skip
        return out


def _unknown(what: str, value: object, valid: Any) -> str:
    valid = sorted(map(str, valid))
    close = difflib.get_close_matches(str(value), valid, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    shown = ", ".join(valid) if len(valid) <= 25 else f"{len(valid)} names (see wavesweep.study.objective_metrics())"
    return f"unknown {what} {value!r}{hint}" if close else f"unknown {what} {value!r}; valid: {shown}"


def _check_trial_value(key: tuple[str, ...], values: dict[str, Any]) -> None:
    try:
        TrialConfig.from_mapping(values)
    except (ValueError, TypeError) as exc:
        raise SpecError(key, str(exc)) from None


def _check_options(key: tuple[str, ...], cls: type, options: dict[str, Any]) -> None:
    sig = inspect.signature(cls.__init__).parameters
    valid = [n for n in sig if n not in ("self", "args", "kwargs") and n not in _NOT_OPTIONS]
    for name in options:
        if name not in valid:
            raise SpecError((*key, name), _unknown(f"{cls.__name__} option", name, valid))
    if cls is optuna.samplers.GridSampler:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(**options)
    except (ValueError, TypeError) as exc:
        raise SpecError(key, f"{cls.__name__}: {exc}") from None


# --------------------------------------------------------------------------- YAML with line numbers


def _lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    """Record the 1-based line of every mapping key (and list item) under ``path``; reject duplicate keys."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for knode, vnode in node.value:
            key = str(knode.value)
            if key in seen:
                raise SpecError((*path, key), "duplicate key", line=knode.start_mark.line + 1)
            seen.add(key)
            out[(*path, key)] = knode.start_mark.line + 1
            _lines(vnode, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault((*path, str(i)), item.start_mark.line + 1)


def _line_of(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    for n in range(len(key), -1, -1):
        if key[:n] in lines:
            return lines[key[:n]]
    return None


def load_spec(path: str | os.PathLike) -> StudySpec:
    """Read and validate a spec file; errors are one-line ``ValueError``s naming the key and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study spec {str(path)!r} does not exist")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}{at}: invalid YAML (line {mark.line + 1 if mark else '?'}): {problem}") from None
    lines: dict[tuple[str, ...], int] = {}
    try:
        if root is not None:
            _lines(root, (), lines)
        return spec_from_mapping(data, name=path.stem, path=path, text=text)
    except SpecError as exc:
        line = exc.line or _line_of(lines, exc.key)
        at = f":{line}" if line else ""
        raise ValueError(f"{path}{at}: {'.'.join(exc.key) or 'spec'}: {exc.message}") from None


def spec_from_mapping(data: Any, *, name: str = "study", path: Path | None = None, text: str = "") -> StudySpec:
    """Build a StudySpec from the parsed YAML mapping; raises ``SpecError`` naming the key."""
    if not isinstance(data, dict):
        raise SpecError((), f"a spec is a mapping of keys ({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError((str(key),), _unknown("spec key", key, TOP_KEYS))
    base = _mapping(data, "base")
    for key in base:
        if key not in BASE_KEYS:
            where = "fixed" if key in {f.name for f in fields(TrialConfig)} else None
            raise SpecError(("base", str(key)), f"not a base key (valid: {', '.join(BASE_KEYS)})" + (f"; put {key} under fixed" if where else ""))
    fixed = _mapping(data, "fixed")
    for key in fixed:
        if key in base:
            raise SpecError(("fixed", str(key)), "is already given under base")
    space_raw = _mapping(data, "space")
    space = tuple(_param(str(k), v) for k, v in space_raw.items())
    objectives = _objectives(data.get("objectives"))
    sampler, sampler_opts = _named(data, "sampler", "tpe")
    seed = sampler_opts.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError(("sampler", "seed"), f"seed must be an integer, got {seed!r}")
    pruner, pruner_opts = _named(data, "pruner", "none")
    for key in ("study", "description", "storage", "experiment"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SpecError((key,), f"must be a string, got {data[key]!r}")
    return StudySpec(
        name=data.get("study") or name,
        space=space,
        objectives=objectives,
        fixed={**{str(k): v for k, v in base.items()}, **{str(k): v for k, v in fixed.items()}},
        sampler=sampler,
        sampler_options=sampler_opts,
        pruner=pruner,
        pruner_options=pruner_opts,
        n_trials=data.get("n_trials"),
        timeout=data.get("timeout"),
        storage=data.get("storage"),
        experiment=data.get("experiment"),
        max_failures=data.get("max_failures", 3),
        description=data.get("description") or "",
        seed=seed,
        path=path,
        text=text,
    )


def _mapping(data: dict, key: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise SpecError((key,), f"must be a mapping, got {type(value).__name__}")
    return value


def _param(name: str, raw: Any) -> Param:
    if isinstance(raw, list):
        return Param(name, "categorical", choices=tuple(raw))
    if not isinstance(raw, dict):
        raise SpecError(("space", name), f"give a list of choices or a range {{low, high[, step][, log]}}, got {raw!r}")
    for key in raw:
        if key not in RANGE_KEYS:
            raise SpecError(("space", name, str(key)), _unknown("range key", key, RANGE_KEYS))
    for key in ("low", "high"):
        if key not in raw:
            raise SpecError(("space", name), f"a range needs {key}")
    typ = {f.name: type(f.default) for f in fields(TrialConfig)}.get(name)
    kind = "int" if typ is int else "float"
    log_ = raw.get("log", False)
    if not isinstance(log_, bool):
        raise SpecError(("space", name, "log"), f"log must be true or false, got {log_!r}")
    return Param(name, kind, low=raw["low"], high=raw["high"], step=raw.get("step"), log=log_)


def _objectives(raw: Any) -> tuple[Objective, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise SpecError(("objectives",), f"a mapping metric -> maximize|minimize, e.g. {{top1: maximize}}; got {raw!r}")
    return tuple(Objective(str(k), str(v)) for k, v in raw.items())


def _named(data: dict, key: str, default: str) -> tuple[str, dict[str, Any]]:
    raw = data.get(key, default)
    if raw is None:
        raw = default
    if isinstance(raw, str):
        return raw.lower().replace("-", "").replace("_", ""), {}
    if isinstance(raw, dict):
        opts = {str(k): v for k, v in raw.items()}
        name = opts.pop("name", None)
        if not isinstance(name, str):
            raise SpecError((key,), f"a {key} mapping needs name: (e.g. {{name: {default}}})")
        return name.lower().replace("-", "").replace("_", ""), opts
    raise SpecError((key,), f"a name or a mapping with name:, got {raw!r}")


# --------------------------------------------------------------------------- storage


def _is_journal(url: str) -> bool:
    return url.endswith(".journal") or url.startswith("journal:")


def _sqlite_file(url: str) -> Path | None:
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
    db = _sqlite_file(url)
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


def _heartbeat(study: optuna.Study) -> bool:
    return isinstance(study._storage, optuna.storages.RDBStorage)


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat): close its MLflow run too."""
    rid = trial.user_attrs.get("mlflow_run_id")
    if rid:
        client, _ = tracking.init_tracking()
        if tracking.run_status(client, rid) == "RUNNING":
            tracking.set_run_status(client, rid, "FAILED", error="worker lost (no Optuna heartbeat)", tags={"optuna.state": "FAIL"})


def _sampler(spec: StudySpec, seed: int, workers: int) -> optuna.samplers.BaseSampler:
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


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cls = PRUNERS[spec.pruner]
    if cls is None:
        return optuna.pruners.NopPruner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**spec.pruner_options)


def _load(spec: StudySpec, storage: Any, *, seed: int = 0, workers: int = 1) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec, seed, workers), pruner=_pruner(spec))


def create_study(spec: StudySpec, storage_url: str) -> optuna.Study:
    """Create the study (or load it when it exists, checking it has the spec's objectives)."""
    storage = open_storage(storage_url)
    study = optuna.create_study(
        storage=storage, study_name=spec.name, directions=spec.directions, load_if_exists=True,
        sampler=_sampler(spec, spec.seed, 1), pruner=_pruner(spec),
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


# --------------------------------------------------------------------------- objective and workers


@dataclass
class _Launch:
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


class _SlotLock:
    """An fcntl lock held from "count trials" until the new trial exists (released by the objective)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a+")
        self.held = False

    def acquire(self) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self._fh, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        self._fh.close()


class _Surplus(Exception):
    """This trial would exceed n_trials (another machine's worker got there first)."""


_EVAL_SIZES: dict[tuple, int] = {}


def _eval_size(cfg: TrialConfig) -> int:
    """Number of evaluation examples of ``cfg`` (cached per process; data loading is cheap for digits)."""
    key = (cfg.dataset, cfg.data_root, cfg.eval_limit, cfg.seed)
    if key not in _EVAL_SIZES:
        from wavesweep import trial as trial_mod

        _EVAL_SIZES[key] = len(trial_mod.load_eval_set(cfg)[1])
    return _EVAL_SIZES[key]


def _chunk_sizes(n: int) -> list[int]:
    """Sizes of the evaluation chunks ``evaluate.evaluate_chunks`` cuts ``n`` examples into."""
    from wavesweep.trial import N_CHUNKS

    return [len(p) for p in np.array_split(np.arange(n), min(N_CHUNKS, n)) if len(p)]


RECORD_KEYS = (
    "top1", "top5", "loss", "f1_macro", "magnitude_top1", "random_top1", "base_top1", "magnitude_top5", "random_top5",
    "pruned_fraction", "magnitude_pruned_fraction", "random_pruned_fraction", "compression_ratio",
    "magnitude_compression_ratio", "random_compression_ratio", "coeff_sparsity", "weight_sparsity_target",
    "weight_sparsity_model", "stored_bytes", "dense_bytes", "mean_rel_l2_error", "magnitude_mean_rel_l2_error",
    "gain_top1_vs_magnitude", "gain_top1_vs_random", "n_eval",
    *(f"dwt_vs_{m}_{k}" for m in ("magnitude", "random") for k in ("gap", "ci_low", "ci_high", "mcnemar_p", "only_a", "only_b")),
)  # fmt: skip


class _Objective:
    """Suggest a TrialConfig, run the tracked trial, record both sides, return the objective values."""

    def __init__(self, launch: _Launch, slot: _SlotLock) -> None:
        self.launch = launch
        self.spec = launch.spec
        self.slot = slot
        self.client, _ = tracking.init_tracking(experiment=launch.experiment)
        self.last_outcome = ""
        self.last_error = ""

    def __call__(self, trial: optuna.Trial) -> Any:
        self.slot.release()  # the trial exists (RUNNING): other workers may count it now
        self.last_outcome, self.last_error = "FAIL", ""
        study, n = trial.study, self.launch.n_trials
        if n is not None:
            alive = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
            if sum(t.number < trial.number for t in alive) >= n:
                trial.set_user_attr("surplus", True)
                self.last_outcome = "SURPLUS"
                raise _Surplus(f"trial {trial.number} not needed: the study already has {n} trials")
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        cfg = TrialConfig.from_mapping({**self.spec.fixed, **params})
        trial.set_user_attr("config", cfg.to_dict())
        partial: list[tuple[int, float]] = []
        run_ids: list[str] = []

        def on_run(run_id: str) -> None:
            run_ids.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)

        reporter = self._reporter(trial, cfg, partial) if self.spec.pruner != "none" else None
        tags = {"optuna.trial_number": str(trial.number), "optuna.study": self.spec.name, "optuna.trial_id": str(trial._trial_id)}
        try:
            result, run_id = runner.run_tracked_trial(
                cfg, parent_run_id=self.launch.parent_run_id, experiment=self.launch.experiment, reporter=reporter,
                tags=tags, on_run=on_run, early_stop=(optuna.TrialPruned,),
            )  # fmt: skip
        except optuna.TrialPruned:
            step = partial[-1][0] if partial else -1
            sizes = _chunk_sizes(_eval_size(cfg))
            trial.set_user_attr("metrics", {"pruned_step": step, "partial_top1": partial[-1][1] if partial else None,
                                            "examples_evaluated": int(sum(sizes[: step + 1]))})  # fmt: skip
            self._finish_run(run_ids, "PRUNED", partial)
            self.last_outcome = "PRUNED"
            raise
        except BaseException as exc:
            self._finish_run(run_ids, "FAIL", partial)
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        metrics = tracking.trial_metrics(result)["parent"]
        values = []
        for o in self.spec.objectives:
            v = metrics.get(o.metric)
            if v is None or not math.isfinite(v):
                tracking.set_run_status(self.client, run_id, "FAILED", error=f"objective {o.metric}={v}", tags={"optuna.state": "FAIL"})
                raise ValueError(f"objective {o.metric} is {v} for trial {trial.number}")
            values.append(float(v))
        record = {k: float(metrics[k]) for k in RECORD_KEYS if k in metrics}
        record["examples_evaluated"] = 3 * int(metrics["n_eval"])
        frame = result.outcomes["dwt"].stats.to_frame()
        mag = result.outcomes["magnitude"].stats.to_frame()
        record["layers"] = {
            "name": [str(x) for x in frame["name"]],
            "dwt_coeff_sparsity": [float(x) for x in frame["coeff_sparsity"]],
            "dwt_weight_sparsity": [float(x) for x in frame["weight_sparsity"]],
            "magnitude_weight_sparsity": [float(x) for x in mag["weight_sparsity"]],
            "level_effective": [None if pd.isna(x) else int(x) for x in frame["level_effective"]],
        }
        trial.set_user_attr("metrics", record)
        self._finish_run(run_ids, "COMPLETE", partial, values=values)
        self.last_outcome = "COMPLETE"
        return values[0] if len(values) == 1 else values

    def _reporter(self, trial: optuna.Trial, cfg: TrialConfig, partial: list[tuple[int, float]]):
        wilcoxon = self.spec.pruner == "wilcoxon"

        def report(step: int, top1: float) -> None:
            partial.append((step, float(top1)))
            value = top1
            if wilcoxon:  # the Wilcoxon pruner pairs per-chunk scores (same examples in every trial)
                sizes = _chunk_sizes(_eval_size(cfg))
                seen, before = sum(sizes[: step + 1]), sum(sizes[:step])
                prev = partial[-2][1] if len(partial) > 1 else 0.0
                value = (round(top1 * seen) - round(prev * before)) / sizes[step]
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"chunk {step}: partial dwt top1 {top1:.4f}")

        return report

    def _finish_run(self, run_ids: list[str], state: str, partial: list[tuple[int, float]], values: list[float] | None = None) -> None:
        """Tag the trial's MLflow run with its Optuna state (and the partial accuracy series)."""
        if not run_ids:
            return
        tags: dict[str, Any] = {"optuna.state": state}
        if values is not None:
            tags["optuna.values"] = values
        with contextlib.suppress(Exception):  # bookkeeping must not turn a result into a failure
            tracking.log_batch(self.client, run_ids[0], metrics=[("partial_top1", v, s) for s, v in partial], tags=tags)


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


def _worker_loop(launch: _Launch, index: int, on_trial: Any = None) -> None:
    """Run trials until the study has ``n_trials`` counted trials, the timeout passes, or too many fail."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(launch.storage_url)
    existing = len(optuna.load_study(study_name=launch.spec.name, storage=storage).get_trials(deepcopy=False))
    # A resumed study must not replay the sampler's random stream: seed with the trial count too.
    study = _load(launch.spec, storage, seed=launch.spec.seed + existing + 7919 * index, workers=launch.workers)
    slot = _SlotLock(launch.lock_path)
    objective = _Objective(launch, slot)
    failures = 0
    try:
        while True:
            if launch.timeout is not None and time.time() - launch.t0 >= launch.timeout:
                log.info("worker %d: timeout reached", index)
                return
            if _heartbeat(study):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            slot.acquire()
            try:
                if launch.n_trials is not None:
                    done, running = _counts(study)
                    if done >= launch.n_trials:
                        return
                    if done + running >= launch.n_trials:
                        slot.release()
                        if not _heartbeat(study):  # no way to tell a dead worker's trial: leave it
                            log.warning("%d trial(s) still RUNNING; not waiting for them (storage has no heartbeat)", running)
                            return
                        time.sleep(POLL_S)  # others are running the last trials (or are dead: heartbeat)
                        continue
                study.optimize(objective, n_trials=1, catch=(Exception,))
            finally:
                slot.release()
            if objective.last_outcome == "FAIL":
                failures += 1
                if failures >= launch.spec.max_failures:
                    raise RuntimeError(f"{failures} consecutive trials failed; last: {objective.last_error}")
            elif objective.last_outcome != "SURPLUS":
                failures = 0
            if on_trial is not None:
                on_trial(study)
    finally:
        slot.close()


def _worker_main(launch: _Launch, index: int) -> None:
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


def _run_workers(launch: _Launch, progress: _Progress) -> int:
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
            tracking.set_run_status(client, rid, "FAILED", error="trial failed in Optuna; its worker is gone", tags={"optuna.state": "FAIL"})


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
) -> StudyOutcome:
    """Run (or resume) ``spec``; returns the study, the study's MLflow run id and the final status.

    Status: "FINISHED" (n_trials reached or timeout), "FAILED" (a worker gave up after
    ``max_failures`` consecutive failures). KeyboardInterrupt propagates after the running
    trials were closed (Optuna FAIL, MLflow KILLED) and the study run KILLED.
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
    experiment = None if os.environ.get("MLFLOW_RUN_ID") else spec.experiment
    client, exp_id = tracking.init_tracking(experiment=experiment)
    study = create_study(spec, url)
    parent = tracking.start_study_run(
        client, exp_id, study_name=spec.name, storage=url, spec_file=spec.path, spec_text=spec.text,
        params=spec.summary_params(), existing_run_id=study.user_attrs.get("mlflow_run_id"),
    )  # fmt: skip
    if study.user_attrs.get("mlflow_run_id") != parent:
        study.set_user_attr("mlflow_run_id", parent)
    _reconcile_mlflow(study, client)
    if (k := _requeue_failed_grid_points(study, spec)):
        log.info("re-queued %d grid point(s) of failed trials", k)
    db = _sqlite_file(url)
    lock_dir = db.parent if db is not None else Path(".wavesweep")
    launch = _Launch(
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
        tracking.finish_study_run(client, parent, "KILLED", tags={"error": "interrupted (KeyboardInterrupt)"}, metrics=_study_metrics(study))
        raise
    except RuntimeError as exc:
        status, reason = "FAILED", str(exc)
    finally:
        bar.close()
    tags = {**_best_tags(study, spec), **({"error": reason[:5000]} if reason else {})}
    tracking.finish_study_run(client, parent, status, metrics=_study_metrics(study), tags=tags)
    return StudyOutcome(study, parent, status, reason)


def _study_metrics(study: optuna.Study) -> dict[str, float]:
    trials = study.get_trials(deepcopy=False)
    out = {f"n_{s.name.lower()}": float(sum(t.state == s for t in trials)) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if len(study.directions) == 1 and out["n_complete"]:
        out["best_value"] = float(study.best_value)
    return out


def _best_tags(study: optuna.Study, spec: StudySpec) -> dict[str, Any]:
    best = best_trial(study)
    if best is None:
        return {}
    return {"best_trial_number": best.number, "best_mlflow_run_id": best.user_attrs.get("mlflow_run_id", "")}


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial on the first objective (multi-objective: among the Pareto front)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    pool = study.best_trials if len(study.directions) > 1 else complete
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(pool, key=lambda t: (sign * t.values[0], -t.number))


# --------------------------------------------------------------------------- reports


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, built from Optuna storage alone (params, state, values, recorded metrics)."""
    objectives = study.user_attrs.get("objectives") or [[f"value_{i}", d.name.lower()] for i, d in enumerate(study.directions)]
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "number": t.number, "state": t.state.name,
            "duration_s": t.duration.total_seconds() if t.duration else np.nan,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""), "surplus": bool(t.user_attrs.get("surplus", False)),
        }  # fmt: skip
        row |= t.user_attrs.get("config") or {}
        row |= t.params
        metrics = dict(t.user_attrs.get("metrics") or {})
        row["layers"] = metrics.pop("layers", None)
        row |= metrics
        for i, (metric, _d) in enumerate(objectives):
            row[f"value_{i}"] = t.values[i] if t.values is not None and t.state == TrialState.COMPLETE else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("number").reset_index(drop=True) if len(frame) else frame


def _importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    objectives = study.user_attrs.get("objectives") or []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return out
    for i, (metric, _d) in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[metric] = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("no parameter importances for %s: %s", metric, exc)
    return out


def build_report(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """Write the study's plots and summary tables to ``out_dir``; returns {name: path}."""
    from wavesweep import report

    frame = trials_frame(study)
    objectives = [tuple(o) for o in (study.user_attrs.get("objectives") or [])]
    return report.write_report(frame, out_dir, study_name=study.study_name, objectives=objectives,
                               importances=_importances(study))  # fmt: skip


def _finish_report(study: optuna.Study, report_dir: str | None, register: str | None, client: Any, parent: str | None) -> list[str]:
    """Report (and register) after a study or on demand; returns lines for the CLI to print."""
    lines = []
    out = Path(report_dir) if report_dir else Path("reports") / study.study_name
    files = build_report(study, out)
    lines.append(f"report: {out} ({', '.join(sorted(p.name for p in files.values()))})")
    if parent and tracking.run_status(client, parent) is not None:
        tracking.log_study_report(client, parent, out)
        lines.append(f"report logged on study run {parent} under report/")
    if register:
        best = best_trial(study)
        if best is None or not best.user_attrs.get("mlflow_run_id"):
            raise ValueError(f"study {study.study_name!r} has no complete trial to register")
        mv = tracking.register_model(best.user_attrs["mlflow_run_id"], name=register, alias="champion")
        lines.append(f"registered best trial {best.number} as {mv.name} version {mv.version} alias champion "
                     f"(load: mlflow.pytorch.load_model('models:/{mv.name}@champion'))")  # fmt: skip
        if parent:
            tracking.set_run_tags(client, parent, {"registered_model": f"{mv.name}/{mv.version}"})
    return lines


def _summary_lines(study: optuna.Study, parent: str, url: str) -> list[str]:
    m = _study_metrics(study)
    lines = [f"study {study.study_name}: {int(m['n_complete'])} complete, {int(m['n_pruned'])} pruned, {int(m['n_fail'])} failed "
             f"(storage {tracking.redact_url(url)}, MLflow run {parent} at {tracking.tracking_uri()})"]  # fmt: skip
    best = best_trial(study)
    if best is not None:
        objectives = study.user_attrs.get("objectives") or []
        vals = ", ".join(f"{o[0]}={v:.4f}" for o, v in zip(objectives, best.values))
        lines.append(f"best trial {best.number}: {vals} params {best.params} (MLflow run {best.user_attrs.get('mlflow_run_id')})")
    return lines


def main_study(args: Any) -> int:
    """``wavesweep study SPEC``: run or resume; report; optionally register the best model."""
    spec = load_spec(args.spec)
    n_trials = getattr(args, "n_trials", None)
    if n_trials is not None and n_trials < 0:
        raise ValueError(f"--n-trials={n_trials} must be >= 0 (0: the spec's n_trials)")
    outcome = run_study(
        spec, n_trials=n_trials or None, timeout=getattr(args, "timeout", None), storage=getattr(args, "storage", None),
        workers=getattr(args, "workers", 1) or 1, progress=not getattr(args, "quiet", False),
    )  # fmt: skip
    url = getattr(args, "storage", None) or spec.storage or DEFAULT_STORAGE
    study, parent = outcome.study, outcome.run_id
    client, _ = tracking.init_tracking(experiment=None if os.environ.get("MLFLOW_RUN_ID") else spec.experiment)
    for line in _summary_lines(study, parent, url):
        print(line)
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for line in _finish_report(study, getattr(args, "report_dir", None), getattr(args, "register_best", None), client, parent):
            print(line)
    if outcome.status != "FINISHED":
        print(f"study {spec.name} stopped: {outcome.reason}; fix the cause and run the same command to resume", file=sys.stderr)
        return 1
    return 0


def main_report(args: Any) -> int:
    """``wavesweep report STUDY``: STUDY is a spec file or a study name in ``--storage``."""
    target = Path(args.study)
    if target.suffix in (".yaml", ".yml") or target.is_file():
        spec = load_spec(target)
        name, url = spec.name, args.storage or spec.storage or DEFAULT_STORAGE
        experiment = spec.experiment
    else:
        name, url, experiment = args.study, args.storage or DEFAULT_STORAGE, None
    storage = open_storage(url, must_exist=True)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ValueError(f"no study {name!r} in {tracking.redact_url(url)}; studies there: {', '.join(names) or 'none'}") from None
    client, _ = tracking.init_tracking(experiment=experiment)
    parent = study.user_attrs.get("mlflow_run_id")
    for line in _summary_lines(study, parent or "-", url):
        print(line)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ValueError(f"study {name!r} has no complete trial yet: nothing to report")
    for line in _finish_report(study, args.report_dir, args.register_best, client, parent):
        print(line)
    return 0
