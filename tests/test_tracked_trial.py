"""End to end: `mlflow run`, the MLflow record, recomputation from the logged checkpoint,
registry round trip in a fresh process, failures, determinism, concurrent first use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import subprocess_env
from wavesweep import accounting, checkpoint, evaluate, models, trial
from wavesweep.config import TrialConfig
from wavesweep.tracked_trial import run_tracked_trial
from wavesweep.stats import paired_comparison
from wavesweep.tracking import trial_config_of

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "cnn", "eval_limit": "150", "timing_batches": "1", "wavelet": "bior1.3", "level": "3", "percentile": "60"}
pytestmark = pytest.mark.slow


def _mlflow_run(workdir: Path, cache: Path, params: dict[str, str], experiment: str = "e2e"):
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, cwd=workdir, env=subprocess_env(workdir, cache), capture_output=True, text=True, timeout=600)


def _runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100)


def test_mlflow_run_records_a_complete_recomputable_trial(workdir, shared_cache, tmp_path):
    proc = _mlflow_run(workdir, shared_cache, TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    runs = _runs(client, "e2e")
    parents = [r for r in runs if r.data.tags.get("method") == "trial"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("mlflow.project.entryPoint") == "main"  # the run `mlflow run` created is the parent
    children = {r.data.tags["method"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"dwt", "magnitude", "random"}
    assert all(c.info.status == "FINISHED" for c in children.values())
    # the baselines name what they were matched to; random its draw's seed, magnitude none (it draws nothing)
    assert {m: (c.data.params.get("matched_to"), c.data.params.get("prune_seed")) for m, c in children.items()} == {
        "dwt": (None, None), "magnitude": ("dwt", None), "random": ("dwt", children["random"].data.params["seed"])}

    # params: full config + base identity + code version
    cfg = trial_config_of(parent)
    assert (cfg.model, cfg.wavelet, cfg.level, cfg.percentile, cfg.eval_limit) == ("cnn", "bior1.3", 3, 60.0, 150)
    for key in ("base_checksum", "base_source", "code_version", "base_num_classes"):
        assert parent.data.params[key]
    for m, c in children.items():
        for key in ("top1", "top5", "loss", "f1_macro", "recall_macro", "precision_macro", "f1_weighted",
                    "weight_sparsity_target", "coeff_sparsity", "stored_bytes", "compression_ratio",
                    "mean_rel_l2_error", "infer_median_ms", "infer_p95_ms", "infer_examples_per_s", "drop_top1", "base_top1"):
            assert key in c.data.metrics, (m, key)
    pm = parent.data.metrics
    assert pm["top1"] == children["dwt"].data.metrics["top1"]
    assert pm["magnitude_top1"] == children["magnitude"].data.metrics["top1"]
    # matched budget: the baselines removed the fraction of weights dwt removed of coefficients
    assert children["magnitude"].data.metrics["weight_sparsity_target"] == pytest.approx(pm["coeff_sparsity"], abs=2e-3)
    assert children["random"].data.metrics["weight_sparsity_target"] == pytest.approx(pm["coeff_sparsity"], abs=2e-3)
    # per-layer: table artifact + series metric over layers
    hist = client.get_metric_history(children["dwt"].info.run_id, "layer_coeff_sparsity")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"layers.json", "config.yaml", "predictions.csv", "warnings.txt", "checkpoints"} <= arts
    table = pd.read_json(client.download_artifacts(children["dwt"].info.run_id, "layers.json", str(tmp_path)), orient="split")
    assert len(hist) == len(table) > 0
    assert sorted(h.value for h in hist) == pytest.approx(sorted(table["coeff_sparsity"]))
    for r in (parent, *children.values()):  # MLflow sees every layers.json as a table
        assert {"path": "layers.json", "type": "table"} in json.loads(r.data.tags["mlflow.loggedArtifacts"])
        loaded = client.load_table(r.info.experiment_id, "layers.json", run_ids=[r.info.run_id])
        assert list(loaded["name"]) == list(table["name"]) and "coeff_sparsity" in loaded

    # recompute from the downloaded checkpoint: same accuracy, same stored bytes
    ckpt = Path(client.download_artifacts(parent.info.run_id, "checkpoints/dwt.wsz", str(tmp_path)))
    kw = {k: int(parent.data.params[f"base_{k}"]) for k in ("num_classes", "in_channels", "image_size")}
    model, meta = checkpoint.load_compressed(ckpt, models.build_model("cnn", **kw))
    _, eval_set = trial.load_eval_set(cfg)
    ev = evaluate.evaluate(model, eval_set, device="cpu")
    assert ev.n == 150
    assert ev.top1 == pytest.approx(pm["top1"], abs=1e-9)
    assert ckpt.stat().st_size - checkpoint.read_header(ckpt)["header_bytes"] == pm["stored_bytes"]
    # paired statistics recomputed from the logged predictions
    preds = pd.read_csv(client.download_artifacts(parent.info.run_id, "predictions.csv", str(tmp_path)))
    cmp = paired_comparison(preds["dwt"] == preds["target"], preds["magnitude"] == preds["target"], seed=cfg.seed)
    assert cmp.gap == pytest.approx(pm["dwt_vs_magnitude_gap"])
    assert cmp.mcnemar_p == pytest.approx(pm["dwt_vs_magnitude_mcnemar_p"])
    assert (preds["dwt"] == ev.preds).all()


def test_bad_parameter_fails_with_one_line_and_failed_run(workdir, shared_cache):
    proc = _mlflow_run(workdir, shared_cache, {**TINY, "wavelet": "bior9.9"}, experiment="bad")
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("wavesweep: error:")]
    assert lines == [lines[0]] and "unknown wavelet 'bior9.9'; valid: " in lines[0]
    runs = _runs(MlflowClient(), "bad")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "unknown wavelet 'bior9.9'" in runs[0].data.tags["error"]


def test_cli_usage_error_is_one_line_exit_2(workdir, shared_cache):
    env = subprocess_env(workdir, shared_cache)
    proc = subprocess.run([sys.executable, "-m", "wavesweep", "trial", "--percentile", "150"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("wavesweep: error: percentile")
    assert "Traceback" not in proc.stderr


def test_register_download_and_load_in_fresh_process(workdir, shared_cache):
    cfg = TrialConfig.from_mapping(TINY)
    result, run_id = run_tracked_trial(cfg)
    env = subprocess_env(workdir, shared_cache)
    reg = subprocess.run([sys.executable, "-m", "wavesweep", "register", run_id, "--name", "digits-cnn"], cwd=workdir,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert reg.returncode == 0, reg.stderr[-3000:]
    dl = subprocess.run([sys.executable, "-m", "wavesweep", "download", "models:/digits-cnn@champion", "--dst", "dl"],
                        cwd=workdir, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert dl.returncode == 0, dl.stderr[-3000:]
    files = {p.name for p in (workdir / "dl").rglob("*")}
    assert {"MLmodel", "dwt.wsz"} <= files
    script = textwrap.dedent(
        f"""
        import sys, json, mlflow
        model = mlflow.pyfunc.load_model("models:/digits-cnn@champion").get_raw_model()
        assert "wavesweep" not in sys.modules  # inference needs no wavesweep import
        from wavesweep import evaluate, trial
        from wavesweep.config import TrialConfig
        _, eval_set = trial.load_eval_set(TrialConfig.from_mapping({TINY!r}))
        print(json.dumps(evaluate.evaluate(model, eval_set, device="cpu").top1))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(result.outcomes["dwt"].eval.top1, abs=1e-9)
    mv = MlflowClient().get_model_version_by_alias("digits-cnn", "champion")
    assert mv.tags["wavelet"] == "bior1.3" and mv.tags["layout"] == "filter" and mv.run_id == run_id
    assert float(mv.tags["top1"]) == pytest.approx(result.outcomes["dwt"].eval.top1)


