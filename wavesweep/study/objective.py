"""The study objective: suggest a TrialConfig, run the tracked trial, report chunks, return the values.

Its outcome is the Optuna trial itself: the returned values (COMPLETE), ``optuna.TrialPruned``
(PRUNED) or any other exception (FAIL, with the reason in the user attribute ``error``), plus
``surplus=true`` on a trial that was not needed.

A trial whose parameters equal those of an earlier COMPLETE trial of the study (samplers propose a
configuration again: TPE does, and random or grid ones once a small space is used up) is that
configuration: within one study every other value is fixed (a relaunch with other fixed values is
refused), so it would compute the same numbers. It is not run again (Optuna's FAQ "How can I ignore
duplicated samples?": return the earlier trial's values); see :func:`repeat`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from wavesweep import interrupt, replicates, schema, tracking
from wavesweep.config import TrialConfig
from wavesweep.evaluate import Chunk
from wavesweep.failures import error_text
from wavesweep.study.spec import StudySpec
from wavesweep.tracked_config import ConfigurationOutcome, run_tracked_configuration
from wavesweep.tracked_trial import run_tracked_trial
from wavesweep.trial import Reporter, TrialResult
from wavesweep.trials_frame import CONFIG_COLUMNS

log = logging.getLogger(__name__)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials that count towards n_trials


class Surplus(Exception):
    """This trial would exceed n_trials (another machine's worker got there first), or retries a
    failed trial an earlier trial already retries."""


def _earlier_retry_of_the_same(trial: optuna.Trial) -> tuple[int, int] | None:
    """``(earlier trial, failed trial)`` when ``trial`` is a retry (Optuna's ``retry_history``) of a
    failed trial that a trial of a lower number retries too, else None. Launchers on machines that
    share no slot lock (a PostgreSQL storage) may each queue the same failed trial at one moment;
    the second copy ran it again, and in a grid its count took another point's place."""
    trials = trial.study.get_trials(deepcopy=False)
    own = next((t for t in trials if t.number == trial.number), None)
    history = own.system_attrs.get("retry_history") if own is not None else None
    if not history:
        return None
    for t in trials:
        if t.number < trial.number and not t.user_attrs.get("surplus") and (t.system_attrs.get("retry_history") or [None])[-1] == history[-1]:
            return t.number, history[-1]
    return None


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


#: headline metrics kept as scalar user attributes of an Optuna trial (what optuna-dashboard and
#: the report show); everything else (the config, per-layer lists) is on the trial's MLflow run.
USER_ATTR_METRICS = (
    "top1", *(f"{m}_top1" for m in schema.BASELINES), "base_top1",
    "prerec_top1", *(f"{m}_prerec_top1" for m in schema.BASELINES),
    *(f"gain_top1_vs_{m}" for m in schema.BASELINES),
    *(f"dwt_vs_{m}_{k}" for m in schema.BASELINES for k in ("gap", "ci_low", "ci_high", "mcnemar_p")),
    "pruned_fraction", *(f"{m}_pruned_fraction" for m in schema.BASELINES),
    "compression_ratio", *(f"{m}_compression_ratio" for m in schema.BASELINES),
    "stored_bytes", *(f"{m}_stored_bytes" for m in schema.BASELINES), "dense_bytes",
    "coeff_sparsity", "weight_sparsity_model", "n_eval",
    "val_top1", *(f"{m}_val_top1" for m in schema.BASELINES), *(f"val_gain_top1_vs_{m}" for m in schema.BASELINES), "n_val",
)  # fmt: skip
#: config values kept as scalar user attributes (the search-space values are the trial's params)
USER_ATTR_CONFIG = ("model", "dataset", "recovery", "seed")


def examples_scored(result: TrialResult) -> int:
    """The examples the trial's pruned models were scored on, counted once per model and pass:
    each method's test part, its validation part, and, with a recovery, its test part before it
    (the base model's evaluation is left out: it is cached across trials)."""
    return sum(e.n for o in result.outcomes.values() for e in (o.eval, o.val_eval, o.prerec_eval) if e is not None)


def examples_scored_of(metrics: dict[str, float]) -> int:
    """:func:`examples_scored` from a trial run's headline metrics (a replicate reused from a
    stopped configuration has no TrialResult): per method ``n_eval`` (its test part), ``n_val``
    when it has a validation part (``val_top1``), ``n_eval`` again when it was recovered
    (``prerec_top1``: the same test part before recovery)."""
    n_eval, n_val = metrics["n_eval"], metrics.get("n_val", 0.0)
    prefixes = ("", *(f"{m}_" for m in schema.BASELINES))
    return int(sum(n_eval + (n_val if f"{p}val_top1" in metrics else 0) + (n_eval if f"{p}prerec_top1" in metrics else 0)
                   for p in prefixes))  # fmt: skip


def trial_record(metrics: dict[str, float], result: TrialResult) -> dict[str, Any]:
    """The scalar user attributes of a COMPLETE study trial: the headline numbers (top-1 per
    method, gaps and intervals, compression, stored bytes), the effective DWT levels (min, max,
    how many layers were clamped below the request) and the class count (chance = 1/num_classes)."""
    record: dict[str, Any] = {k: float(metrics[k]) for k in USER_ATTR_METRICS if k in metrics}
    record["examples_evaluated"] = examples_scored(result)
    levels = [(l.level_requested, l.level_effective) for l in result.outcomes["dwt"].stats.layers]
    return record | _levels_record(levels, result.base.build_kwargs["num_classes"])


def _levels_record(levels: list[tuple[int | None, int | None]], num_classes: Any) -> dict[str, int]:
    """The effective DWT levels (min, max, layers clamped below the request) of ``levels`` (each
    dwt layer's requested and effective level) and the class count."""
    eff = [e for _, e in levels if e is not None]
    below = sum(e is not None and r is not None and e < r for r, e in levels)
    record = {"level_effective_min": int(min(eff)), "level_effective_max": int(max(eff))} if eff else {}
    return record | {"layers_below_requested_level": int(below), "num_classes": int(num_classes)}


def recorded_trial_record(metrics: dict[str, float], client: Any, run_id: str) -> dict[str, Any]:
    """:func:`trial_record` of a FINISHED trial run read back from MLflow (a replicate reused from
    a stopped configuration): the levels from its ``layers_dwt.csv``, the class count from its
    param ``base_num_classes``, ``examples_evaluated`` from its metrics (:func:`examples_scored_of`)."""
    record: dict[str, Any] = {k: float(metrics[k]) for k in USER_ATTR_METRICS if k in metrics}
    run = client.get_run(run_id)
    record["examples_evaluated"] = examples_scored_of({k: tracking.metric_value(v) for k, v in run.data.metrics.items()})
    layers = tracking.trial_layers(client, run_id) or {"level_requested": [], "level_effective": []}
    return record | _levels_record(list(zip(layers["level_requested"], layers["level_effective"])), run.data.params["base_num_classes"])


def _set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


def _name_objectives(study: optuna.Study, spec: StudySpec) -> None:
    """Objective names (``study.set_metric_names``) for optuna-dashboard and ``optuna`` CLI tables."""
    import warnings

    names = spec.selection_metrics  # what the values are: val_top1 when trials select on validation
    if study.metric_names != names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)


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
    if (twin := _earlier_retry_of_the_same(trial)) is not None:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"trial {trial.number} not needed: trial {twin[0]} already retries trial {twin[1]}")
    try:  # before the trial's run exists: an error here still says why (the log read "failed: ?")
        params = {p.name: p.suggest(trial) for p in spec.space}
        cfg = TrialConfig.from_mapping({**spec.fixed, **params})
        _name_objectives(trial.study, spec)
        # and the configuration's values that were not searched (the spec's base and fixed): the
        # report shows the level, layout, mode... a trial ran at, searched or not
        fixed = [k for k in CONFIG_COLUMNS if k not in params and k not in USER_ATTR_CONFIG]
        _set_user_attrs(trial, {k: getattr(cfg, k) for k in (*USER_ATTR_CONFIG, *fixed)})
        client, experiment_id = tracking.init_tracking(experiment=experiment)
        original = earlier_complete(trial, params)
    except Exception as exc:
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", error_text(exc))
        raise
    tags = {"optuna.trial_number": str(trial.number), "optuna.study": spec.name}
    if original is not None:
        return repeat(trial, original, cfg=cfg, client=client, experiment_id=experiment_id, parent_run_id=parent_run_id, tags=tags)
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
            # what the pruner was given: the cumulative partial top-1, or (wilcoxon) each chunk's own top-1
            per_chunk = [("chunk_top1", c.correct / c.n, c.step) for c in chunks] if spec.pruner == "wilcoxon" else []
            tracking.log_batch(client, run_ids[0], tags=tags,
                               metrics=[("partial_top1", c.result.top1, c.step) for c in chunks] + per_chunk)

    report = reporter(trial, spec.pruner, chunks) if spec.pruner != "none" else None
    configuration: ConfigurationOutcome | None = None
    try:
        if spec.replicates > 1:  # one configuration run over the seeds; its replicate trial runs below it
            configuration = run_tracked_configuration(
                cfg, spec.replicates, parent_run_id=parent_run_id, experiment=experiment, reporter=report, tags=tags,
                on_run=on_run, early_stop=(optuna.TrialPruned,),
            )  # fmt: skip
            result, run_id = None, configuration.run_id
        else:
            result, run_id = run_tracked_trial(
                cfg, parent_run_id=parent_run_id, experiment=experiment, reporter=report, tags=tags, on_run=on_run,
                early_stop=(optuna.TrialPruned,),
            )  # fmt: skip
    except optuna.TrialPruned:
        last = chunks[-1] if chunks else None
        _set_user_attrs(trial, {
            "pruned_step": last.step if last else -1, "partial_top1": last.result.top1 if last else None,
            "examples_evaluated": last.result.n if last else 0,
        })  # fmt: skip
        tag_run("PRUNED")
        raise
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt)  # Ctrl-C or SIGTERM: retried with these params next launch
        if stopped:
            interrupt.caught(exc)  # handled here (the frames it cut short let go of their database cursors)
        trial.set_user_attr("error", error_text(exc))
        if stopped:
            trial.set_user_attr("interrupted", True)
        tag_run("FAIL")
        raise
    # The trial's MLflow run is closed FINISHED by now; what follows records it in Optuna (dozens
    # of writes). A stop or an error here fails the Optuna trial, so the run is retracted (KILLED
    # or FAILED, its children too, tag optuna.state=FAIL): a FINISHED run beside a FAIL trial
    # would count twice once the interrupted trial is retried with its params.
    try:
        metrics = result.metrics()["parent"] if configuration is None else replicates.means(configuration.aggregates)
        values = []
        for name in spec.selection_metrics:
            v = metrics.get(name)
            if v is None or not math.isfinite(v):
                raise ValueError(f"objective {name} is {v} for trial {trial.number}")
            values.append(float(v))
        if configuration is None:
            _set_user_attrs(trial, trial_record(metrics, result))
        else:
            _set_user_attrs(trial, replicate_record(metrics, configuration, client))
        tag_run("COMPLETE", values)
    except BaseException as exc:
        _fail_trial(trial, exc, "interrupted while recording the trial", client, [run_id], finished_too=True)
        raise
    return values[0] if len(values) == 1 else values


