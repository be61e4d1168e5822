"""A study as a table for reports: one row per trial from Optuna storage alone; the best trial."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

log = logging.getLogger(__name__)


def encode_objectives(objectives: list[tuple[str, str]]) -> str:
    """``[("top1", "maximize")]`` -> ``"top1:maximize"`` (several: comma-separated), the study's
    ``objectives`` user attribute: one short string, readable in optuna-dashboard's tables."""
    return ", ".join(f"{m}:{d}" for m, d in objectives)


def study_objectives(study: optuna.Study) -> list[tuple[str, str]]:
    """The study's objectives as ``(metric, direction)`` pairs, from its ``objectives`` user
    attribute (a string; a list in studies recorded before), else its metric names and directions."""
    attr = study.user_attrs.get("objectives")
    if isinstance(attr, str) and attr:
        return [tuple(part.strip().rsplit(":", 1)) for part in attr.split(",")]  # type: ignore[misc]
    if isinstance(attr, list) and attr:
        return [(str(m), str(d)) for m, d in attr]
    names = study.metric_names or [f"value_{i}" for i in range(len(study.directions))]
    return [(n, d.name.lower()) for n, d in zip(names, study.directions)]


def study_metrics(study: optuna.Study) -> dict[str, float]:
    """Trial counts by state (``n_complete``, ``n_pruned``, ``n_fail``), ``n_repeated`` (complete
    trials that repeated an earlier trial's configuration and were not run again: counted in
    ``n_complete``) and, single-objective, ``best_value``."""
    trials = study.get_trials(deepcopy=False)
    out = {f"n_{s.name.lower()}": float(sum(t.state == s for t in trials)) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    out["n_repeated"] = float(sum(t.state == TrialState.COMPLETE and "repeat_of" in t.user_attrs for t in trials))
    if len(study.directions) == 1 and out["n_complete"]:
        out["best_value"] = float(study.best_value)
    return out


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial on the first objective (multi-objective: among the Pareto front).

    A trial that repeated an earlier trial's configuration is never named: the trial that ran it
    is, and its run holds the numbers and the model. A repeat is what the report counts as one
    (:func:`distinct_study`): ``repeat_of`` set, or the params of an earlier COMPLETE trial (two
    workers that drew one configuration at once, a study recorded before repeats were marked),
    so the trial named here is the one the report names."""
    complete = _distinct_trials(study)
    if not complete:
        return None
    # the copy numbers its trials 0, 1, ... in the order given: its trial i is complete[i]
    pool = [complete[t.number] for t in distinct_study(study).best_trials] if len(study.directions) > 1 else complete
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(pool, key=lambda t: (sign * t.values[0], -t.number))




def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, built from Optuna storage alone (params, state, values, recorded metrics)."""
    objectives = study_objectives(study)
    rows = []
    ran: dict[str, int] = {}  # a configuration (its params) -> the first COMPLETE trial that ran it
    trials = study.get_trials(deepcopy=False)
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and "repeat_of" not in t.user_attrs:
            ran.setdefault(_params_key(t), t.number)
    # a FAIL trial queued again with its params (storage.retry: Optuna's retry callback) -> the retry.
    # The trial it replaced is the last of its retry_history: failed_trial is the first of the chain
    # (the callback copies the failed trial's system attributes over its own), so a retry interrupted
    # in turn was counted as failed on its own and the first trial credited to the last retry
    retried_by = {(t.system_attrs.get("retry_history") or [t.system_attrs["failed_trial"]])[-1]: t.number
                  for t in trials if "failed_trial" in t.system_attrs}  # fmt: skip
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number, "state": t.state.name,
            "duration_s": t.duration.total_seconds() if t.duration else np.nan,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""), "surplus": bool(t.user_attrs.get("surplus", False)),
        }  # fmt: skip
        row |= t.user_attrs.get("config") or {}  # studies recorded before scalar user attributes
        row |= {k: v for k, v in t.user_attrs.items() if not isinstance(v, (dict, list)) and k not in row}
        row |= t.params
        metrics = dict(t.user_attrs.get("metrics") or {})
        row["layers"] = metrics.pop("layers", None)
        row |= metrics
        for i, (metric, _d) in enumerate(objectives):
            row[f"value_{i}"] = t.values[i] if t.values is not None and t.state == TrialState.COMPLETE else np.nan
        # a repeat of an earlier configuration: recorded as such (not run again), or, in a study
        # recorded before repeats were recognised, run again with the params of an earlier trial
        first = ran.get(_params_key(t)) if t.state == TrialState.COMPLETE else None
        row["repeat_of"] = t.user_attrs.get("repeat_of", first if first is not None and first != t.number else np.nan)
        row["retried_by"] = retried_by.get(t.number, np.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("number").reset_index(drop=True) if len(frame) else frame


def _params_key(t: optuna.trial.FrozenTrial) -> str:
    """A trial's configuration within its study (every other value is the study's fixed ones)."""
    import json

    return json.dumps(t.params, sort_keys=True, default=str)


def _distinct_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trials of ``study`` less the repeats (``repeat_of``, or an earlier COMPLETE
    trial's params), by trial number."""
    seen: set[str] = set()
    kept = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if "repeat_of" not in t.user_attrs and (key := _params_key(t)) not in seen:
            seen.add(key)
            kept.append(t)
    return kept


def distinct_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` with each configuration's COMPLETE trial once (the first that
    ran it: a repeat, ``repeat_of`` or the same params in a study recorded before repeats were
    recognised, is left out, as :func:`trials_frame` marks it): what parameter importances are
    computed from. A configuration TPE proposed ten times is one point, not ten, and the importance
    caveat counts configurations (20 complete trials of 4 configurations had no caveat)."""
    kept = _distinct_trials(study)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # no "A new study created in memory" line
    try:
        copy = optuna.create_study(study_name=study.study_name, directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            copy.set_metric_names(list(study.metric_names))
    copy.add_trials(kept)
    return copy


def _importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    names = study.metric_names or [m for m, _d in study_objectives(study)]
    study = distinct_study(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return out
    for i, metric in enumerate(names):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[metric] = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("no parameter importances for %s: %s", metric, exc)
    return out


def _target(i: int):
    return lambda t: t.values[i]


def write_interactive(study: optuna.Study, path: Path) -> Path | None:
    """One HTML page of Optuna's own ``optuna.visualization`` figures (plotly): history and
    parameter importances per objective, and the Pareto front of a multi-objective study.
    None (and a log line) when plotly is not installed."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        log.warning("plotly is not installed: no interactive report (pip install plotly)")
        return None
    from optuna import visualization as vis

    from wavesweep.fileio import atomic_write
    from wavesweep.trials_frame import importance_caveat

    names = study.metric_names or [m for m, _d in study_objectives(study)] or ["value"]
    multi = len(study.directions) > 1
    distinct = distinct_study(study).get_trials(deepcopy=False)
    figs: list[tuple[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(names):
            kw = {"target": _target(i), "target_name": name} if multi else {"target_name": name}  # axes name the objective
            figs.append((f"optimisation history: {name}", vis.plot_optimization_history(study, **kw)))
            if len(distinct) >= 2:
                try:
                    fig = vis.plot_param_importances(distinct_study(study), **kw)  # each configuration once
                except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                    log.info("no importance figure for %s: %s", name, exc)
                else:
                    caveat = importance_caveat(len(distinct))
                    if caveat:
                        fig.update_layout(title=f"Hyperparameter importances for {name}<br><sub>CAUTION: {caveat}</sub>")
                    figs.append((f"parameter importances: {name}", fig))
        if multi:
            figs.append(("Pareto front", vis.plot_pareto_front(study, target_names=names)))
    parts = [f"<h2>{title}</h2>" + fig.to_html(full_html=False, include_plotlyjs=(k == 0)) for k, (title, fig) in enumerate(figs)]
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>study {study.study_name}</title></head><body>"
            f"<h1>study {study.study_name}</h1>{''.join(parts)}</body></html>")  # fmt: skip
    with atomic_write(path, "w") as fh:
        fh.write(html)
    return path


def build_report(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """Write the study's plots and summary tables to ``out_dir``; returns {name: path}.

    The best trial's per-layer lists come from its MLflow run (``layers_<method>.csv``)."""
    from wavesweep import report, tracking

    frame = trials_frame(study)
    objectives = study_objectives(study)
    if study.metric_names and len(study.metric_names) == len(objectives):  # what the values are (val_top1)
        objectives = [(name, d) for name, (_m, d) in zip(study.metric_names, objectives)]
    best = best_trial(study)
    if best is not None and best.user_attrs.get("mlflow_run_id") and len(frame):
        row = frame.index[frame["number"] == best.number]
        if len(row) and not isinstance(frame.at[row[0], "layers"], dict):
            # a trial over replicates: the layers of its replicate 0 (the same configuration, the base seed)
            run_id = (best.user_attrs.get("replicate_run_ids") or best.user_attrs["mlflow_run_id"]).split(",")[0]
            frame.at[row[0], "layers"] = tracking.trial_layers(tracking.client(), run_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = write_interactive(study, out_dir / "study.html")
    return report.write_report(frame, out_dir, study_name=study.study_name, objectives=objectives,
                               importances=_importances(study), extra_files={"interactive": html} if html else None)  # fmt: skip
