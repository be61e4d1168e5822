"""A configuration recorded in MLflow over several seeds: N replicate tracked trials below one
configuration run (``wavesweep trial --replicates N``, ``mlflow run . -P replicates=N``, a study
spec's ``replicates: N``). With N == 1 callers use :func:`tracked_trial.run_tracked_trial` alone.

Run layout::

    configuration run   tags wavesweep.kind=configuration, method=configuration, config_id
                        params: the config (its base seed), replicates, replicate_seeds, code_version
                        metrics: <m>_mean, <m>_std, <m>_ci_low, <m>_ci_high for every numeric
                                 headline metric the replicates share (not seconds_*, not the
                                 paired statistics dwt_vs_*); n_replicates
                        artifact: replicates.csv (one row per replicate: seed, run id, metrics)
      trial run         replicate 0, seed s: exactly a single trial's run, plus tags replicate=0 and
        dwt, magnitude, random runs            config_id (on its method runs too)
      trial run         replicate 1, seed s+1
        ...

The configuration run is created below ``parent_run_id`` (a study run), or is ``adopt_run_id``
(the run ``mlflow run`` created), or is created on its own. The replicates run one after the
other; the first failure stops the configuration. Every run is closed on every exit: FAILED on
an error, KILLED on Ctrl-C/SIGTERM or an early stop (tag ``early_stopped=true``), the error in
the ``error`` tag of the configuration run and of the replicate that failed.

A configuration resumes where it stopped (:func:`_claim`): a replicate that FINISHED below a
KILLED or FAILED configuration run of the same configuration (config_id, seeds, every trial
param, code version; below the same parent run) is moved below the new configuration run (its
``mlflow.parentRunId`` tag, plus ``resumed_from=<old configuration run>``; the old one gets
``resumed_by=<new run>`` and ``resumed_replicates``) and not run again; its numbers are read
back from its run. A FINISHED configuration is never resumed from (that would be a cache), nor a
RUNNING one (it may be alive). Moving is tags only, done before any replicate runs; a process
that dies between two moves leaves each run below a stopped configuration (the old one, or its
own once closed KILLED), where the next attempt finds it. Concurrency: only a replicate below a
stopped configuration is taken, and a replicate taken is at once below a RUNNING one, so a later
process leaves it alone; on one machine with a SQLite store, the search and the moves of
concurrent processes are serialised (:func:`tracking.claim_lock`); on a tracking server two
processes starting in the same instant may both take a replicate: its run keeps everything, the
last move decides its parent, and the other configuration's ``replicates.csv`` still names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from wavesweep import evaluate, interrupt, replicates, schema, tracking
from wavesweep.config import TrialConfig
from wavesweep.failures import error_text
from wavesweep.tracked_trial import run_tracked_trial
from wavesweep.trial import N_CHUNKS, Reporter, TrialResult

log = logging.getLogger(__name__)


RESUMABLE = ("KILLED", "FAILED")  # a configuration run stopped or failed: its FINISHED replicates are reused


@dataclass
class ConfigurationOutcome:
    """The configuration run and its replicates (in order, replicate i has seed ``cfg.seed + i``).

    ``results`` hold the numbers of every replicate run here (None for one reused from a stopped
    configuration: ``reused``); their pruned models and records are released
    (:meth:`TrialResult.release`) once the replicate is recorded and ``on_replicate`` has seen it,
    so a configuration holds one replicate's models at a time, not N (on a GPU: device memory).
    ``metrics`` hold every replicate's headline metrics (:func:`results_of`, or for a reused one
    :func:`results_of_run`): what the aggregates and ``replicates.csv`` are computed from."""

    run_id: str
    config_id: str
    results: list[TrialResult | None] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)  # the replicate trial runs
    metrics: list[dict[str, float]] = field(default_factory=list)  # each replicate's results_of
    reused: dict[int, str] = field(default_factory=dict)  # replicate index -> the stopped configuration run it came from
    aggregates: dict[str, float] = field(default_factory=dict)  # replicates.aggregate of their headline metrics


def _desc(cfg: TrialConfig) -> str:
    return f"{cfg.wavelet} L{cfg.level} p{cfg.percentile:g} {cfg.layout}"


def _start_run(client, exp_id: str, cfg: TrialConfig, n: int, cid: str, *, parent_run_id: str | None,
               adopt_run_id: str | None, tags: dict[str, str] | None) -> tuple[str, bool]:  # fmt: skip
    """Create (or adopt) the configuration run, with its tags; returns its id and whether this process owns it."""
    all_tags = {"wavesweep.kind": "configuration", "method": "configuration", "config_id": cid,
                tracking.PROCESS_TAG: tracking.process_id(), **(tags or {}),
                tracking.MLFLOW_RUN_NAME: f"configuration {_desc(cfg)} x{n} seeds"}  # fmt: skip
    if adopt_run_id and not parent_run_id:
        run_id, owned = adopt_run_id, False
        tracking.log_batch(client, run_id, tags=all_tags)
    else:
        if parent_run_id:
            all_tags[tracking.MLFLOW_PARENT_RUN_ID] = parent_run_id
        run_id = tracking.create_run(client, exp_id, run_name=all_tags[tracking.MLFLOW_RUN_NAME], tags=all_tags,
                                     where="while it was created")  # fmt: skip
        owned = True
    return run_id, owned


def _log_params(client, run_id: str, cfg: TrialConfig, n: int) -> None:
    seeds = ",".join(str(cfg.seed + i) for i in range(n))
    params = {**cfg.to_dict(), "replicates": n, "replicate_seeds": seeds, "code_version": tracking.code_version()}
    tracking.log_batch(client, run_id, params=params)  # `mlflow run` logged its -P values: kept


def results_of(result: TrialResult) -> dict[str, float]:
    """A replicate's headline metrics as its trial run records them (floats, as MLflow keeps every
    metric), less ``seconds_*`` (how long phases took: not a result, and partly measured after the
    run was written)."""
    return {k: float(v) for k, v in result.metrics()["parent"].items() if not k.startswith("seconds_")}


def results_of_run(run) -> dict[str, float]:
    """:func:`results_of` as read back from a FINISHED trial run (a reused replicate): its headline
    metrics (``schema.headline_names``: not the per-layer series, ``seconds_*`` or ``partial_top1``)."""
    names = set(schema.headline_names())
    return {k: tracking.metric_value(v) for k, v in run.data.metrics.items() if k in names}


def _claim(client, exp_id: str, cfg: TrialConfig, n: int, cid: str, *, run_id: str,
           parent_run_id: str | None) -> dict[int, tuple[object, str]]:  # fmt: skip
    """The replicates this configuration resumes: ``{i: (trial run, stopped configuration run id)}``.

    Replicate ``i`` is a trial run FINISHED below a configuration run of ``config_id`` ``cid``
    that is KILLED or FAILED and has the same parent (``parent_run_id``, or none), tagged
    ``replicate=i``, whose params are those replicate ``i`` would log (seed ``cfg.seed + i``, every
    other TrialConfig value, ``code_version``); the newest if several. The search goes by trial
    runs, not by the configuration's children alone: a run moved by an attempt that died before it
    closed is below that attempt's configuration run (closed KILLED by the next command)."""
    kind = "tags.`wavesweep.kind`"
    stopped = {
        r.info.run_id for r in tracking.search_all(client, exp_id, f"tags.config_id = '{cid}' and {kind} = 'configuration'")
        if r.info.status in RESUMABLE and r.info.run_id != run_id and r.data.tags.get(tracking.MLFLOW_PARENT_RUN_ID) == parent_run_id
    }  # fmt: skip
    if not stopped:
        return {}
    want = [tracking.as_logged({**c.to_dict(), "code_version": tracking.code_version()}) for c in replicates.replicate_configs(cfg, n)]
    same_base = _same_base(cfg)
    found: dict[int, tuple[object, str]] = {}
    query = f"tags.config_id = '{cid}' and {kind} = 'trial' and attributes.status = 'FINISHED'"
    for run in tracking.search_all(client, exp_id, query):
        old, i = run.data.tags.get(tracking.MLFLOW_PARENT_RUN_ID), run.data.tags.get("replicate", "")
        if old not in stopped or not i.isdigit() or int(i) >= n:
            continue
        i = int(i)
        if any(run.data.params.get(k) != v for k, v in want[i].items()) or not same_base(run.data.params):
            continue
        if i not in found or run.info.start_time > found[i][0].info.start_time:
            found[i] = (run, old)
    return dict(sorted(found.items()))