def earlier_complete(trial: optuna.Trial, params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """The COMPLETE trial of ``trial``'s study that computed the configuration ``params`` (the
    trial's suggested parameters), the lowest-numbered if several did; None when none did.

    Only COMPLETE trials: a failed or pruned one has no numbers to give. A repeat is never named
    (its own ``repeat_of`` is): the trial named is always one that ran. Every other value of a
    trial is the study's fixed values, the same for all its trials (``storage.open_study`` refuses
    a relaunch with other fixed values, replicates or space), so equal parameters are the same
    configuration: the same seeds (replicate seeds included), recovery, data and base model."""
    same = [
        t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number != trial.number and t.values is not None and "repeat_of" not in t.user_attrs and t.params == params
    ]  # fmt: skip
    return min(same, key=lambda t: t.number) if same else None


def repeat(
    trial: optuna.Trial,
    original: optuna.trial.FrozenTrial,
    *,
    cfg: TrialConfig,
    client: Any,
    experiment_id: str,
    parent_run_id: str,
    tags: dict[str, str],
) -> float | list[float]:
    """Complete ``trial``, which repeats the configuration of the COMPLETE trial ``original``,
    without running it: its values are ``original``'s (so the sampler and the study's best see
    the configuration as it was measured), and so are its intermediate values (an early-stopping
    pruner that compares with the best trial finds them). User attributes: ``repeat_of`` (the
    original's number), ``repeat_of_mlflow_run_id`` (its MLflow run, which holds the numbers),
    ``examples_evaluated`` 0, ``mlflow_run_id`` (this trial's own run, ``tracking.record_repeat``:
    it points to the original and logs no numbers). The headline numbers are not copied: they
    are the original's, on the original. A stop or an error fails the trial like any other."""
    values = [float(v) for v in original.values]
    rid = original.user_attrs.get("mlflow_run_id", "")
    run_ids: list[str] = []

    def on_run(run_id: str) -> None:
        run_ids.append(run_id)
        trial.set_user_attr("mlflow_run_id", run_id)

    try:
        _set_user_attrs(trial, {"repeat_of": original.number, "repeat_of_mlflow_run_id": rid, "examples_evaluated": 0})
        if len(values) == 1:  # Optuna keeps intermediate values of single-objective trials only
            for step, v in sorted(original.intermediate_values.items()):
                trial.report(v, step)
        tracking.record_repeat(client, experiment_id, cfg, parent_run_id=parent_run_id, repeat_of_trial=original.number,
                               repeat_of_run_id=rid, tags={**tags, "optuna.state": "COMPLETE", "optuna.values": values},
                               on_run=on_run)  # fmt: skip
    except BaseException as exc:
        _fail_trial(trial, exc, "interrupted", client, run_ids, children=False)
        raise
    log.info("trial %d repeats the configuration of trial %d (%s): not run again, its values %s reused", trial.number,
             original.number, ", ".join(f"{k}={v}" for k, v in original.params.items()), values)  # fmt: skip
    return values[0] if len(values) == 1 else values


def _fail_trial(trial: optuna.Trial, exc: BaseException, stopped_as: str, client: Any, run_ids: list[str],
                **close: Any) -> None:
    """What a trial that fails on ``exc`` leaves (the caller re-raises it): the user attribute
    ``error`` (``stopped_as (signal)`` for a stop, which also sets ``interrupted``: retried with
    these params next launch) and ``run_ids`` closed KILLED for a stop, else FAILED, with that
    error and ``optuna.state=FAIL`` (a run closed FINISHED beside a FAIL trial would say it
    completed); ``close``: :func:`tracking.close_run`'s options. A stop is held meanwhile."""
    stopped = isinstance(exc, KeyboardInterrupt)
    error = f"{stopped_as} ({interrupt.caught(exc)})" if stopped else error_text(exc)
    with interrupt.ignored() if stopped else contextlib.nullcontext():
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", error[:2000])
            if stopped:
                trial.set_user_attr("interrupted", True)
        for run_id in run_ids:
            tracking.close_quietly(lambda run_id=run_id: tracking.close_run(
                client, run_id, "KILLED" if stopped else "FAILED", error=error, tags={"optuna.state": "FAIL"}, **close),
                f"run {run_id}")  # fmt: skip


def replicate_record(means: dict[str, float], configuration: ConfigurationOutcome, client: Any = None) -> dict[str, Any]:
    """The scalar user attributes of a COMPLETE trial run over replicates: :func:`trial_record` of
    the replicates' means, with, for every top-1 and gain in it, ``<name>_std``, ``<name>_ci_low`` and
    ``<name>_ci_high`` (the 95 % t-interval over seeds), plus ``n_replicates``, ``config_id`` and
    ``replicate_run_ids`` (comma-separated, replicate 0 first). The levels and class count are
    replicate 0's; a replicate reused from a stopped configuration (no TrialResult) is read back
    from its run with ``client``, and its examples count as well (they were scored for this
    configuration, by the attempt that stopped: its Optuna trial failed and counts none).

    The per-replicate paired statistics (``dwt_vs_*``: bootstrap interval over examples, McNemar p)
    are left out: a mean of p-values or of interval ends is not a statistic. They are on each
    replicate's run; across seeds, the gain's t-interval is the one to read."""
    agg = configuration.aggregates
    kept = {k: v for k, v in means.items() if not k.startswith("dwt_vs_")}
    first = configuration.results[0]
    record = trial_record(kept, first) if first is not None else recorded_trial_record(kept, client, configuration.run_ids[0])
    n = int(agg["n_replicates"])
    for key in [k for k in record if k.endswith("top1") or k.startswith(("gain_", "val_gain_"))]:
        record |= {f"{key}_{s}": float(agg[f"{key}_{s}"]) for s in ("std", "ci_low", "ci_high") if f"{key}_{s}" in agg}
    record["examples_evaluated"] = sum(examples_scored(r) if r is not None else examples_scored_of(m)
                                       for r, m in zip(configuration.results, configuration.metrics))  # fmt: skip
    record |= {"n_replicates": n, "config_id": configuration.config_id, "replicate_run_ids": ",".join(configuration.run_ids)}
    return record
