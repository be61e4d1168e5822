"""Replicates: the aggregation against a direct NumPy/SciPy computation, the seeds and ids, the
bad values; the run layout of ``wavesweep trial --replicates`` (slow tests below)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats

from tests.test_study import tiny_weights, write_spec  # noqa: F401 (a fixture)
from wavesweep import cli, replicates
from wavesweep.config import TrialConfig


def direct(values: list[float]) -> dict[str, float]:
    """Oracle: mean, sample std and the 95 % t-interval for the mean, as SciPy computes them."""
    x = np.asarray(values, dtype=float)
    mean, std = x.mean(), x.std(ddof=1)
    if std == 0:  # SciPy's interval of a zero scale is NaN; the interval of a constant is the point
        return {"mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean}
    lo, hi = scipy.stats.t.interval(0.95, df=len(x) - 1, loc=mean, scale=scipy.stats.sem(x))
    return {"mean": mean, "std": std, "ci_low": lo, "ci_high": hi}


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_aggregate_matches_a_direct_computation(n):
    rng = np.random.default_rng(n)
    rows = [{"top1": float(rng.uniform(0.8, 1.0)), "gain_top1_vs_magnitude": float(rng.normal(0, 0.02)),
             "stored_bytes": 205220, "val_top1": float(rng.uniform(0.7, 0.9)), "n_eval": 120.0}
            for _ in range(n)]  # fmt: skip
    rows[0]["only_in_one"] = 1.0  # not shared: left out
    rows[-1]["top5"] = 0.99
    for r in rows[:-1]:
        r["top5"] = float("nan")  # non-finite somewhere: left out
    rows[1]["label"] = "text"  # not a number: left out
    agg = replicates.aggregate(rows)
    shared = ("top1", "gain_top1_vs_magnitude", "stored_bytes", "val_top1", "n_eval")  # any numeric name, val_* included
    assert set(agg) == {"n_replicates"} | {f"{k}_{s}" for k in shared for s in ("mean", "std", "ci_low", "ci_high")}
    assert agg["n_replicates"] == n
    for k in shared:
        want = direct([r[k] for r in rows])
        for s, v in want.items():
            assert agg[f"{k}_{s}"] == pytest.approx(v, rel=1e-12, abs=1e-15), (k, s)
    assert agg["stored_bytes_ci_low"] == agg["stored_bytes_ci_high"] == 205220  # no spread, no width
    assert replicates.means(agg) == {k: agg[f"{k}_mean"] for k in shared}


def test_aggregate_of_one_replicate_is_its_value_and_of_none_an_error():
    assert replicates.aggregate([{"top1": 0.5, "x": float("inf")}]) == {"n_replicates": 1.0, "top1_mean": 0.5}
    with pytest.raises(ValueError, match="at least one"):
        replicates.aggregate([])


def test_aggregate_takes_numpy_numbers_and_refuses_a_confidence_outside_0_1():
    """An np.float32 or np.int64 metric was left out of the aggregates (only Python int/float
    counted); a bool or np.bool_ still is no number. A confidence of 95 (not 0.95) gave NaN bounds."""
    rows = [{"top1": np.float32(0.5), "n": np.int64(3), "flag": np.bool_(True), "b": True},
            {"top1": np.float32(0.75), "n": np.int64(5), "flag": np.bool_(False), "b": False}]  # fmt: skip
    agg = replicates.aggregate(rows)
    assert agg == replicates.aggregate([{"top1": 0.5, "n": 3}, {"top1": 0.75, "n": 5}])
    assert agg["top1_mean"] == 0.625 and agg["n_mean"] == 4.0 and not any(k.startswith(("flag", "b_")) for k in agg)
    for bad in (95, 0, 1.0, float("nan"), "0.95"):
        with pytest.raises(ValueError, match=f"confidence must be a number in \\(0, 1\\), got {re.escape(repr(bad))}"):
            replicates.aggregate(rows, confidence=bad)
    lo, hi = scipy.stats.t.interval(0.9, df=1, loc=0.625, scale=scipy.stats.sem([0.5, 0.75]))
    assert replicates.aggregate(rows, confidence=0.9)["top1_ci_low"] == pytest.approx(lo, rel=1e-12)


def test_replicate_seeds_and_config_id():
    cfg = TrialConfig(model="cnn", seed=7, wavelet="haar")
    reps = replicates.replicate_configs(cfg, 3)
    assert [c.seed for c in reps] == [7, 8, 9]
    assert all({**c.to_dict(), "seed": 7} == cfg.to_dict() for c in reps)
    ids = {replicates.config_id(c) for c in reps}
    assert len(ids) == 1 and len(ids.pop()) == 12  # the same configuration whatever the seed
    assert replicates.config_id(TrialConfig(model="cnn", seed=7, wavelet="db2")) != replicates.config_id(cfg)
    assert "fixed weights" in replicates.seeds_note(TrialConfig(weights="w.pt"), 2)
    assert "caution: digits's train/test split is drawn from the seed" in replicates.seeds_note(TrialConfig(weights="w.pt"), 2)
    assert "caution" not in replicates.seeds_note(TrialConfig(weights="w.pt", dataset="fashion-mnist"), 2)
    assert "own base model" in replicates.seeds_note(cfg, 2) and "7, 8" in replicates.seeds_note(cfg, 2)
    # resnet18 on imagenet is torchvision's pretrained model whatever the seed (train.get_base_model)
    pretrained = replicates.seeds_note(TrialConfig(model="resnet18", dataset="imagenet"), 2)
    assert "the base model is torchvision's pretrained IMAGENET1K_V1 weights, the same for every seed" in pretrained
    assert "own base model" not in pretrained and "caution" not in pretrained


@pytest.mark.parametrize("value,ok", [(1, 1), ("3", 3), ("3.0", 3), (2.0, 2), (0, None), (-1, None), ("abc", None),
                                      (2.5, None), (True, None), (replicates.MAX_REPLICATES + 1, None)])  # fmt: skip
def test_check_replicates(value, ok):
    if ok is None:
        with pytest.raises(ValueError, match="replicates"):
            replicates.check_replicates(value)
    else:
        assert replicates.check_replicates(value) == ok


def test_summary_lines_show_mean_and_half_interval():
    rows = [{"top1": 0.9, "magnitude_top1": 0.8, "random_top1": 0.1, "base_top1": 0.95, "gain_top1_vs_magnitude": 0.1,
             "gain_top1_vs_random": 0.8}, {"top1": 0.94, "magnitude_top1": 0.86, "random_top1": 0.12, "base_top1": 0.95,
             "gain_top1_vs_magnitude": 0.08, "gain_top1_vs_random": 0.82}]  # fmt: skip
    agg = replicates.aggregate(rows)
    text = "\n".join(replicates.summary_lines(agg))
    half = (agg["top1_ci_high"] - agg["top1_ci_low"]) / 2
    assert f"dwt           0.9200 {half:7.4f}" in text
    assert f"dwt_vs_magnitude: gain +0.0900 [95% CI {agg['gain_top1_vs_magnitude_ci_low']:+.4f}" in text


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "101"])
def test_bad_replicates_is_one_line_and_creates_nothing(workdir, capsys, value):
    assert cli.main(["trial", "--model", "cnn", "--replicates", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("wavesweep: error: replicates=") and repr(value) in err
    assert not (workdir / "mlflow.db").exists()


def test_a_spec_takes_replicates_and_rejects_bad_ones(workdir, capsys):
    from wavesweep import study

    base = "study: x\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n"
    (workdir / "ok.yaml").write_text(base + "replicates: 3\npruner: median\n")
    spec = study.load_spec(workdir / "ok.yaml")
    assert spec.replicates == 3 and spec.summary_params()["replicates"] == 3
    assert study.load_spec(workdir / "ok.yaml", overrides={"replicates": 2}).replicates == 2  # --set replicates=2
    (workdir / "default.yaml").write_text(base)
    assert study.load_spec(workdir / "default.yaml").replicates == 1
    for bad in ("0", "2.5", "true", "x", "1000"):
        (workdir / "bad.yaml").write_text(base + f"replicates: {bad}\n")
        assert cli.main(["study", str(workdir / "bad.yaml"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "bad.yaml:5: replicates: replicates must be an integer from 1 to" in err, err
    assert not (workdir / "optuna.db").exists()


# --------------------------------------------------------------------------- recorded in MLflow (slow)

TINY = ["--model", "cnn", "--eval-limit", "60", "--timing-batches", "0", "--wavelet", "haar", "--level", "2", "--percentile", "60"]


def _runs_by_kind(client, experiment: str = "wavesweep") -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(r.data.tags.get("wavesweep.kind"), []).append(r)
    return out


def headline(run) -> dict[str, float]:
    """A trial run's results as read back (not the per-layer series, not the phase timings)."""
    return {k: v for k, v in run.data.metrics.items() if not k.startswith(("layer_", "seconds_"))}