def _same_base(cfg: TrialConfig) -> Callable[[dict[str, str]], bool]:
    """Whether a replicate run's params say it ran where and on what this configuration would now:
    the same kind of device (``resolved_device``: a CUDA run's numbers are not a CPU run's), and
    for fixed weights the same weights (a file's sha256, ``base_checksum``; a model URI pinned to
    the same version, ``base_uri``: an alias may have moved since). A weights file or URI that
    cannot be read now matches nothing (the trial will say why). A base model wavesweep trained is
    named by its config and seed, which the params compare already."""
    from wavesweep import evaluate

    device = evaluate.resolve_device(cfg.device).type
    key, want = None, None
    if cfg.weights:
        try:
            if cfg.weights.startswith(("models:/", "runs:/")):
                from wavesweep import model_registry

                key, want = "base_uri", model_registry.resolve_model_uri(cfg.weights)
            else:
                from wavesweep import models, train

                key, want = "base_checksum", train.remembered_sha256(models.weights_file(cfg.weights))
        except Exception as exc:  # noqa: BLE001 - nothing is reused; the trial itself reports the error
            log.info("no replicate is reused: the weights %r cannot be read now (%s)", cfg.weights, exc)
            return lambda params: False

    def same(params: dict[str, str]) -> bool:
        ran_on = params.get("resolved_device")
        return (ran_on is None or ran_on.split(":")[0] == device) and (key is None or params.get(key) == want)

    return same