def test_same_config_and_seed_give_same_metrics(workdir):
    cfg = TrialConfig.from_mapping({**TINY, "timing_batches": "0"})
    a, _ = run_tracked_trial(cfg)
    b, _ = run_tracked_trial(cfg)
    for m in ("dwt", "magnitude", "random"):
        assert a.outcomes[m].eval.metrics() == b.outcomes[m].eval.metrics()
        assert a.outcomes[m].stats.totals() == b.outcomes[m].stats.totals()
        assert np.array_equal(a.outcomes[m].eval.preds, b.outcomes[m].eval.preds)


def test_the_device_an_auto_trial_ran_on_is_recorded(workdir, tmp_path):
    """``device=auto`` is what the params held: whether the trial ran on a GPU (where a trained base
    model has another recipe: bf16 autocast, channels-last) or on the CPU, and so whose timings
    its infer_* metrics are, was in no param, tag or config.yaml. ``resolved_device`` says it, on
    the trial run, its method runs and in config.yaml (oracle: evaluate.resolve_device)."""
    import yaml

    from wavesweep import evaluate

    cfg = TrialConfig.from_mapping({**TINY, "timing_batches": "0", "recovery": "none"})
    assert cfg.device == "auto"
    _, run_id = run_tracked_trial(cfg)
    client = MlflowClient()
    want = str(evaluate.resolve_device("auto"))
    runs = [client.get_run(run_id), *client.search_runs([client.get_run(run_id).info.experiment_id],
                                                        f"tags.mlflow.parentRunId = '{run_id}'")]  # fmt: skip
    assert len(runs) == 4 and all(r.data.params["resolved_device"] == want for r in runs)
    assert all(r.data.params["device"] == "auto" for r in runs)
    saved = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert saved["base"]["resolved_device"] == want


