"""A study spec: the YAML schema and validation into a frozen ``StudySpec`` (parsing with line
numbers: :mod:`wavesweep.study.spec_yaml`).

Spec (YAML; every key optional except ``space``/``objectives`` as noted)::

    study: digits-resnet18          # study name (default: the file's stem)
    description: free text
    storage: sqlite:///optuna.db    # Optuna storage URL or a *.journal file (default: optuna.db here)
    experiment: wavesweep           # MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or wavesweep)
    base: {model: resnet18, dataset: digits, eval_limit: 500, seed: 0}   # base model and data
    fixed: {mode: periodization}    # other fixed trial values (timing_batches: 0 unless an objective is a timing metric;
                                    # val_fraction: 0.5, the validation part a study selects on; 0 = select on test)
    space:                          # TrialConfig field -> list (categorical) or range
      wavelet: [haar, bior1.3]
      level: {low: 1, high: 5}
      percentile: {low: 10, high: 90, step: 5}      # also: log: true
    objectives: {top1: maximize}    # any of wavesweep.schema.headline_names() its trials record, in order; with a
                                    # validation part the study optimises each one's validation score (schema.selection_name)
    sampler: tpe                    # or {name: tpe|random|grid|gp|nsga2, seed: 0, <sampler options>}
    pruner: none                    # or {name: median|wilcoxon, <pruner options>}
    n_trials: 20                    # total wanted in the study (COMPLETE + PRUNED); grid: default = grid size
    timeout: null                   # seconds per launch
    max_failures: 3                 # consecutive failed trials that stop a launch
    replicates: 1                   # seeds per configuration (seed .. seed+N-1); the objective is their mean

With ``replicates: N > 1`` each Optuna trial is one configuration run over N seeds
(:mod:`wavesweep.tracked_config`): its objective values are the replicates' means, and an
early-stopping pruner sees the first replicate's partial accuracy only (the same seed, base
model and examples in every trial, so it compares like with like); a stopped trial runs no
further replicates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import yaml

from wavesweep import schema
from wavesweep.config import TrialConfig, coerce
from wavesweep.names import check_name
from wavesweep.replicates import MAX_REPLICATES, check_replicate_seeds
from wavesweep.study.options import check_options
from wavesweep.study.spec_yaml import SpecError, key_lines, line_of, parse_yaml, unknown_choice
from wavesweep.study.storage import PRUNERS, SAMPLERS, dry_run_sampler

TOP_KEYS = (
    "study", "description", "storage", "experiment", "base", "fixed", "space", "objectives",
    "sampler", "pruner", "n_trials", "timeout", "max_failures", "replicates",
)  # fmt: skip
BASE_KEYS = ("model", "dataset", "eval_limit", "seed", "weights", "data_root", "device", "batch_size")
RANGE_KEYS = ("low", "high", "step", "log")
DIRECTIONS = ("maximize", "minimize")
_PRUNABLE_OBJECTIVE = "top1"  # the chunk reports are partial dwt top-1: only that objective can be pruned on
# Resource bounds of a spec, checked before anything is built from it: a small file must not be
# able to ask for gigabytes (a grid step of 1e-9; the YAML's own bounds are in spec_yaml).
MAX_GRID_POINTS = 100_000  # points of one grid dimension and of the whole grid
STUDY_VAL_FRACTION = 0.5  # a study's default validation part (a single trial's default is 0: no selection)


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

    def grid_count(self) -> int:
        """How many values :meth:`grid` gives, computed without building them."""
        if self.kind == "categorical":
            return len(self.choices)
        if self.step is None or self.log:
            raise SpecError(("space", self.name), "the grid sampler needs a list or a range with a step (and no log)")
        span = (self.high - self.low) / self.step
        if not math.isfinite(span) or span + 1 > MAX_GRID_POINTS:
            raise SpecError(("space", self.name, "step"),
                            f"step={self.step:g} gives {span + 1:.3g} grid points, above the limit of {MAX_GRID_POINTS}")  # fmt: skip
        return int(math.floor(span + 1e-9)) + 1

    def grid(self) -> list[Any]:
        """The values a grid sampler visits (ranges need a step; at most MAX_GRID_POINTS)."""
        if self.kind == "categorical":
            return list(self.choices)
        n = self.grid_count()
        vals = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in vals] if self.kind == "int" else [round(float(v), 12) for v in vals]


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize


#: trial settings that decide which examples each evaluation chunk holds (the subset, its split, its order)
_CHUNK_EXAMPLES = ("dataset", "data_root", "eval_limit", "val_fraction", "seed")


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
    replicates: int = 1  # seeds per configuration: each trial runs seed, seed+1, ... (wavesweep.tracked_config)
    path: Path | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SpecError(("study",), f"study name must be a non-empty string, got {self.name!r}")
        try:  # it names the report folder (reports/NAME) and goes into MLflow filter strings
            check_name("study name", self.name)
        except ValueError as exc:
            raise SpecError(("study",), str(exc)) from None
        cfg_fields = {f.name for f in fields(TrialConfig)}
        for key in self.fixed:
            if key not in cfg_fields:
                raise SpecError(("fixed", key), unknown_choice("trial parameter", key, cfg_fields))
        names = [p.name for p in self.space]
        for p in self.space:
            if p.name not in cfg_fields:
                raise SpecError(("space", p.name), unknown_choice("trial parameter", p.name, cfg_fields))
            if p.name in self.fixed:
                raise SpecError(("space", p.name), "is also fixed (base/fixed): give it in one place")
            if names.count(p.name) > 1:
                raise SpecError(("space", p.name), "appears twice")
        if not self.space:
            raise SpecError(("space",), "name at least one searched parameter, e.g. {percentile: {low: 10, high: 90}}")
        self._check_values()
        self._check_targets()
        if not self.objectives:
            raise SpecError(("objectives",), "name at least one objective, e.g. {top1: maximize}")
        known = set(schema.headline_names())
        for o in self.objectives:
            if o.metric not in known:
                raise SpecError(("objectives", o.metric), unknown_choice("objective metric", o.metric, known, "wavesweep.schema.headline_names()"))
            if o.direction not in DIRECTIONS:
                raise SpecError(("objectives", o.metric), f"direction {o.direction!r} is not one of {', '.join(DIRECTIONS)}")
            if schema.is_timing(o.metric) and not self.fixed.get("timing_batches", 1):
                raise SpecError(("objectives", o.metric), "timing metrics need timing_batches > 0")
        if len({o.metric for o in self.objectives}) != len(self.objectives):
            raise SpecError(("objectives",), "an objective appears twice")
        if any(p.name == "val_fraction" for p in self.space):
            raise SpecError(("space", "val_fraction"), "cannot be searched: it decides which examples select; fix it")
        for o in self.objectives:
            if self.validation and schema.selection_name(o.metric) is None:
                raise SpecError(("objectives", o.metric), (
                    f"{o.metric} is measured on the test part only, and this study selects on its validation part "
                    f"(val_fraction={self.fixed['val_fraction']}); use e.g. top1, gain_top1_vs_magnitude or "
                    "compression_ratio, or set val_fraction: 0 under fixed"))
        if self.sampler not in SAMPLERS:
            raise SpecError(("sampler",), unknown_choice("sampler", self.sampler, SAMPLERS))
        if self.pruner not in PRUNERS:
            raise SpecError(("pruner",), unknown_choice("pruner", self.pruner, PRUNERS))
        if self.pruner != "none":
            if len(self.objectives) > 1:
                raise SpecError(("pruner",), "multi-objective studies cannot prune; use pruner: none")
            o = self.objectives[0]
            if (o.metric, o.direction) != (_PRUNABLE_OBJECTIVE, "maximize"):
                raise SpecError(("pruner",), f"early stopping reports partial dwt top1, so it needs the objective top1: maximize (got {o.metric}: {o.direction})")
            # Wilcoxon's test pairs step k of one trial with step k of another as the same instances:
            # each chunk's examples must then be the same in every trial
            moving = [p.name for p in self.space if p.name in _CHUNK_EXAMPLES]
            if self.pruner == "wilcoxon" and moving:
                raise SpecError(("pruner",), (
                    f"pruner wilcoxon pairs each evaluation chunk's accuracy across trials as the same examples, "
                    f"but the searched {', '.join(moving)} changes which examples a chunk holds; use pruner: median, "
                    f"or fix {', '.join(moving)}"))
        check_options(("sampler",), SAMPLERS[self.sampler], self.sampler_options)
        try:
            dry_run_sampler(self)
        except ValueError as exc:
            raise SpecError(("sampler",), str(exc)) from None
        if PRUNERS[self.pruner] is not None:
            check_options(("pruner",), PRUNERS[self.pruner], self.pruner_options)
        elif self.pruner_options:
            raise SpecError(("pruner", next(iter(self.pruner_options))), "pruner none takes no options")
        if self.n_trials is not None and (not isinstance(self.n_trials, int) or isinstance(self.n_trials, bool) or self.n_trials < 1):
            raise SpecError(("n_trials",), f"n_trials must be a positive integer, got {self.n_trials!r}")
        if self.sampler == "grid":
            size = self.grid_size()
            if self.n_trials is not None and self.n_trials > size:
                raise SpecError(("n_trials",), f"n_trials={self.n_trials} exceeds the grid's {size} points")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and not isinstance(self.timeout, bool)
                                             and math.isfinite(self.timeout) and self.timeout > 0):  # fmt: skip
            raise SpecError(("timeout",), f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.n_trials is None and self.timeout is None and self.sampler != "grid":
            raise SpecError(("n_trials",), "give n_trials or timeout (or both)")
        if not isinstance(self.max_failures, int) or isinstance(self.max_failures, bool) or self.max_failures < 1:
            raise SpecError(("max_failures",), f"max_failures must be a positive integer, got {self.max_failures!r}")
        if self.storage is not None and not isinstance(self.storage, str):
            raise SpecError(("storage",), f"storage must be a URL or a .journal path, got {self.storage!r}")
        r = self.replicates
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_REPLICATES:
            raise SpecError(("replicates",), f"replicates must be an integer from 1 to {MAX_REPLICATES}, got {r!r}")
        # each trial runs seeds seed .. seed + replicates - 1: the highest seed a trial can take must leave room
        searched = next((p for p in self.space if p.name == "seed"), None)
        seeds = (searched.choices if searched.kind == "categorical" else (searched.high,)) if searched else (self.fixed.get("seed", 0),)
        top = max(coerce("seed", v, int) for v in seeds)
        try:
            check_replicate_seeds(top, r)
        except ValueError as exc:
            raise SpecError(("space", "seed") if searched else ("fixed", "seed"), str(exc)) from None
        self._check_recorded()

    def _check_recorded(self) -> None:
        """Every objective's value (its :attr:`selection_metrics` name) is one the study's trials
        record, with every recovery they can run: ``val_top1`` without a validation part,
        ``prerec_top1`` with ``recovery: none``, ``recovery_train_loss`` without fine-tuning, or a
        paired statistic (``dwt_vs_*``) of a trial over replicates (its means leave them out) used
        to be accepted, and then every trial ran in full and failed on 'objective ... is None'."""
        searched = next((p for p in self.space if p.name == "recovery"), None)
        recoveries = [*searched.choices] if searched else [self.fixed.get("recovery", TrialConfig().recovery)]
        for o, name in zip(self.objectives, self.selection_metrics):
            if self.replicates > 1 and name.startswith("dwt_vs_"):
                raise SpecError(("objectives", o.metric), (
                    f"a trial over replicates (replicates={self.replicates}) records no paired statistic over examples "
                    f"({name}: a mean over seeds of p-values or interval ends is not a statistic); use e.g. "
                    "gain_top1_vs_magnitude (its mean over the seeds) or replicates: 1"))
            for rec in recoveries:
                rec = TrialConfig.from_mapping({**self.fixed, "recovery": rec}).recovery
                if name in schema.headline_names(rec, self.validation):
                    continue
                if not self.validation and name in schema.headline_names(rec, True):
                    why = "needs a validation part, and this study has none (val_fraction=0); set val_fraction > 0 under fixed"
                else:
                    why = f"is not recorded by a trial with recovery={rec!r}"
                    why += "; it needs recovery: finetune" if name.endswith("recovery_train_loss") else "; it needs recovery: bn or finetune"
                raise SpecError(("objectives", o.metric), f"{name} {why}")

    def _check_targets(self) -> None:
        """Every model the study can run has layers of every ``targets`` it can run with: an
        ``mlp`` (Linear layers only) with the default ``targets: conv`` used to be accepted and
        then fail trial after trial; and every layout it can run with takes those layers' weights
        (``kernel`` cannot take a Linear's). The models are built on the meta device (no memory,
        no weights: milliseconds)."""
        import torch

        from wavesweep.models import build_model
        from wavesweep.prune_record import target_layers
        from wavesweep.pruning import check_layout

        def options(name: str) -> tuple[tuple[str, ...], list[Any]]:
            searched = next((p for p in self.space if p.name == name), None)
            if searched is not None:
                return ("space", name), list(searched.choices or ())
            return ("fixed", name), [self.fixed.get(name, getattr(TrialConfig(), name))]

        model_key, models = options("model")
        targets_key, targets = options("targets")
        layout_key, layouts = options("layout")
        for t in targets:
            for m in models:
                cfg = TrialConfig.from_mapping({**self.fixed, "model": m, "targets": t})
                with torch.device("meta"):
                    net = build_model(cfg.model, num_classes=10, in_channels=3, image_size=224)
                try:
                    target_layers(net, cfg.target_kinds)
                except ValueError:
                    key = targets_key if len(models) == 1 or targets_key[0] == "space" else model_key
                    raise SpecError(key, (
                        f"model {cfg.model!r} has no {' or '.join(cfg.target_kinds)} layers to prune (targets={cfg.targets!r}"
                        f"{'' if targets_key[0] == 'space' or 'targets' in self.fixed else ', the default'}); "
                        f"give targets: {'linear' if 'conv' in cfg.target_kinds else 'conv'} or another model")) from None
                for lay in layouts:  # a layout that cannot take a target's weight (a Linear in `kernel`) fails every trial it is in
                    try:
                        check_layout(net, cfg.target_kinds, lay)
                    except ValueError as e:
                        raise SpecError(layout_key, f"model {cfg.model!r}, targets={cfg.targets!r}: {e} (or targets: conv)") from None

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
                # the same trial value twice (haar, haar; 10, 10.0): one configuration sampled, and a grid run, twice
                values = [TrialConfig.from_mapping({**self.fixed, p.name: v}).__dict__[p.name] for v in p.choices]
                if len(set(map(repr, values))) < len(values):
                    dup = next(v for i, v in enumerate(p.choices) if repr(values[i]) in map(repr, values[:i]))
                    raise SpecError(("space", p.name), f"choice {dup!r} appears twice (as the same trial value)")
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
            if p.step is not None and (not isinstance(p.step, (int, float)) or isinstance(p.step, bool) or not math.isfinite(p.step)
                                       or p.step <= 0 or (p.kind == "int" and not float(p.step).is_integer())):  # fmt: skip
                raise SpecError(("space", p.name, "step"), f"step={p.step!r} must be a positive {'integer' if p.kind == 'int' else 'number'}")
            if p.log and p.low <= 0:
                raise SpecError(("space", p.name, "log"), f"a log range needs low > 0, got low={p.low}")
            if p.log and p.step is not None and (p.kind == "float" or p.step != 1):  # Optuna's rule
                raise SpecError(("space", p.name, "step"), f"a log range takes no step{' other than 1' if p.kind == 'int' else ''}")
            if p.step is not None and not p.log:
                n = (p.high - p.low) / p.step
                if abs(n - round(n)) > 1e-9:  # Optuna would quietly search up to the last point on the step
                    last = p.low + math.floor(n + 1e-9) * p.step
                    raise SpecError(("space", p.name, "high"), f"step={p.step} does not divide [{p.low}, {p.high}]: "
                                                               f"the last point on it is {last:g}; make high {last:g}")  # fmt: skip

    def grid_size(self) -> int:
        """Points of the whole grid (product of the dimensions), bounded by MAX_GRID_POINTS."""
        size = math.prod(p.grid_count() for p in self.space)
        if size > MAX_GRID_POINTS:
            dims = " x ".join(str(p.grid_count()) for p in self.space)
            raise SpecError(("space",), f"the grid has {size} points ({dims}), above the limit of {MAX_GRID_POINTS}")
        return size

    def grid_space(self) -> dict[str, list[Any]]:
        return {p.name: p.grid() for p in self.space}

    @property
    def validation(self) -> bool:
        """Whether trials hold out a validation part of their evaluation examples to select on."""
        return float(self.fixed.get("val_fraction", 0.0)) > 0

    @property
    def selection_metrics(self) -> list[str]:
        """The recorded metric each objective takes its value from: its validation version when
        trials have a validation part (``top1`` -> ``val_top1``), else the objective itself."""
        return [schema.selection_name(o.metric) or o.metric if self.validation else o.metric for o in self.objectives]

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
            "space": ",".join(p.name for p in self.space), "sampler.seed": self.seed, "replicates": self.replicates,
        }  # fmt: skip
        out |= {f"fixed.{k}": v for k, v in self.fixed.items()}
        for p in self.space:
            out[f"space.{p.name}"] = list(p.choices) if p.kind == "categorical" else f"{p.kind}[{p.low},{p.high}]" + (
                f" step {p.step}" if p.step else "") + (" log" if p.log else "")  # fmt: skip
        return out


def _check_trial_value(key: tuple[str, ...], values: dict[str, Any]) -> None:
    try:
        TrialConfig.from_mapping(values)
    except (ValueError, TypeError) as exc:
        raise SpecError(key, str(exc)) from None


def parse_assignments(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are YAML scalars or lists (``[10, 20]``).

    Values are parsed with the spec file's bounds (nesting depth, nodes after alias expansion)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item[:100]!r} is not KEY=VALUE")
        try:
            out[key.strip()] = parse_yaml(raw)[1] if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"{what} {key.strip()}=...: the value is not a YAML value") from None
        except SpecError as exc:
            raise ValueError(f"{what} {key.strip()}=...: {exc.message}") from None
    return out


def apply_overrides(data: Any, sets: dict[str, Any], origins: dict[tuple[str, ...], str] | None = None) -> dict:
    """The spec mapping with ``--set`` overrides: ``KEY`` (a top-level key, e.g. ``n_trials``),
    ``SECTION.KEY`` (``base.eval_limit``, ``sampler.seed``, ``space.percentile``), or a trial
    parameter alone (``eval_limit``, ``timing_batches``): it goes where the spec has it (``base``
    or ``fixed``), else to ``fixed``; a searched parameter is taken out of ``space`` (pinned).
    ``origins``, when given, receives ``{key path it set: the --set key}``."""
    data = dict(data or {}) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        return data
    cfg_fields = {f.name for f in fields(TrialConfig)}
    for key, value in sets.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] not in TOP_KEYS:
            if parts[0] not in cfg_fields:
                raise ValueError(f"--set {key}=...: " + unknown_choice("spec key or trial parameter", key, [*TOP_KEYS, *cfg_fields]))
            section = "base" if parts[0] in (data.get("base") or {}) or (parts[0] in BASE_KEYS and parts[0] not in (data.get("fixed") or {})) else "fixed"
            space = data.get("space")
            if isinstance(space, dict) and parts[0] in space:
                data["space"] = {k: v for k, v in space.items() if k != parts[0]}
                if origins is not None:  # an error about the space it left (none searched) names this --set
                    origins[("space", parts[0])] = key
            parts = [section, parts[0]]
        if parts[0] not in TOP_KEYS:
            raise ValueError(f"--set {key}=...: " + unknown_choice("spec key", parts[0], TOP_KEYS))
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or isinstance(child, str) and i == 0 and part in ("sampler", "pruner"):
                child = {"name": child} if isinstance(child, str) else {}
            if not isinstance(child, dict):
                raise SpecError(tuple(parts[: i + 1]), f"--set {key}: {part} is not a mapping")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
        if origins is not None:
            origins[tuple(parts)] = key
    return data


def _override_origin(key: tuple[str, ...], origins: dict[tuple[str, ...], str]) -> tuple[str | None, list[str]]:
    """The ``--set`` key that set ``key`` (or a section above it), and those that set something
    under ``key``; ``base`` and ``fixed`` are one section (errors name both ``fixed``)."""
    norm = lambda k: ("fixed", *k[1:]) if k[:1] == ("base",) else k  # noqa: E731
    key = norm(tuple(key))
    setter = next((o for p, o in origins.items() if key[: len(p)] == norm(p)), None)
    under = [o for p, o in origins.items() if key and norm(p)[: len(key)] == key and norm(p) != key]
    return setter, under


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and validate a spec file; errors are one-line ``ValueError``s naming the key and line.

    ``overrides`` (``--set``, see ``apply_overrides``) change the parsed spec before validation; the
    spec's text (stored with the study and its MLflow run) is then the resolved YAML.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"study spec {str(path)!r} is a folder; give a spec file (e.g. sweeps/digits-resnet18.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"study spec {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the spec as UTF-8") from None
    try:
        root, data = parse_yaml(text)
    except SpecError as exc:
        at = f":{exc.line}" if exc.line else ""
        raise ValueError(f"{path}{at}: {exc.message}") from None
    except RecursionError:  # the node bound above should make this unreachable; never a traceback
        raise ValueError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}{at}: invalid YAML (line {mark.line + 1 if mark else '?'}): {problem}") from None
    lines: dict[tuple[str, ...], int] = {}
    origins: dict[tuple[str, ...], str] = {}
    try:
        if root is not None:
            key_lines(root, (), lines)
        if overrides:
            data = apply_overrides(data, overrides, origins)
            text = yaml.safe_dump(data, sort_keys=False) + "# resolved with --set " + " ".join(f"{k}={v}" for k, v in overrides.items()) + "\n"
        return spec_from_mapping(data, name=path.stem, path=path, text=text)
    except SpecError as exc:
        setter, under = _override_origin(exc.key, origins)
        where = ".".join(exc.key) or "spec"
        if setter is not None:  # the value came from the command line, not from a line of the file
            named = "" if where == setter else f"{where}: "
            raise ValueError(f"{path}: --set {setter}: {named}{exc.message}") from None
        line = exc.line or line_of(lines, exc.key)
        at = f":{line}" if line else ""
        with_set = f" (with --set {', '.join(under)})" if under else ""
        raise ValueError(f"{path}{at}: {where}{with_set}: {exc.message}") from None


def spec_from_mapping(data: Any, *, name: str = "study", path: Path | None = None, text: str = "") -> StudySpec:
    """Build a StudySpec from the parsed YAML mapping; raises ``SpecError`` naming the key."""
    if not isinstance(data, dict):
        raise SpecError((), f"a spec is a mapping of keys ({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError((str(key),), unknown_choice("spec key", key, TOP_KEYS))
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
    fixed_all = {**{str(k): v for k, v in base.items()}, **{str(k): v for k, v in fixed.items()}}
    timed = any(schema.is_timing(o.metric) for o in objectives)
    if not timed and "timing_batches" not in fixed_all and "timing_batches" not in space_raw:
        fixed_all["timing_batches"] = 0  # accuracy studies do not spend trials on inference timing
    if "val_fraction" not in fixed_all and "val_fraction" not in space_raw:
        fixed_all["val_fraction"] = STUDY_VAL_FRACTION  # select on validation examples, report test ones
    return StudySpec(
        name=data.get("study") or name,
        space=space,
        objectives=objectives,
        fixed=fixed_all,
        sampler=sampler,
        sampler_options=sampler_opts,
        pruner=pruner,
        pruner_options=pruner_opts,
        n_trials=data.get("n_trials"),
        timeout=data.get("timeout"),
        storage=data.get("storage"),
        experiment=data.get("experiment"),
        max_failures=data.get("max_failures", 3),
        replicates=data.get("replicates", 1),
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
            raise SpecError(("space", name, str(key)), unknown_choice("range key", key, RANGE_KEYS))
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
