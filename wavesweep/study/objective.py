"""The study objective: suggest a TrialConfig, run the tracked trial, report chunks, return the values.

Its outcome is the Optuna trial itself: the returned values (COMPLETE), ``optuna.TrialPruned``
(PRUNED) or any other exception (FAIL, with the reason in the user attribute ``error``), plus
``surplus=true`` on a trial that was not needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from wavesweep import schema, tracking
from wavesweep.config import TrialConfig
from wavesweep.evaluate import Chunk
from wavesweep.study.spec import StudySpec
from wavesweep.tracked_trial import run_tracked_trial
from wavesweep.trial import Reporter, TrialResult

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials that count towards n_trials


class Surplus(Exception):
    """This trial would exceed n_trials (another machine's worker got there first)."""


def reporter(trial: optuna.Trial, pruner: str, seen: list[Chunk]) -> Reporter:
    """Report each dwt evaluation chunk to Optuna and stop the trial when its pruner says so.

    The value is the cumulative partial top-1; for the Wilcoxon pruner, which pairs per-step
    scores across trials (the same examples in every trial), the chunk's own accuracy.
    """

    def report(chunk: Chunk) -> None:
        seen.append(chunk)
        value = chunk.correct / chunk.n if pruner == "wilcoxon" else chunk.result.top1
        trial.report(value, chunk.step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"chunk {chunk.step}: partial dwt top1 {chunk.result.top1:.4f}")

    return report


def trial_record(metrics: dict[str, float], result: TrialResult) -> dict[str, Any]:
    """What a study keeps in Optuna for its report: every headline metric and per-layer sparsity."""
    record: dict[str, Any] = {k: float(metrics[k]) for k in schema.headline_names() if k in metrics}
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
    return record


def objective(
    trial: optuna.Trial,
    *,
    spec: StudySpec,
    n_trials: int | None,
    parent_run_id: str,
    experiment: str | None,
    release_slot: Callable[[], None],
) -> float | list[float]:
    """One study trial, nested under the study run ``parent_run_id``; returns the objective values.

    ``release_slot`` lets other workers count trials again: this trial exists (RUNNING) now.
    """
    release_slot()
    if n_trials is not None:
        alive = trial.study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
        if sum(t.number < trial.number for t in alive) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number} not needed: the study already has {n_trials} trials")
    params = {p.name: p.suggest(trial) for p in spec.space}
    cfg = TrialConfig.from_mapping({**spec.fixed, **params})
    trial.set_user_attr("config", cfg.to_dict())
    client, _ = tracking.init_tracking(experiment=experiment)
    chunks: list[Chunk] = []
    run_ids: list[str] = []

    def on_run(run_id: str) -> None:
        run_ids.append(run_id)
        trial.set_user_attr("mlflow_run_id", run_id)

    def tag_run(state: str, values: list[float] | None = None) -> None:
        """Tag the trial's MLflow run with its Optuna state (and the partial accuracy series)."""
        if not run_ids:
            return
        tags: dict[str, Any] = {"optuna.state": state} | ({"optuna.values": values} if values is not None else {})
        with contextlib.suppress(Exception):  # bookkeeping must not turn a result into a failure
            tracking.log_batch(client, run_ids[0], metrics=[("partial_top1", c.result.top1, c.step) for c in chunks], tags=tags)

    report = reporter(trial, spec.pruner, chunks) if spec.pruner != "none" else None
    tags = {"optuna.trial_number": str(trial.number), "optuna.study": spec.name}
    try:
        result, run_id = run_tracked_trial(
            cfg, parent_run_id=parent_run_id, experiment=experiment, reporter=report, tags=tags, on_run=on_run,
            early_stop=(optuna.TrialPruned,),
        )  # fmt: skip
    except optuna.TrialPruned:
        last = chunks[-1] if chunks else None
        trial.set_user_attr("metrics", {
            "pruned_step": last.step if last else -1, "partial_top1": last.result.top1 if last else None,
            "examples_evaluated": last.result.n if last else 0,
        })  # fmt: skip
        tag_run("PRUNED")
        raise
    except BaseException as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM: retried with these params next launch
            trial.set_user_attr("interrupted", True)
        tag_run("FAIL")
        raise
    metrics = result.metrics()["parent"]
    values = []
    for o in spec.objectives:
        v = metrics.get(o.metric)
        if v is None or not math.isfinite(v):
            tracking.close_run(client, run_id, "FAILED", error=f"objective {o.metric}={v}", tags={"optuna.state": "FAIL"})
            trial.set_user_attr("error", f"objective {o.metric} is {v}")
            raise ValueError(f"objective {o.metric} is {v} for trial {trial.number}")
        values.append(float(v))
    trial.set_user_attr("metrics", trial_record(metrics, result))
    tag_run("COMPLETE", values)
    return values[0] if len(values) == 1 else values