def test_validation_numbers_are_recomputable_from_the_logged_predictions(workdir, tmp_path):
    """A study selects on the validation part (val_top1, val_gain_top1_vs_magnitude: its objective
    and "best"); predictions.csv holds the test part only, so those numbers were not recomputable
    from the run. predictions_val.csv holds the validation part's, in the split's order."""
    from wavesweep import evalsplit

    cfg = TrialConfig.from_mapping({**TINY, "timing_batches": "0", "val_fraction": "0.5", "recovery": "none"})
    _, run_id = run_tracked_trial(cfg)
    client = MlflowClient()
    pm = client.get_run(run_id).data.metrics
    preds = pd.read_csv(client.download_artifacts(run_id, "predictions_val.csv", str(tmp_path)))
    val, test = evalsplit.split_eval_set(trial.load_eval_set(cfg)[1], cfg.val_fraction, seed=cfg.seed)
    assert len(preds) == pm["n_val"] == len(val) and pm["n_eval"] == len(test)
    assert list(preds["target"]) == [int(val[i][1]) for i in range(len(val))]
    acc = {c: float((preds[c] == preds["target"]).mean()) for c in ("base", "dwt", "magnitude", "random")}
    assert acc["base"] == pytest.approx(pm["base_val_top1"]) and acc["dwt"] == pytest.approx(pm["val_top1"])
    for b in ("magnitude", "random"):
        assert acc[b] == pytest.approx(pm[f"{b}_val_top1"])
        assert acc["dwt"] - acc[b] == pytest.approx(pm[f"val_gain_top1_vs_{b}"])


def test_pre_recovery_numbers_are_recomputable_from_the_logged_predictions(workdir, tmp_path):
    """The 'pre top1' column (prerec_* metrics: each pruned model before its recovery) is
    recomputable from predictions_prerec.csv, in predictions.csv's example order; a trial without
    recovery logs no such file."""
    cfg = TrialConfig.from_mapping({**TINY, "timing_batches": "0", "recovery": "bn", "recovery_batches": "2"})
    _, run_id = run_tracked_trial(cfg)
    client = MlflowClient()
    metrics = {r.data.tags["method"]: r.data.metrics for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}  # fmt: skip
    pre = pd.read_csv(client.download_artifacts(run_id, "predictions_prerec.csv", str(tmp_path / "a")))
    post = pd.read_csv(client.download_artifacts(run_id, "predictions.csv", str(tmp_path / "b")))
    assert list(pre["target"]) == list(post["target"])
    for m in ("dwt", "magnitude", "random"):
        assert float((pre[m] == pre["target"]).mean()) == pytest.approx(metrics[m]["prerec_top1"])
        assert float((post[m] == post["target"]).mean()) == pytest.approx(metrics[m]["top1"])
    assert any(pre[m].ne(post[m]).any() for m in ("dwt", "magnitude", "random"))  # recovery changed something
    _, run_none = run_tracked_trial(TrialConfig.from_mapping({**TINY, "timing_batches": "0", "recovery": "none"}))
    assert "predictions_prerec.csv" not in [f.path for f in client.list_artifacts(run_none)]


