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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from wavesweep import interrupt, replicates, tracking
from wavesweep.config import TrialConfig
from wavesweep.tracked_trial import run_tracked_trial
from wavesweep.trial import Reporter, TrialResult

log = logging.getLogger(__name__)


@dataclass
class ConfigurationOutcome:
    """The configuration run and its replicates (in order, replicate i has seed ``cfg.seed + i``).

    ``results`` hold every replicate's numbers; their pruned models and records are released
    (:meth:`TrialResult.release`) once the replicate is recorded and ``on_replicate`` has seen it,
    so a configuration holds one replicate's models at a time, not N (on a GPU: device memory)."""

    run_id: str
    config_id: str
    results: list[TrialResult] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)  # the replicate trial runs
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
        run_id, owned = client.create_run(exp_id, run_name=all_tags[tracking.MLFLOW_RUN_NAME], tags=all_tags).info.run_id, True
    return run_id, owned


def _log_params(client, run_id: str, cfg: TrialConfig, n: int) -> None:
    seeds = ",".join(str(cfg.seed + i) for i in range(n))
    params = {**cfg.to_dict(), "replicates": n, "replicate_seeds": seeds, "code_version": tracking.code_version()}
    tracking.log_batch(client, run_id, params=params)  # `mlflow run` logged its -P values: kept


def results_of(result: TrialResult) -> dict[str, float]:
    """A replicate's headline metrics as its trial run records them, less ``seconds_*`` (how long
    phases took: not a result, and partly measured after the run was written)."""
    return {k: v for k, v in result.metrics()["parent"].items() if not k.startswith("seconds_")}


def aggregated(results: dict[str, float]) -> dict[str, float]:
    """The results a configuration aggregates over its replicates: not the paired statistics over
    examples (``dwt_vs_*``: interval ends, McNemar p): a mean of p-values or of interval ends is not
    a statistic. They stay on each replicate's run and in ``replicates.csv``."""
    return {k: v for k, v in results.items() if not k.startswith("dwt_vs_")}


def _replicates_table(outcome: ConfigurationOutcome) -> str:
    rows = [{"replicate": i, "seed": r.config.seed, "run_id": rid, **results_of(r)}
            for i, (r, rid) in enumerate(zip(outcome.results, outcome.run_ids))]  # fmt: skip
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
    early_stop: tuple[type[BaseException], ...] = (),
) -> ConfigurationOutcome:
    """Run ``cfg`` over ``n_replicates`` seeds (``cfg.seed + i``), each a tracked trial below one
    configuration run that gets the aggregates; returns the configuration's outcome.

    ``reporter`` (early stopping) sees the first replicate only: its partial accuracy is on the
    same examples and base model as every other trial's first replicate, so a pruner compares
    like with like, and a stopped configuration runs no further replicates. ``tags`` go on the
    configuration run and on every replicate run. ``on_run(run_id)`` is called as soon as the
    configuration run exists; ``on_replicate(i, result, run_id)`` after each replicate.
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
        for i, rcfg in enumerate(replicates.replicate_configs(cfg, n)):
            where = f"replicate {i} (seed {rcfg.seed})"

            def name_run(rid: str, i: int = i, rcfg: TrialConfig = rcfg) -> None:
                tracking.log_batch(client, rid, tags={tracking.MLFLOW_RUN_NAME: f"trial {_desc(rcfg)} seed {rcfg.seed} (replicate {i})"})

            result, rid = run_tracked_trial(
                rcfg, parent_run_id=run_id, experiment=exp_name, reporter=reporter if i == 0 else None,
                tags={**(tags or {}), "replicate": str(i), "config_id": cid}, progress=progress, on_run=name_run,
                early_stop=early_stop,
            )  # fmt: skip
            outcome.results.append(result)
            outcome.run_ids.append(rid)
            if on_replicate is not None:
                on_replicate(i, result, rid)
            result.release()
        where = "aggregation"
        outcome.aggregates = replicates.aggregate([aggregated(results_of(r)) for r in outcome.results])
        tracking.log_batch(client, run_id, metrics=outcome.aggregates)
        client.log_text(run_id, _replicates_table(outcome), "replicates.csv")
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
        error = f"{where}: {type(exc).__name__}: {exc}"
        with interrupt.ignored():
            tracking.close_quietly(lambda: tracking.close_run(client, run_id, "FAILED", error=error), "the configuration's runs")
        raise
    return outcome