def _move(client, run_id: str, claimed: dict[int, tuple[object, str]]) -> None:
    """Move the ``claimed`` replicate runs below the configuration run ``run_id`` (tags only: each
    keeps everything it recorded, its method runs stay below it) and tag where they came from."""
    moved: dict[str, list[str]] = {}
    for i, (run, old) in claimed.items():
        tracking.log_batch(client, run.info.run_id, tags={tracking.MLFLOW_PARENT_RUN_ID: run_id, "resumed_from": old})
        moved.setdefault(old, []).append(str(i))
    for old, idx in moved.items():
        tracking.log_batch(client, old, tags={"resumed_by": run_id, "resumed_replicates": ",".join(idx)})
    tracking.log_batch(client, run_id, tags={"reused_replicates": ",".join(str(i) for i in claimed)})


def _replay(client, run, reporter: Reporter) -> None:
    """Give ``reporter`` the evaluation chunks of a reused replicate 0 (``run``) from its recorded
    predictions (:func:`evaluate.replay_chunks`): the numbers its own chunks gave it when it ran,
    so a pruner sees this configuration as it would have uninterrupted (before, it saw nothing,
    and the configuration could not be stopped early). A run without its predictions is not
    replayed (a warning)."""
    recorded = tracking.selection_predictions(client, run.info.run_id)
    if recorded is None:
        log.warning("replicate 0's run %s has no predictions to replay to the pruner: it sees none of its chunks", run.info.run_id)
        return
    preds, targets = recorded
    for chunk in evaluate.replay_chunks(preds, targets, int(run.data.params["base_num_classes"]), n_chunks=N_CHUNKS):
        reporter(chunk)


def aggregated(results: dict[str, float]) -> dict[str, float]:
    """The results a configuration aggregates over its replicates: not the paired statistics over
    examples (``dwt_vs_*``: interval ends, McNemar p): a mean of p-values or of interval ends is not
    a statistic. They stay on each replicate's run and in ``replicates.csv``."""
    return {k: v for k, v in results.items() if not k.startswith("dwt_vs_")}


def _replicates_table(outcome: ConfigurationOutcome, seed: int) -> str:
    """``replicates.csv``: one row per replicate (replicate i has seed ``seed + i``); the metric
    columns in the order a replicate run here has them (a reused one's come from its run)."""
    order = next((m for m, r in zip(outcome.metrics, outcome.results) if r is not None), {})
    rows = [{"replicate": i, "seed": seed + i, "run_id": rid, **{k: m[k] for k in order if k in m}, **m}
            for i, (rid, m) in enumerate(zip(outcome.run_ids, outcome.metrics))]  # fmt: skip
    return pd.DataFrame(rows).to_csv(index=False)