def test_failure_marks_runs_failed_and_keeps_error(workdir, monkeypatch):
    from wavesweep import tracked_trial

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tracked_trial, "run_trial", boom)
    with pytest.raises(RuntimeError):
        run_tracked_trial(TrialConfig.from_mapping(TINY))
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("wavesweep").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["error"] == "RuntimeError: disk on fire"
    assert not MlflowClient().list_artifacts(runs[0].info.run_id)  # no half-written checkpoint


def test_two_trials_at_once_on_a_fresh_directory(workdir, shared_cache):
    env = subprocess_env(workdir, shared_cache, concurrent=True, fresh_store=True)
    args = [sys.executable, "-m", "wavesweep", "trial", "-q"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    procs = [subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("wavesweep").experiment_id])
    assert sum(r.data.tags.get("method") == "trial" for r in runs) == 2
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 8


def test_recorded_metric_names_are_the_schema(workdir):
    """Every name TrialResult.metrics() computes is in wavesweep.schema, and every schema name is computed."""
    from wavesweep import schema

    for rec in ("none", "bn", "finetune"):
        cfg = TrialConfig.from_mapping({**TINY, "recovery": rec, "recovery_batches": 2, "finetune_steps": 2})
        metrics = trial.run_trial(cfg).metrics()
        for method in ("dwt", "magnitude", "random"):
            assert sorted(metrics[method]) == sorted(schema.method_names(rec, False)), (rec, method)
        assert {k for k in metrics["parent"] if not k.startswith("seconds_")} == set(schema.headline_names(rec, False)), rec
    assert set(schema.method_names("finetune")) == set(schema.method_names())


def test_recovery_none_reproduces_the_one_shot_protocol(workdir):
    """recovery=none is today's protocol: every number equals a direct one-shot computation
    (prune three ways, evaluate, no recovery) on the same base model and examples."""
    from wavesweep import pruning

    cfg = TrialConfig.from_mapping({**TINY, "recovery": "none", "timing_batches": "0"})
    r = trial.run_trial(cfg)
    assert all(o.prerec_eval is None and o.recovery.recovery == "none" for o in r.outcomes.values())
    _, eval_set = trial.load_eval_set(cfg)
    dwt = pruning.prune_dwt(r.base.model, wavelet=cfg.wavelet, level=cfg.level, percentile=cfg.percentile,
                            layout=cfg.layout, mode=cfg.mode, targets=cfg.target_kinds)  # fmt: skip
    direct = {"dwt": dwt, **pruning.prune_matched(r.base.model, dwt, seed=cfg.seed, targets=cfg.target_kinds)}
    for m, res in direct.items():
        ev = evaluate.evaluate(res.model, eval_set, batch_size=cfg.batch_size, device="cpu")
        assert ev.metrics() == r.outcomes[m].eval.metrics(), m  # exactly, not approximately
        assert np.array_equal(ev.preds, r.outcomes[m].eval.preds)
        assert accounting.model_stats(r.base.model, res).totals() == r.outcomes[m].stats.totals()
    metrics = r.metrics()
    assert not any(k.startswith("prerec_") for k in metrics["dwt"])


