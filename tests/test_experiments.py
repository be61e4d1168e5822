"""Every entry point records into the same MLflow experiment, ``wavesweep``: ``wavesweep trial``,
``wavesweep study``, and the README's ``mlflow run`` commands for both entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import subprocess_env
from wavesweep import train

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
study: exp-check
base: {model: cnn, dataset: digits, eval_limit: 60, seed: 0, weights: WEIGHTS}
fixed: {timing_batches: 0, recovery: none, layout: filter, level: 2}
space: {percentile: {low: 30, high: 70}}   # continuous: the second launch's trial is not a repeat of the first
objectives: {top1: maximize}
sampler: {name: random, seed: 0}
n_trials: 1
"""


def test_readme_mlflow_run_commands_name_the_experiment():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if re.search(r"mlflow run \.", l)]
    commands = [l for l in lines if re.search(r"mlflow run \. [-\w]", l)]
    assert len(commands) >= 3
    for line in commands:
        assert "--experiment-name wavesweep" in line, line


def _ok(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_every_entry_point_lands_in_wavesweep(workdir, shared_cache):
    base = train.get_base_model("cnn", "digits", seed=0, cache_root=shared_cache, progress=False,
                                train_config=train.TrainConfig(epochs=1, batch_size=64, lr=1e-2))  # fmt: skip
    env = subprocess_env(workdir, shared_cache)
    (workdir / "spec.yaml").write_text(SPEC.replace("WEIGHTS", str(base.path)))
    trial_p = {"model": "cnn", "weights": str(base.path), "eval_limit": "60", "timing_batches": "0", "recovery": "none"}
    ws = [sys.executable, "-m", "wavesweep"]
    mlflow_run = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "wavesweep"]

    _ok([*ws, "trial", "-q", *(x for k, v in trial_p.items() for x in (f"--{k.replace('_', '-')}", v))], workdir, env)
    _ok([*ws, "study", "spec.yaml", "-q"], workdir, env)
    _ok([*mlflow_run, *(x for k, v in trial_p.items() for x in ("-P", f"{k}={v}"))], workdir, env)
    _ok([*mlflow_run, "-e", "study", "-P", "spec=" + str(workdir / "spec.yaml"), "-P", "n_trials=2",
         "-P", f"storage=sqlite:///{workdir / 'optuna.db'}", "-P", f"report_dir={workdir / 'rep'}"], workdir, env)  # fmt: skip

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(exps), max_results=1000)
    where = {(r.data.tags.get("wavesweep.kind"), r.data.tags.get("mlflow.source.type")): exps[r.info.experiment_id] for r in runs}
    assert set(where.values()) == {"wavesweep"}, where
    kinds = [r.data.tags.get("wavesweep.kind") for r in runs]
    # two trials on their own (wavesweep trial, mlflow run), two study trials, one study run
    # (the `-e study` launch resumes the study made by `wavesweep study`: its run is tagged study-launch)
    assert kinds.count("trial") == 4 and kinds.count("study") == 1 and kinds.count("study-launch") == 1
    assert [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main"]

    # MLFLOW_EXPERIMENT_ID, as MLflow's own tools set it, is honoured too
    other = client.create_experiment("other")
    _ok([*ws, "trial", "-q", *(x for k, v in trial_p.items() for x in (f"--{k.replace('_', '-')}", v))], workdir,
        {**env, "MLFLOW_EXPERIMENT_ID": other})  # fmt: skip
    assert len(client.search_runs([other], filter_string="tags.`wavesweep.kind` = 'trial'")) == 1


def test_an_experiment_made_elsewhere_gets_the_model_training_kind_once(tmp_path, monkeypatch):
    """`mlflow run --experiment-name wavesweep` creates the experiment itself, without the kind tag
    wavesweep gives the experiments it creates (MLflow 3's UI then does not open it in its
    model-training view). Joining it tags it; a kind already set is kept."""
    from wavesweep.tracking import EXPERIMENT_KIND_TAG, init_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    client = MlflowClient(uri)
    made = client.create_experiment("wavesweep")  # as `mlflow run` makes it
    genai = client.create_experiment("chat", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    run = client.create_run(made).info.run_id
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(made).tags

    assert init_tracking(run_id=run)[1] == made
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert init_tracking("chat")[1] == genai
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    fresh = init_tracking("new")[1]
    assert client.get_experiment(fresh).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