def run_tracked_configuration(
    cfg: TrialConfig,
    n_replicates: int,
    *,
    parent_run_id: str | None = None,
    adopt_run_id: str | None = None,
    experiment: str | None = None,
    reporter: Reporter | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = False,
    on_run: Callable[[str], None] | None = None,
    on_replicate: Callable[[int, TrialResult, str], None] | None = None,
    on_reused: Callable[[int, str, str], None] | None = None,
    early_stop: tuple[type[BaseException], ...] = (),
) -> ConfigurationOutcome:
    """Run ``cfg`` over ``n_replicates`` seeds (``cfg.seed + i``), each a tracked trial below one
    configuration run that gets the aggregates; returns the configuration's outcome.

    ``reporter`` (early stopping) sees the first replicate only: its partial accuracy is on the
    same examples and base model as every other trial's first replicate, so a pruner compares
    like with like, and a stopped configuration runs no further replicates (a replicate 0 reused
    from a stopped configuration is not run: ``reporter`` sees its chunks replayed from its
    recorded predictions, :func:`_replay`). ``tags`` go on the
    configuration run and on every replicate run here (a reused one keeps the tags it was run
    with). ``on_run(run_id)`` is called as soon as the configuration run exists;
    ``on_replicate(i, result, run_id)`` after each replicate run here, ``on_reused(i, run_id,
    from_run_id)`` in its place for a replicate resumed from the stopped configuration run
    ``from_run_id`` (no TrialResult: its numbers are ``outcome.metrics[i]``).
    Exceptions close every run (see the module docstring) and are re-raised.
    """
    n = replicates.check_replicates(n_replicates)
    client, exp_id = tracking.init_tracking(experiment=experiment, run_id=None if parent_run_id else adopt_run_id)
    if parent_run_id is None:  # a configuration of its own: tidy what a killed one left RUNNING
        tracking.close_runs_of_dead_processes(client, exp_id)
    cid = replicates.config_id(cfg)
    run_id, owned = _start_run(client, exp_id, cfg, n, cid, parent_run_id=parent_run_id, adopt_run_id=adopt_run_id, tags=tags)
    outcome = ConfigurationOutcome(run_id=run_id, config_id=cid)
    where = "setup"
    try:
        if on_run is not None:
            on_run(run_id)
        _log_params(client, run_id, cfg, n)
        # The replicates go where the configuration run is (an adopted run fixes the experiment).
        exp_id = client.get_run(run_id).info.experiment_id
        exp_name = client.get_experiment(exp_id).name
        note = replicates.seeds_note(cfg, n)
        (log.warning if replicates.split_caution(cfg) else log.info)("configuration %s (%s): %s", cid, _desc(cfg), note)
        where = "resuming"
        with tracking.claim_lock():  # the finished replicates of a stopped run of this configuration
            claimed = _claim(client, exp_id, cfg, n, cid, run_id=run_id, parent_run_id=parent_run_id)
            if claimed:
                _move(client, run_id, claimed)
        for i, rcfg in enumerate(replicates.replicate_configs(cfg, n)):
            where = f"replicate {i} (seed {rcfg.seed})"
            if i in claimed:
                run, old = claimed[i]
                log.info("configuration %s: replicate %d (seed %d) reused: FINISHED run %s of stopped configuration run %s",
                         cid, i, rcfg.seed, run.info.run_id, old)  # fmt: skip
                outcome.results.append(None)
                outcome.run_ids.append(run.info.run_id)
                outcome.metrics.append(results_of_run(run))
                outcome.reused[i] = old
                if on_reused is not None:
                    on_reused(i, run.info.run_id, old)
                if i == 0 and reporter is not None:
                    _replay(client, run, reporter)
                continue

            def name_run(rid: str, i: int = i, rcfg: TrialConfig = rcfg) -> None:
                tracking.log_batch(client, rid, tags={tracking.MLFLOW_RUN_NAME: f"trial {_desc(rcfg)} seed {rcfg.seed} (replicate {i})"})

            result, rid = run_tracked_trial(
                rcfg, parent_run_id=run_id, experiment=exp_name, reporter=reporter if i == 0 else None,
                tags={**(tags or {}), "replicate": str(i), "config_id": cid}, progress=progress, on_run=name_run,
                early_stop=early_stop,
            )  # fmt: skip
            outcome.results.append(result)
            outcome.run_ids.append(rid)
            outcome.metrics.append(results_of(result))
            if on_replicate is not None:
                on_replicate(i, result, rid)
            result.release()
        where = "aggregation"
        outcome.aggregates = replicates.aggregate([aggregated(m) for m in outcome.metrics])
        tracking.log_batch(client, run_id, metrics=outcome.aggregates)
        client.log_text(run_id, _replicates_table(outcome, cfg.seed), "replicates.csv")
        where = "closing"
        # A successful adopted run is left open: `mlflow run` closes the run it created. Inside the
        # try: a stop or an error while it closes closes it KILLED or FAILED below, not RUNNING.
        tracking.close_run(client, run_id, "FINISHED", children=False, terminate=owned)
    # Closing is best-effort (tracking.close_quietly): the exception being handled is re-raised.
    # Signals are ignored while the runs close: a SIGTERM landing in the close of a failed or
    # early-stopped configuration would cut it short and leave its runs RUNNING.
    except early_stop as exc:
        error = f"early-stopped in {where}: {exc}"
        with interrupt.ignored():
            tracking.close_quietly(lambda: tracking.close_run(client, run_id, "KILLED", error=error, tags={"early_stopped": "true"}),
                                   "the configuration's runs")  # fmt: skip
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (interrupt.Terminated)
        error = f"interrupted in {where} ({interrupt.caught(exc)})"
        with interrupt.ignored():
            tracking.close_quietly(lambda: tracking.close_run(client, run_id, "KILLED", error=error), "the configuration's runs")
        raise
    except BaseException as exc:
        error = f"{where}: {error_text(exc)}"
        with interrupt.ignored():
            tracking.close_quietly(lambda: tracking.close_run(client, run_id, "FAILED", error=error), "the configuration's runs")
        raise
    return outcome