def test_finetune_trial_checkpoint_is_the_finetuned_model(workdir, tmp_path):
    """recovery=finetune: the logged checkpoint's size is the logged stored bytes plus its header,
    the model rebuilt from it equals the fine-tuned model, and the budget did not move."""
    cfg = TrialConfig.from_mapping({**TINY, "recovery": "finetune", "recovery_batches": "3", "finetune_steps": "8",
                                    "finetune_lr": "0.003", "timing_batches": "0", "save_baselines": "true"})  # fmt: skip
    result, run_id = run_tracked_trial(cfg, experiment="e2e")
    client = MlflowClient()
    parent = client.get_run(run_id)
    pm = parent.data.metrics
    for m in ("dwt", "magnitude", "random"):
        out = result.outcomes[m]
        assert out.recovery.finetune_steps == 8 and out.recovery.bn_batches == 3
        assert out.prerec_eval is not None
        key = "" if m == "dwt" else f"{m}_"
        assert pm[f"{key}prerec_top1"] == out.prerec_eval.top1 and pm[f"{key}top1"] == out.eval.top1
        ckpt = Path(client.download_artifacts(run_id, f"checkpoints/{m}.wsz", str(tmp_path / m)))
        assert ckpt.stat().st_size - checkpoint.read_header(ckpt)["header_bytes"] == pm[f"{key}stored_bytes"]
        rebuilt, _ = checkpoint.load_compressed(ckpt, models.build_model("cnn", **result.base.build_kwargs))
        ref = out.prune.model.state_dict()
        for k, v in rebuilt.state_dict().items():
            if m == "dwt":  # PyWavelets' inverse of the stored coefficients vs the torch one used in training
                torch_close = np.allclose(v.numpy(), ref[k].numpy(), rtol=1e-4, atol=1e-5)
                assert torch_close, k
            else:  # magnitude/random store the kept weights bit for bit
                assert np.array_equal(v.numpy(), ref[k].numpy()), k
    # the budget is what pruning set: fine-tuning moved no zero
    assert pm["magnitude_weight_sparsity_target"] == pytest.approx(pm["coeff_sparsity"], abs=2e-3)


def test_code_version_names_the_source_that_ran_with_git_or_without(tmp_path):
    """``code_version`` holds a digest of the package's source files: a copy without ``.git`` (which
    had the bare version) and an edit not committed (which had the commit alone) read as other code,
    so a replicate recorded by other code is not reused as this code's."""
    import hashlib
    import re
    import shutil

    from wavesweep import tracking

    def digest(package: Path) -> str:  # sha256 over (relative path, bytes) of every .py file, sorted by path
        h = hashlib.sha256()
        for rel in sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")):
            if not rel.startswith(".") and "/." not in rel:  # an editor's lock file is no source
                h.update(rel.encode() + b"\0" + (package / rel).read_bytes() + b"\0")
        return h.hexdigest()[:12]

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "wavesweep", copy / "wavesweep", ignore=shutil.ignore_patterns("__pycache__"))
    # Emacs's lock file for a module being edited: a dangling link named .#NAME.py (reading it failed every trial)
    (copy / "wavesweep" / ".#stats.py").symlink_to("user@host.12345:1700000000")

    def version_of_copy() -> str:
        env = {**subprocess_env(tmp_path, tmp_path / "cache", fresh_store=True), "PYTHONPATH": str(copy)}
        out = subprocess.run([sys.executable, "-c", "from wavesweep import tracking; print(tracking.code_version())"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first = version_of_copy()
    assert first == f"0.1.0+src.{digest(copy / 'wavesweep')}"  # no git here: the version and the digest
    with open(copy / "wavesweep" / "stats.py", "a") as fh:
        fh.write("# an edit\n")
    second = version_of_copy()
    assert second != first and second == f"0.1.0+src.{digest(copy / 'wavesweep')}"

    # the source as the process imported it: an edit saved after the import is not what runs
    env = {**subprocess_env(tmp_path, tmp_path / "cache", fresh_store=True), "PYTHONPATH": str(copy)}
    script = ("import pathlib, wavesweep; from wavesweep import tracking; "
              "f = pathlib.Path(wavesweep.__file__).parent / 'stats.py'; f.write_text(f.read_text() + '# later\\n'); "
              "print(tracking.code_version())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == second, out.stderr
    assert version_of_copy() != second  # the next process imports the edit

    here = tracking.code_version()  # this checkout: its commit too, where it is one
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    commit = f"{sha.stdout.strip()}." if sha.returncode == 0 else ""
    assert re.fullmatch(rf"0\.1\.0\+{re.escape(commit)}src\.{digest(ROOT / 'wavesweep')}", here), here