def assert_aggregates_recomputed(config_run, replicate_runs) -> None:
    """Every ``<m>_mean/_std/_ci_low/_ci_high`` on the configuration run equals a direct
    computation from the replicate runs' metrics, and every shared metric is aggregated but the
    paired statistics over examples (``dwt_vs_*``: a mean of p-values is not a statistic)."""
    rows = [headline(r) for r in replicate_runs]
    shared = {k for k in set(rows[0]).intersection(*rows[1:]) if not k.startswith("dwt_vs_")}
    assert any(k.startswith("dwt_vs_") for k in rows[0]) and not any(k.startswith("dwt_vs_") for k in config_run.data.metrics)
    got = config_run.data.metrics
    assert got["n_replicates"] == len(rows)
    assert {k[: -len("_mean")] for k in got if k.endswith("_mean")} == shared
    for k in shared:
        for s, v in direct([r[k] for r in rows]).items():
            assert got[f"{k}_{s}"] == pytest.approx(v, rel=1e-9, abs=1e-12), (k, s)


@pytest.mark.slow
def test_trial_cli_replicates_records_a_configuration_run_with_replicate_children(workdir, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    assert cli.main(["trial", *TINY, "--replicates", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "replicate 0 of 2 (seed 0):" in out and "replicate 1 of 2 (seed 1):" in out and "over 2 replicates" in out
    client = MlflowClient()
    runs = _runs_by_kind(client)
    assert sorted((k, len(v)) for k, v in runs.items()) == [("configuration", 1), ("method", 6), ("trial", 2)]
    assert all(r.info.status == "FINISHED" for v in runs.values() for r in v)
    (config,) = runs["configuration"]
    cid = config.data.tags["config_id"]
    assert config.data.tags["method"] == "configuration" and "mlflow.parentRunId" not in config.data.tags
    assert config.data.params["replicates"] == "2" and config.data.params["seed"] == "0"
    assert config.data.params["replicate_seeds"] == "0,1"
    trials = sorted(runs["trial"], key=lambda r: int(r.data.tags["replicate"]))
    assert [r.data.tags["mlflow.parentRunId"] for r in trials] == [config.info.run_id] * 2
    assert [(r.data.tags["replicate"], r.data.params["seed"], r.data.tags["config_id"]) for r in trials] == [("0", "0", cid), ("1", "1", cid)]
    # each seed has its own base model (trained and cached for seed 1)
    assert trials[0].data.params["base_checksum"] != trials[1].data.params["base_checksum"]
    for t in trials:
        kids = [r for r in runs["method"] if r.data.tags["mlflow.parentRunId"] == t.info.run_id]
        assert sorted(r.data.tags["method"] for r in kids) == ["dwt", "magnitude", "random"]
        assert {(r.data.tags["replicate"], r.data.tags["config_id"]) for r in kids} == {(t.data.tags["replicate"], cid)}
    assert_aggregates_recomputed(config, trials)
    assert "top1_ci_low" in config.data.metrics and "gain_top1_vs_magnitude_ci_high" in config.data.metrics
    table = __import__("pandas").read_csv(client.download_artifacts(config.info.run_id, "replicates.csv", str(tmp_path)))
    assert list(table["run_id"]) == [t.info.run_id for t in trials] and list(table["seed"]) == [0, 1]
    assert list(table["top1"]) == [t.data.metrics["top1"] for t in trials]
    # registering a configuration registers its replicate 0 (the base seed)
    from wavesweep import tracking

    assert tracking.get_trial_run(client, config.info.run_id).info.run_id == trials[0].info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("stop,status", [(RuntimeError("disk on fire"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_failing_replicate_closes_every_run(workdir, monkeypatch, stop, status):
    from mlflow.tracking import MlflowClient

    from wavesweep import tracked_trial
    from wavesweep.tracked_config import run_tracked_configuration

    real, calls = tracked_trial.run_trial, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise stop
        return real(*args, **kwargs)

    monkeypatch.setattr(tracked_trial, "run_trial", second_fails)
    cfg = TrialConfig(model="cnn", eval_limit=40, timing_batches=0, wavelet="haar", level=2)
    with pytest.raises(type(stop)):
        run_tracked_configuration(cfg, 3)
    runs = _runs_by_kind(MlflowClient())
    (config,) = runs["configuration"]
    assert config.info.status == status
    assert "replicate 1 (seed 1)" in config.data.tags["error"]
    trials = {r.data.tags["replicate"]: r for r in runs["trial"]}
    assert sorted(trials) == ["0", "1"]  # replicate 2 never started
    assert trials["0"].info.status == "FINISHED" and trials["1"].info.status == status
    assert not [r for v in runs.values() for r in v if r.info.status == "RUNNING"]
    assert not any(k.endswith("_mean") for k in config.data.metrics)  # no aggregate of an incomplete configuration


@pytest.mark.slow
def test_a_configuration_holds_one_replicates_models_at_a_time(workdir, monkeypatch):
    """Each replicate's pruned models are released once it is recorded and ``on_replicate`` has
    seen them (on a GPU, N replicates would otherwise hold 3N models): while replicate 1 runs,
    replicate 0's models are gone; every number of every replicate stays."""
    import gc
    import weakref

    from wavesweep import tracked_trial
    from wavesweep.tracked_config import results_of, run_tracked_configuration

    seen, alive_at_start = [], []
    real = tracked_trial.run_trial

    def counting(*args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(m() is not None for refs, _ in seen for m in refs))
        return real(*args, **kwargs)

    def on_replicate(i, result, run_id):
        assert all(o.prune.model is not None for o in result.outcomes.values())  # the callback sees the models
        seen.append(([weakref.ref(o.prune.model) for o in result.outcomes.values()], results_of(result)))

    monkeypatch.setattr(tracked_trial, "run_trial", counting)
    cfg = TrialConfig(model="cnn", eval_limit=40, timing_batches=0, wavelet="haar", level=2)
    out = run_tracked_configuration(cfg, 2, on_replicate=on_replicate)
    gc.collect()
    assert alive_at_start == [0, 0]  # replicate 0's three models were freed before replicate 1 ran
    assert all(m() is None for refs, _ in seen for m in refs)
    for r, (_, numbers) in zip(out.results, seen):
        assert all(o.prune.model is None for o in r.outcomes.values())
        assert results_of(r) == numbers  # the numbers stay
        assert r.outcomes["dwt"].prune.n_zeroed == r.outcomes["dwt"].stats.zeroed_coeffs
    # a mean of p-values or of interval ends is not a statistic: the paired statistics over
    # examples stay on each replicate's run (and in replicates.csv), out of the aggregates
    assert any(k.startswith("dwt_vs_") for _, n in seen for k in n)
    kept = [{k: v for k, v in n.items() if not k.startswith("dwt_vs_")} for _, n in seen]
    assert out.aggregates == replicates.aggregate(kept)
    assert not any(k.startswith("dwt_vs_") for k in out.aggregates) and "gain_top1_vs_magnitude_ci_low" in out.aggregates


@pytest.mark.slow
def test_closing_a_configuration_run_closes_its_running_replicates(workdir):
    """A stop that lands before a replicate's own cleanup (inside create_run) or a lost worker:
    closing the configuration run closes the replicate trial runs and their method runs too."""
    from wavesweep import tracking

    client, exp = tracking.init_tracking()
    config = client.create_run(exp, tags={"wavesweep.kind": "configuration"}).info.run_id
    trial = client.create_run(exp, tags={"wavesweep.kind": "trial", "mlflow.parentRunId": config}).info.run_id
    method = client.create_run(exp, tags={"wavesweep.kind": "method", "mlflow.parentRunId": trial}).info.run_id
    done = client.create_run(exp, tags={"wavesweep.kind": "trial", "mlflow.parentRunId": config}).info.run_id
    client.set_terminated(done, "FINISHED")
    tracking.close_run(client, config, "KILLED", error="interrupted (SIGTERM)")
    status = {rid: client.get_run(rid).info.status for rid in (config, trial, method, done)}
    assert status == {config: "KILLED", trial: "KILLED", method: "KILLED", done: "FINISHED"}
    assert client.get_run(method).data.tags["error"] == "interrupted (SIGTERM)"


@pytest.mark.slow
def test_study_with_replicates_records_configurations_and_optimises_their_means(workdir, tiny_weights, monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from wavesweep import study, tracked_config

    real, reporters = tracked_config.run_tracked_trial, []

    def spy(cfg, **kwargs):  # the pruner sees the first replicate only
        reporters.append((cfg.seed, kwargs["reporter"] is not None))
        return real(cfg, **kwargs)

    monkeypatch.setattr(tracked_config, "run_tracked_trial", spy)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, replicates=2, n_trials=2, pruner={"name": "median", "n_startup_trials": 5},
                      space={"percentile": {"low": 5.0, "high": 95.0}, "wavelet": ["haar", "db2"]})  # no repeat: both run  # fmt: skip
    assert cli.main(["study", str(spec), "-q"]) == 0
    assert reporters == [(0, True), (1, False)] * 2
    trials = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    client = MlflowClient()
    runs = _runs_by_kind(client)
    assert sorted((k, len(v)) for k, v in runs.items()) == [("configuration", 2), ("method", 12), ("study", 1), ("trial", 4)]
    assert all(r.info.status == "FINISHED" for v in runs.values() for r in v)
    (study_run,) = runs["study"]
    assert study_run.data.params["replicates"] == "2"
    for t in trials:
        config = client.get_run(t.user_attrs["mlflow_run_id"])
        tags = config.data.tags
        assert tags["wavesweep.kind"] == "configuration" and tags["mlflow.parentRunId"] == study_run.info.run_id
        assert (tags["optuna.study"], tags["optuna.trial_number"], tags["optuna.state"]) == ("tiny", str(t.number), "COMPLETE")
        assert float(config.data.params["percentile"]) == t.params["percentile"] and config.data.params["wavelet"] == t.params["wavelet"]
        reps = sorted((r for r in runs["trial"] if r.data.tags["mlflow.parentRunId"] == config.info.run_id),
                      key=lambda r: int(r.data.tags["replicate"]))  # fmt: skip
        assert [r.data.params["seed"] for r in reps] == ["0", "1"]
        assert reps[0].data.params["base_checksum"] == reps[1].data.params["base_checksum"]  # fixed weights: one base model
        assert all(r.data.tags["optuna.trial_number"] == str(t.number) for r in reps)
        assert t.user_attrs["replicate_run_ids"] == ",".join(r.info.run_id for r in reps)
        assert len(t.intermediate_values) == 4  # the first replicate's evaluation chunks only
        assert_aggregates_recomputed(config, reps)
        # the objective value is the mean over the replicates of the objective metric
        # (a study selects on the validation part: the objective top1 is val_top1)
        assert t.value == pytest.approx(np.mean([r.data.metrics["val_top1"] for r in reps]), abs=1e-12)
        for key in ("top1", "magnitude_top1", "random_top1", "gain_top1_vs_magnitude", "gain_top1_vs_random"):
            want = direct([r.data.metrics[key] for r in reps])
            assert t.user_attrs[key] == pytest.approx(want["mean"], abs=1e-12), key
            assert (t.user_attrs[f"{key}_ci_low"], t.user_attrs[f"{key}_ci_high"]) == pytest.approx((want["ci_low"], want["ci_high"]))
        # every scoring pass of the three pruned models of each replicate: test, validation, test before recovery
        scored = sum(3 * (int(r.data.metrics["n_eval"]) * (1 + (r.data.params["recovery"] != "none")) + int(r.data.metrics["n_val"]))
                     for r in reps)  # fmt: skip
        assert t.user_attrs["n_replicates"] == 2 and t.user_attrs["examples_evaluated"] == scored == 3 * (2 * 20 + 20) * 2
        assert not any(k.startswith("dwt_vs_") for k in t.user_attrs)  # a mean of p-values is not a statistic
    md = (workdir / "reports" / "tiny" / "summary.md").read_text()
    assert "mean [95 % t-interval] over n = 2 replicate seeds" in md
    import pandas as pd

    summary = pd.read_csv(workdir / "reports" / "tiny" / "summary.csv")
    assert summary.loc[0, "n_replicates"] == 2 and "top1_ci_low" in summary


def test_report_uses_the_replicate_interval(tmp_path):
    """A trials frame with a trial over replicate seeds: its error bars are its t-interval (top-1
    clipped to [0, 1]), summary.md shows mean [interval] and n; single-seed rows are unchanged."""
    import pandas as pd

    from tests.test_report import make_frame
    from wavesweep import figures, report

    frame = make_frame(6)
    frame = frame.assign(state="COMPLETE", value_0=frame["top1"], n_replicates=np.nan)
    i = int(frame["top1"].idxmax())
    top1 = frame.loc[i, "top1"]
    frame.loc[i, ["n_replicates", "top1_ci_low", "top1_ci_high", "magnitude_top1_ci_low", "magnitude_top1_ci_high",
                  "gain_top1_vs_magnitude_ci_low", "gain_top1_vs_magnitude_ci_high"]] = [
        3, top1 - 0.05, top1 + 0.05, 0.80, 0.90, 0.01, 0.05]  # fmt: skip
    frame.loc[i, ["dwt_vs_magnitude_ci_low", "dwt_vs_magnitude_ci_high", "dwt_vs_magnitude_mcnemar_p"]] = np.nan
    pts = figures.method_points(frame, "pruned_fraction")
    row = pts[(pts["method"] == "dwt") & pts["numbers"].map(lambda n: n == [frame.loc[i, "number"]])].iloc[0]
    assert row["interval"] == "replicate t-interval" and row["n_runs"] == 3
    assert (row["low"], row["high"]) == pytest.approx((top1 - 0.05, min(1.0, top1 + 0.05)))
    mag = pts[(pts["method"] == "magnitude") & (pts["n_runs"] == 3)].iloc[0]
    assert (mag["low"], mag["high"]) == pytest.approx((0.80, 0.90))
    assert set(pts.loc[pts["n_runs"] == 1, "interval"]) == {"wilson"}
    files = report.write_report(frame, tmp_path, study_name="r", objectives=[("top1", "maximize")], importances={})
    summary = pd.read_csv(files["summary_csv"])
    assert summary.loc[0, "n_replicates"] == 3 and summary.loc[0, "top1_ci_low"] == pytest.approx(top1 - 0.05)
    md = files["summary_md"].read_text()
    assert top1 + 0.05 > 1 and summary.loc[0, "top1_ci_high"] == pytest.approx(top1 + 0.05)  # summary.csv: unclipped
    # summary.md: a top-1 interval clipped to [0, 1], as the figures draw it (it said 1.03)
    assert f"| {top1:.4g} [{top1 - 0.05:.4g}, 1] |" in md and "top1_ci_low" not in md
    line = next(l for l in md.splitlines() if l.startswith(f"- trial {frame.loc[i, 'number']} (best top1") and "replicate" in l)
    assert "n = 3 replicate seeds" in line and "gain vs magnitude" in line and "interval excludes 0" in line
    assert f"dwt top-1 {top1:.4f} [{top1 - 0.05:.4f}, 1.0000]" in line and "clipped to [0, 1]" in md
    assert "(one base model" not in line  # cnn on digits, no weights: each seed trained its own
    for model, dataset, weights, said in (("resnet18", "imagenet", None, "torchvision's pretrained IMAGENET1K_V1 weights"),
                                          ("cnn", "digits", "w.pt", "the fixed weights 'w.pt'")):  # fmt: skip
        frame.loc[i, ["model", "dataset", "weights"]] = [model, dataset, weights]
        md = report.write_report(frame, tmp_path / model, study_name="r", objectives=[("top1", "maximize")],
                                 importances={})["summary_md"].read_text()  # fmt: skip
        line = next(l for l in md.splitlines() if l.startswith(f"- trial {frame.loc[i, 'number']} (best top1") and "replicate" in l)
        assert f"n = 3 replicate seeds (one base model for every seed: {said}):" in line, line


@pytest.mark.slow
def test_mlflow_run_replicates_adopts_the_launched_run_as_the_configuration_run(workdir, shared_cache):
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from tests.conftest import subprocess_env

    root = Path(__file__).resolve().parents[1]

    def mlflow_run(experiment: str, **params: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mlflow", "run", str(root), "--env-manager", "local", "--experiment-name", experiment]
        for k, v in {"model": "cnn", "eval_limit": "40", "timing_batches": "0", "wavelet": "haar", **params}.items():
            cmd += ["-P", f"{k}={v}"]
        return subprocess.run(cmd, cwd=workdir, env=subprocess_env(workdir, shared_cache), capture_output=True, text=True, timeout=900)

    proc = mlflow_run("rep", replicates="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = _runs_by_kind(client, "rep")
    assert sorted((k, len(v)) for k, v in runs.items()) == [("configuration", 1), ("method", 6), ("trial", 2)]
    (config,) = runs["configuration"]
    assert config.data.tags.get("mlflow.project.entryPoint") == "main"  # the run `mlflow run` created
    assert all(r.info.status == "FINISHED" for v in runs.values() for r in v)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["trial"]} == {config.info.run_id}
    assert_aggregates_recomputed(config, runs["trial"])

    bad = mlflow_run("bad", replicates="0")
    assert bad.returncode != 0
    lines = [l for l in bad.stderr.splitlines() if l.startswith("wavesweep: error:")]
    assert len(lines) == 1 and "replicates='0'" in lines[0], bad.stderr[-2000:]
    (failed,) = [r for v in _runs_by_kind(client, "bad").values() for r in v]
    assert failed.info.status == "FAILED" and "replicates='0'" in failed.data.tags["error"]


# --------------------------------------------------------------------------- resuming a stopped configuration (slow)

RESUME = ["--model", "cnn", "--eval-limit", "40", "--timing-batches", "0", "--wavelet", "haar", "--level", "2", "--recovery", "none"]


def _resume_cfg(**changes) -> TrialConfig:
    return TrialConfig(**{"model": "cnn", "eval_limit": 40, "timing_batches": 0, "wavelet": "haar", "level": 2, "recovery": "none", **changes})


def _replicate_spy(monkeypatch):
    """Spy on the replicates a configuration runs (their seeds); ``stops[seed]`` is raised in place of
    running that seed (a cheap stop, before its trial run exists); ``inside[seed]`` is raised, or
    for ``"SIGINT"`` sent as a real Ctrl-C, inside that seed's trial (its run exists, closed by it)."""
    import os
    import signal
    import time

    from wavesweep import tracked_config, tracked_trial

    calls, stops, inside = [], {}, {}
    real_tracked, real_trial = tracked_config.run_tracked_trial, tracked_trial.run_trial

    def spy(cfg, **kwargs):
        calls.append(cfg.seed)
        if cfg.seed in stops:
            raise stops.pop(cfg.seed)
        return real_tracked(cfg, **kwargs)

    def trial(cfg, *args, **kwargs):
        stop = inside.pop(cfg.seed, None)
        if stop == "SIGINT":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
            raise AssertionError("SIGINT did not stop the trial")
        if stop is not None:
            raise stop
        return real_trial(cfg, *args, **kwargs)

    monkeypatch.setattr(tracked_config, "run_tracked_trial", spy)
    monkeypatch.setattr(tracked_trial, "run_trial", trial)
    return calls, stops, inside


def _children(client, run_id: str) -> list:
    """The runs nested below ``run_id`` as MLflow finds them (its UI nests by this tag)."""
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run_id}'")


def _csv(client, run_id: str, folder) -> str:
    return open(client.download_artifacts(run_id, "replicates.csv", str(folder))).read()


@pytest.mark.slow
def test_a_stopped_configuration_resumes_where_it_stopped(workdir, monkeypatch, capsys, tmp_path):
    """An error in replicate 1 of 3, then a real Ctrl-C in replicate 2 of the next attempt: the
    third attempt runs replicate 2 only, takes replicates 0 and 1 over (moved below it, tagged
    where from), and its aggregates, replicates.csv and printed summary equal those of the same
    configuration run without a stop, exactly; a FINISHED configuration is never resumed from."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from wavesweep import tracking
    from wavesweep.study.objective import replicate_record
    from wavesweep.tracked_config import ConfigurationOutcome, results_of_run, run_tracked_configuration

    cfg = _resume_cfg()
    oracle = run_tracked_configuration(cfg, 3, experiment="oracle")  # the same configuration, never stopped
    client = MlflowClient()
    calls, stops, inside = _replicate_spy(monkeypatch)

    # attempt 1: an error in replicate 1
    inside[1] = RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_tracked_configuration(cfg, 3)
    assert calls == [0, 1]
    (c1,) = _runs_by_kind(client)["configuration"]
    assert c1.info.status == "FAILED"
    r0 = next(r for r in _children(client, c1.info.run_id) if r.data.tags["replicate"] == "0")

    # attempt 2 (the CLI): replicate 0 reused, replicate 1 run, a real Ctrl-C in replicate 2
    calls.clear()
    inside[2] = "SIGINT"
    assert cli.main(["trial", *RESUME, "--replicates", "3", "-q"]) == 130
    out = capsys.readouterr().out
    assert calls == [1, 2]  # replicate 0 is not run again
    c2 = next(r for r in _runs_by_kind(client)["configuration"] if r.info.run_id != c1.info.run_id)
    assert c2.info.status == "KILLED"
    assert f"replicate 0 (seed 0): reused FINISHED run {r0.info.run_id} of interrupted configuration {c1.info.run_id}" in out
    assert "replicate 0 of 3" not in out and "replicate 1 of 3 (seed 1):" in out
    moved = client.get_run(r0.info.run_id)
    assert moved.data.tags["mlflow.parentRunId"] == c2.info.run_id and moved.data.tags["resumed_from"] == c1.info.run_id
    c1 = client.get_run(c1.info.run_id)
    assert (c1.data.tags["resumed_by"], c1.data.tags["resumed_replicates"]) == (c2.info.run_id, "0")
    r1 = next(r for r in _children(client, c2.info.run_id) if r.data.tags["replicate"] == "1" and r.info.status == "FINISHED")

    # attempt 3 (the CLI): replicates 0 and 1 reused from attempt 2's configuration, replicate 2 run
    calls.clear()
    assert cli.main(["trial", *RESUME, "--replicates", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert calls == [2]
    runs = _runs_by_kind(client)
    (c3,) = [r for r in runs["configuration"] if r.info.status == "FINISHED"]
    for i, r in enumerate((r0, r1)):
        line = f"replicate {i} (seed {i}): reused FINISHED run {r.info.run_id} of interrupted configuration {c2.info.run_id}"
        assert line in out
    assert "replicate 2 of 3 (seed 2):" in out and "replicate 0 of 3" not in out and "replicate 1 of 3" not in out
    assert "\n".join(replicates.summary_lines(oracle.aggregates)) in out  # what an uninterrupted run prints
    # the replicates are the configuration's children, each with its own method runs, nothing RUNNING
    kids = sorted(_children(client, c3.info.run_id), key=lambda r: int(r.data.tags["replicate"]))
    assert [(r.data.tags["replicate"], r.data.params["seed"], r.info.status) for r in kids] == [
        ("0", "0", "FINISHED"), ("1", "1", "FINISHED"), ("2", "2", "FINISHED")]  # fmt: skip
    assert [k.info.run_id for k in kids[:2]] == [r0.info.run_id, r1.info.run_id]
    assert [k.data.tags.get("resumed_from") for k in kids] == [c2.info.run_id, c2.info.run_id, None]
    for k in kids:
        assert sorted(m.data.tags["method"] for m in _children(client, k.info.run_id)) == ["dwt", "magnitude", "random"]
    c2 = client.get_run(c2.info.run_id)
    assert (c2.info.status, c2.data.tags["resumed_by"], c2.data.tags["resumed_replicates"]) == ("KILLED", c3.info.run_id, "0,1")
    assert c3.data.tags["reused_replicates"] == "0,1"
    # registering a stopped configuration names the one that took its replicates over at last
    # (attempt 1's went to attempt 2's, which was stopped in turn and taken over by attempt 3's)
    for stopped, status in ((c1, "FAILED"), (c2, "KILLED")):  # attempt 1 failed, attempt 2 was stopped
        with pytest.raises(ValueError, match=f"^configuration run {stopped.info.run_id} \\({status}\\) has no replicate 0 "
                                             f"below it: its replicates were taken over by configuration run "
                                             f"{c3.info.run_id} \\(FINISHED\\); register that one$"):  # fmt: skip
            tracking.get_trial_run(client, stopped.info.run_id)
    early = client.create_run(c3.info.experiment_id, tags={"wavesweep.kind": "configuration"}).info.run_id
    client.set_terminated(early, "KILLED")
    with pytest.raises(ValueError, match=f"^configuration run {early} \\(KILLED\\) has no replicate 0 below it: it "
                                         "stopped before its first replicate began$"):
        tracking.get_trial_run(client, early)
    client.delete_run(early)
    assert tracking.get_trial_run(client, c3.info.run_id).info.run_id == r0.info.run_id
    assert not [r for v in runs.values() for r in v if r.info.status == "RUNNING"]
    # nothing recorded is lost: the failed and killed replicates stay below their configurations
    assert sorted((r.data.tags["replicate"], r.info.status) for r in runs["trial"]) == [
        ("0", "FINISHED"), ("1", "FAILED"), ("1", "FINISHED"), ("2", "FINISHED"), ("2", "KILLED")]  # fmt: skip
    assert len(runs["method"]) == 3 * 3  # the FINISHED ones' (the stopped ones stopped before theirs)
    # exactly the numbers of the uninterrupted configuration
    got = {k: v for k, v in c3.data.metrics.items() if k in oracle.aggregates}
    assert got == oracle.aggregates and set(oracle.aggregates) <= set(c3.data.metrics)
    (o,) = _runs_by_kind(client, "oracle")["configuration"]
    assert {k: v for k, v in o.data.metrics.items() if k in oracle.aggregates} == got
    assert_aggregates_recomputed(c3, kids)
    mine, theirs = _csv(client, c3.info.run_id, tmp_path / "a"), _csv(client, o.info.run_id, tmp_path / "b")
    for rid, orid in zip([k.info.run_id for k in kids], oracle.run_ids):
        mine = mine.replace(rid, orid)
    assert mine == theirs  # the same text: columns, order, every number
    table = pd.read_csv(tmp_path / "a" / "replicates.csv")
    assert list(table["run_id"]) == [k.info.run_id for k in kids]
    # a study's record of the configuration: the same from replicate runs read back as from the results
    resumed = ConfigurationOutcome(run_id=c3.info.run_id, config_id=c3.data.tags["config_id"], results=[None] * 3,
                                   run_ids=[k.info.run_id for k in kids], metrics=[results_of_run(k) for k in kids],
                                   aggregates=oracle.aggregates)  # fmt: skip
    assert resumed.metrics == oracle.metrics
    want = replicate_record(replicates.means(oracle.aggregates), oracle)
    got_record = replicate_record(replicates.means(oracle.aggregates), resumed, client)
    assert got_record.pop("replicate_run_ids") == ",".join(k.info.run_id for k in kids)
    want.pop("replicate_run_ids")
    assert got_record == want and want["examples_evaluated"] == 3 * 3 * 40

    # a FINISHED configuration is never resumed from: the next attempt runs replicate 0 again
    calls.clear()
    stops[0] = RuntimeError("stop before running")
    with pytest.raises(RuntimeError, match="stop before running"):
        run_tracked_configuration(cfg, 3)
    assert calls == [0]
    assert [r.info.run_id for r in _children(client, c3.info.run_id)] and all(
        client.get_run(k.info.run_id).data.tags["mlflow.parentRunId"] == c3.info.run_id for k in kids)  # fmt: skip
    assert tracking.run_status(client, c3.info.run_id) == "FINISHED"


@pytest.mark.slow
def test_only_the_same_configuration_resumes_and_what_is_moved_stays_found(workdir, monkeypatch):
    """A replicate is reused only by the same configuration (another percentile, another base seed,
    another code version: nothing), never from below a RUNNING configuration (a live process took
    it), is still found after a stop between moving it and tagging the configuration it left, or
    after a process killed once it moved it; and the run ``mlflow run`` created resumes as well."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from wavesweep import tracked_config, tracking
    from wavesweep.tracked_config import run_tracked_configuration

    client, exp = tracking.init_tracking()
    calls, stops, inside = _replicate_spy(monkeypatch)
    cfg = _resume_cfg()
    inside[1] = RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        run_tracked_configuration(cfg, 2)
    (old,) = _runs_by_kind(client)["configuration"]
    (r0,) = [r for r in _children(client, old.info.run_id) if r.info.status == "FINISHED"]

    def first_run(c: TrialConfig) -> list[int]:
        """The seeds the configuration ``c`` starts to run (stopped before the first one runs)."""
        calls.clear()
        stops[c.seed], stops[c.seed + 1] = RuntimeError("stop"), RuntimeError("stop")
        with pytest.raises(RuntimeError, match="stop"):
            run_tracked_configuration(c, 2)
        stops.clear()
        return list(calls)

    assert first_run(_resume_cfg(percentile=70.0)) == [0]  # another configuration
    assert first_run(_resume_cfg(seed=1)) == [1]  # the same config_id, other seeds: replicate 0 is seed 1
    with monkeypatch.context() as m:
        m.setattr(tracking, "code_version", lambda: "0.0.0+elsewhere")
        assert first_run(cfg) == [0]  # other code: other numbers, maybe
    # below a RUNNING configuration (another process moved it there and is running): left alone
    live = client.create_run(exp, tags={"wavesweep.kind": "configuration", "config_id": old.data.tags["config_id"],
                                        tracking.PROCESS_TAG: tracking.process_id()}).info.run_id  # fmt: skip
    client.set_tag(r0.info.run_id, "mlflow.parentRunId", live)
    assert first_run(cfg) == [0]
    client.set_terminated(live, "FINISHED")  # and a FINISHED one is never resumed from
    assert first_run(cfg) == [0]
    client.set_tag(r0.info.run_id, "mlflow.parentRunId", old.info.run_id)
    assert client.get_run(r0.info.run_id).data.tags["mlflow.parentRunId"] == old.info.run_id
    # a Ctrl-C between moving the replicate and tagging the configuration it left
    real = tracking.log_batch

    def stop_on_the_old_tag(client_, run_id, **kwargs):
        if "resumed_by" in (kwargs.get("tags") or {}):
            raise KeyboardInterrupt
        return real(client_, run_id, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tracking, "log_batch", stop_on_the_old_tag)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_tracked_configuration(cfg, 2)
    assert calls == []
    interrupted = client.get_run(client.get_run(r0.info.run_id).data.tags["mlflow.parentRunId"])
    assert interrupted.info.run_id != old.info.run_id and interrupted.info.status == "KILLED"
    assert client.get_run(r0.info.run_id).info.status == "FINISHED"
    # a process killed (kill -9) once it moved the replicate: its configuration stays RUNNING until
    # the next command closes it KILLED, and that command finds the replicate below it
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    gone_tag = tracking.process_id(gone.pid)
    gone.kill()
    gone.wait()
    dead = client.create_run(exp, tags={"wavesweep.kind": "configuration", "config_id": old.data.tags["config_id"],
                                        tracking.PROCESS_TAG: gone_tag}).info.run_id  # fmt: skip
    client.set_tag(r0.info.run_id, "mlflow.parentRunId", dead)
    # the run `mlflow run` created (adopted as the configuration run) resumes from it
    launched = client.create_run(exp).info.run_id
    calls.clear()
    out = run_tracked_configuration(cfg, 2, adopt_run_id=launched)
    assert calls == [1] and out.run_id == launched and out.reused == {0: dead}
    assert out.results[0] is None and out.results[1] is not None
    assert tracking.run_status(client, dead) == "KILLED"
    kids = sorted(_children(client, launched), key=lambda r: int(r.data.tags["replicate"]))
    assert [k.info.run_id for k in kids][:1] == [r0.info.run_id] and len(kids) == 2
    assert kids[0].data.tags["resumed_from"] == dead and client.get_run(dead).data.tags["resumed_by"] == launched
    assert out.metrics[0] == tracked_config.results_of_run(kids[0])
    assert_aggregates_recomputed(client.get_run(launched), kids)
    assert client.get_run(launched).data.tags["reused_replicates"] == "0"


@pytest.mark.slow
def test_a_study_trial_stopped_in_a_replicate_resumes_it_on_the_next_launch(workdir, tiny_weights, monkeypatch):
    """Ctrl-C in replicate 1 of a study trial over 2 seeds: the next launch retries the trial, which
    takes replicate 0 over from the stopped configuration (below the same study run) and runs
    replicate 1 only; its values and record are those of its two replicate runs."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from wavesweep import study

    calls, _, inside = _replicate_spy(monkeypatch)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, replicates=2, n_trials=1, space={"percentile": [40]})
    inside[1] = "SIGINT"
    assert cli.main(["study", str(spec), "-q"]) == 130
    assert calls == [0, 1]
    calls.clear()
    assert cli.main(["study", str(spec), "-q"]) == 0
    assert calls == [1]  # replicate 0 is not run again
    trials = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and trials[0].user_attrs["interrupted"] is True
    client = MlflowClient()
    old, new = (client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials)
    assert old.info.status == "KILLED" and old.data.tags["resumed_by"] == new.info.run_id
    assert old.data.tags["mlflow.parentRunId"] == new.data.tags["mlflow.parentRunId"]  # the study run
    reps = sorted(_children(client, new.info.run_id), key=lambda r: int(r.data.tags["replicate"]))
    assert [(r.data.params["seed"], r.info.status, r.data.tags.get("resumed_from")) for r in reps] == [
        ("0", "FINISHED", old.info.run_id), ("1", "FINISHED", None)]  # fmt: skip
    t = trials[1]
    assert t.user_attrs["replicate_run_ids"] == ",".join(r.info.run_id for r in reps)
    assert t.value == pytest.approx(np.mean([r.data.metrics["val_top1"] for r in reps]), abs=1e-12)  # selected on validation
    assert_aggregates_recomputed(new, reps)
    scored = sum(3 * (int(r.data.metrics["n_eval"]) * (1 + (r.data.params["recovery"] != "none")) + int(r.data.metrics["n_val"]))
                 for r in reps)  # fmt: skip
    assert t.user_attrs["examples_evaluated"] == scored and t.user_attrs["num_classes"] == 10
    assert "level_effective_min" in t.user_attrs and "layers_below_requested_level" in t.user_attrs


def test_a_replicate_is_reused_only_for_the_same_weights_and_kind_of_device(tmp_path, monkeypatch):
    """Beside the params, a reused replicate must have run on the same kind of device (a CUDA run's
    numbers are not a CPU run's) and, for fixed weights, on the same weights: a weights file
    rewritten since (its sha256, ``base_checksum``; oracle: hashlib), or a model alias moved to
    another version (``base_uri``), reuses nothing; so do weights that cannot be read now."""
    import hashlib

    import torch

    from wavesweep import model_registry
    from wavesweep.tracked_config import _same_base

    weights = tmp_path / "w.pt"
    torch.save({"w": torch.ones(3)}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    same = _same_base(_resume_cfg(weights=str(weights), device="cpu"))
    assert same({"base_checksum": digest, "resolved_device": "cpu"})
    assert same({"base_checksum": digest})  # a run from before resolved_device was recorded
    assert not same({"base_checksum": digest, "resolved_device": "cuda:0"})
    assert not same({"base_checksum": "0" * 64, "resolved_device": "cpu"})
    torch.save({"w": torch.zeros(3)}, weights)  # rewritten since that run
    assert not _same_base(_resume_cfg(weights=str(weights), device="cpu"))({"base_checksum": digest})
    weights.unlink()
    assert not _same_base(_resume_cfg(weights=str(weights), device="cpu"))({"base_checksum": digest})
    # a registered model by alias: what the alias means now
    monkeypatch.setattr(model_registry, "resolve_model_uri", lambda uri: "models:/base/3")
    by_alias = _same_base(_resume_cfg(weights="models:/base@champion", device="cpu"))
    assert by_alias({"base_uri": "models:/base/3"}) and not by_alias({"base_uri": "models:/base/2"})
    # a base model wavesweep trained: named by the params (config and seed) alone
    assert _same_base(_resume_cfg(device="cpu"))({"base_checksum": "anything", "resolved_device": "cpu"})


@pytest.mark.slow  # two configurations of two small replicates each
@pytest.mark.parametrize("val_fraction", [0.0, 0.5], ids=["test-part", "validation-part"])
def test_a_reused_replicate_0_replays_its_chunks_to_the_reporter(workdir, monkeypatch, val_fraction):
    """A study's pruner sees replicate 0's evaluation chunks. A replicate 0 reused from a stopped
    configuration was not run, so the pruner saw nothing and could not stop the configuration.
    Its chunks are now replayed from its recorded predictions. Oracle: the chunks its own run gave
    the reporter, field by field (top-5 and the loss need logits, which a run does not keep)."""
    import dataclasses
    import math

    from wavesweep import tracking
    from wavesweep.tracked_config import run_tracked_configuration

    tracking.init_tracking()
    calls, _, inside = _replicate_spy(monkeypatch)
    cfg = _resume_cfg(val_fraction=val_fraction)
    ran, replayed = [], []
    inside[1] = RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        run_tracked_configuration(cfg, 2, reporter=ran.append)
    assert calls == [0, 1] and len(ran) == 4
    calls.clear()
    out = run_tracked_configuration(cfg, 2, reporter=replayed.append)
    assert calls == [1] and list(out.reused) == [0]  # replicate 0 not run again
    assert [(c.step, c.n, c.correct) for c in replayed] == [(c.step, c.n, c.correct) for c in ran]
    for a, b in zip(ran, replayed):
        for k in ("n", "top1", "f1_macro", "recall_macro", "precision_macro", "f1_weighted"):
            assert getattr(b.result, k) == getattr(a.result, k), k
        assert math.isnan(b.result.top5) and math.isnan(b.result.loss)
        for k in ("correct", "preds", "targets"):
            assert np.array_equal(getattr(b.result, k), getattr(a.result, k)), k
    # a pruner that stops at the first replayed chunk stops the configuration before replicate 1
    import optuna

    def stop(chunk):
        raise optuna.TrialPruned(f"chunk {chunk.step}")

    other = dataclasses.replace(cfg, percentile=cfg.percentile + 1)  # another configuration, stopped in replicate 1
    inside[1] = RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        run_tracked_configuration(other, 2)
    calls.clear()
    with pytest.raises(optuna.TrialPruned, match="chunk 0"):
        run_tracked_configuration(other, 2, reporter=stop, early_stop=(optuna.TrialPruned,))
    assert calls == []
