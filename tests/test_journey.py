"""A newcomer's journey, as separate processes in fresh directories: trial -> small study ->
register the best -> list and download it elsewhere -> load with plain MLflow -> evaluate ->
the recorded accuracy; and the compressed checkpoint shipped with it matches the stored bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import subprocess_env
from wavesweep import checkpoint

pytestmark = pytest.mark.slow

SPEC = """
study: journey
base: {model: cnn, dataset: digits, eval_limit: 150, seed: 0}
fixed: {timing_batches: 0}
space:
  wavelet: [bior2.2, rbio1.3, db2]
  level: {low: 1, high: 5}
  percentile: {low: 30, high: 90}
  layout: [filter, matrix]
objectives:
  top1: maximize
sampler: {name: random, seed: 1}
n_trials: 3
"""


def _run(args, cwd, env, timeout=900):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_trial_study_register_download_evaluate(tmp_path, shared_cache, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    env = subprocess_env(project, shared_cache, fresh_store=True)
    ws = [sys.executable, "-m", "wavesweep"]

    out = _run([*ws, "trial", "-q", "--model", "cnn", "--eval-limit", "150", "--timing-batches", "0"], project, env)
    assert out.startswith("trial run ")
    (project / "journey.yaml").write_text(SPEC)
    out = _run([*ws, "study", "journey.yaml", "-q", "--register-best", "journey-best"], project, env)
    assert "journey" in out

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("journey-best", "champion")
    source = client.get_run(mv.run_id)
    # the champion is the study's best trial: highest dwt top-1 on the validation part among its
    # finished trials (a study selects on validation and reports the disjoint test part)
    trials = [r for r in client.search_runs([source.info.experiment_id], filter_string="tags.method = 'trial'")
              if r.data.tags.get("optuna.study") == "journey" and r.info.status == "FINISHED"]  # fmt: skip
    assert len(trials) == 3
    assert float(source.data.params["val_fraction"]) == 0.5
    assert source.data.metrics["val_top1"] == max(r.data.metrics["val_top1"] for r in trials)

    # a fresh process in a fresh directory: list, download, load without wavesweep, evaluate
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listing = _run([*ws, "models"], elsewhere, env)
    assert "journey-best v" in listing and "aliases=champion" in listing
    _run([*ws, "download", "models:/journey-best@champion", "--dst", "dl"], elsewhere, env)
    ckpt = next((elsewhere / "dl").rglob("dwt.wsz"))
    assert ckpt.stat().st_size - checkpoint.read_header(ckpt)["header_bytes"] == source.data.metrics["stored_bytes"]
    cfg = {k: source.data.params[k] for k in ("model", "dataset", "eval_limit", "seed", "val_fraction")}
    script = textwrap.dedent(
        f"""
        import json, sys, mlflow
        model = mlflow.pyfunc.load_model("models:/journey-best@champion").get_raw_model()
        assert "wavesweep" not in sys.modules
        from wavesweep import evalsplit, evaluate, trial
        from wavesweep.config import TrialConfig
        cfg = TrialConfig.from_mapping({cfg!r})
        _, eval_all = trial.load_eval_set(cfg)
        parts = evalsplit.split_eval_set(eval_all, cfg.val_fraction, seed=cfg.seed)
        print(json.dumps([evaluate.evaluate(model, part, device="cpu").top1 for part in parts]))
        """
    )
    val_top1, top1 = json.loads(_run([sys.executable, "-c", script], elsewhere, env).strip().splitlines()[-1])
    assert val_top1 == pytest.approx(source.data.metrics["val_top1"], abs=1e-9)
    assert top1 == pytest.approx(source.data.metrics["top1"], abs=1e-9)
    assert float(mv.tags["top1"]) == pytest.approx(top1, abs=1e-9)
