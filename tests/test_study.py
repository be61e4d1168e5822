"""Studies end to end on a tiny CNN: Optuna storage and MLflow (the oracle) must tell the same story.

Every test runs in its own working directory (``workdir``: own Optuna and MLflow SQLite files,
default storage ``sqlite:///optuna.db`` in it) with a 1-epoch CNN base model trained once per
session, so trials take a few seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import study_trial_runs
from wavesweep import cli, study, train
from wavesweep.config import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
STATE_IN_MLFLOW = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": ("FAILED", "KILLED")}


@pytest.fixture(scope="session")
def tiny_weights(shared_cache: Path) -> str:
    """A CNN trained for one epoch on digits (about 90 % top-1): a real model, cheap to make."""
    base = train.get_base_model(
        "cnn", "digits", seed=0, cache_root=shared_cache, progress=False,
        train_config=train.TrainConfig(epochs=1, batch_size=64, lr=1e-2),
    )  # fmt: skip
    return str(base.path)


def write_spec(path: Path, weights: str, **overrides) -> Path:
    spec = {
        "study": "tiny",
        "base": {"model": "cnn", "dataset": "digits", "eval_limit": 40, "seed": 0, "weights": weights},
        "fixed": {"timing_batches": 0, "layout": "filter", "level": 2},
        "space": {"percentile": [20, 40, 60, 80], "wavelet": ["haar", "db2"]},
        "objectives": {"top1": "maximize"},
        "sampler": {"name": "random", "seed": 3},
        "n_trials": 3,
    }
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials_by_number(name: str = "tiny") -> dict[int, optuna.trial.FrozenTrial]:
    s = optuna.load_study(study_name=name, storage=study.DEFAULT_STORAGE)
    return {t.number: t for t in s.get_trials()}


def mlflow_trial_runs(name: str = "tiny") -> dict[int, object]:
    runs = study_trial_runs(MlflowClient(), name)
    numbers = [int(r.data.tags["optuna.trial_number"]) for r in runs]
    assert len(numbers) == len(set(numbers)), f"two MLflow runs for one Optuna trial: {numbers}"
    return dict(zip(numbers, runs))


def assert_agree(name: str = "tiny") -> tuple[dict, dict]:
    """Every Optuna trial that started a trial run has exactly one MLflow run, with the matching state and value
    (a trial that repeated an earlier configuration has a run of its own pointing to it: ``assert_repeats``)."""
    trials, runs = trials_by_number(name), mlflow_trial_runs(name)
    assert_repeats(trials, name)
    with_runs = {n for n, t in trials.items() if "mlflow_run_id" in t.user_attrs and "repeat_of" not in t.user_attrs}
    assert set(runs) == with_runs
    parent_ids = set()
    for n, run in runs.items():
        t = trials[n]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.study"] == name
        assert run.data.tags["optuna.state"] == t.state.name
        expected = STATE_IN_MLFLOW[t.state.name]
        assert run.info.status in (expected if isinstance(expected, tuple) else (expected,)), (n, t.state, run.info.status)
        if t.state == TrialState.COMPLETE:
            loaded = optuna.load_study(study_name=name, storage=study.DEFAULT_STORAGE)
            names = loaded.metric_names or [m for m, _d in study.study_objectives(loaded)]  # val_top1 with a validation part
            for metric, value in zip(names, t.values, strict=True):
                assert run.data.metrics[metric] == pytest.approx(value, abs=1e-12)
            # headline numbers as scalar user attributes (readable in optuna-dashboard), equal to MLflow's
            for key in ("top1", "magnitude_top1", "random_top1", "gain_top1_vs_magnitude", "dwt_vs_magnitude_mcnemar_p",
                        "compression_ratio", "pruned_fraction", "n_eval"):
                assert t.user_attrs[key] == pytest.approx(run.data.metrics[key], abs=1e-12), key
            assert not any(isinstance(v, (dict, list)) for v in t.user_attrs.values()), "no nested user attributes"
            assert 0 <= t.user_attrs["level_effective_max"] <= int(run.data.params["level"]) and t.user_attrs["num_classes"] == 10
        if t.state == TrialState.PRUNED:
            assert run.data.tags.get("early_stopped") == "true"
        parent_ids.add(run.data.tags["mlflow.parentRunId"])
    assert len(parent_ids) <= 1, "all trials nest under one study run"
    return trials, runs


def assert_repeats(trials: dict[int, optuna.trial.FrozenTrial], name: str = "tiny") -> dict[int, int]:
    """A COMPLETE trial whose params equal an earlier COMPLETE trial's was not run: it names that
    trial (``repeat_of``, the lowest-numbered one that ran), has its values, and its MLflow run
    (kind ``repeat``, below the study run) points to that trial's run and logs no numbers.
    Returns {repeat: original}."""
    client = MlflowClient()
    ran = {}
    for n in sorted(trials):
        t = trials[n]
        if t.state == TrialState.COMPLETE and "repeat_of" not in t.user_attrs:
            ran.setdefault(tuple(sorted(t.params.items())), n)
    out = {}
    for n, t in trials.items():
        if "repeat_of" not in t.user_attrs or t.state == TrialState.FAIL:  # a repeat stopped while recorded: retried
            continue
        assert t.state == TrialState.COMPLETE, (n, t.state)
        orig = trials[t.user_attrs["repeat_of"]]
        assert orig.state == TrialState.COMPLETE and "repeat_of" not in orig.user_attrs
        assert orig.number == ran[tuple(sorted(t.params.items()))] and orig.params == t.params
        assert t.values == orig.values and t.intermediate_values == orig.intermediate_values
        assert t.user_attrs["repeat_of_mlflow_run_id"] == orig.user_attrs["mlflow_run_id"]
        assert t.user_attrs["examples_evaluated"] == 0 and "top1" not in t.user_attrs  # no numbers of its own
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["wavesweep.kind"] == "repeat" and tags["method"] == "repeat"
        assert (tags["optuna.study"], tags["optuna.trial_number"], tags["optuna.state"]) == (name, str(n), "COMPLETE")
        assert tags["repeat_of_trial"] == str(orig.number) and tags["repeat_of_run_id"] == orig.user_attrs["mlflow_run_id"]
        assert tags["mlflow.parentRunId"] == client.get_run(orig.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
        assert not run.data.metrics and not run.data.params, "a repeat logs no numbers of its own"
        out[n] = orig.number
    return out


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


def assert_short_scalars(attrs: dict) -> None:
    """Readable as table cells (optuna-dashboard, `optuna studies`): no text blocks, lists or dicts."""
    for k, v in attrs.items():
        assert v is None or isinstance(v, (str, int, float, bool)), (k, v)
        assert not isinstance(v, str) or ("\n" not in v and len(v) <= 200), (k, v)


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path):
    spec = study.load_spec(path)
    assert spec.space and spec.objectives and spec.total_trials
    assert {p.name for p in spec.space} <= set(TrialConfig.__dataclass_fields__)
    if spec.name == "seed-replica":
        assert spec.sampler == "grid" and spec.total_trials == 8
        assert spec.grid_space() == {"percentile": [10, 23.6, 38.2, 50, 61.8, 78.6, 90, 100]}
        assert (spec.fixed["wavelet"], spec.fixed["level"], spec.fixed["layout"]) == ("bior4.4", 5, "kernel")
    if spec.name.startswith("imagenet-resnet18"):  # the one-shot protocol and the same under recovery
        assert spec.fixed["recovery"] == ("bn" if spec.name.endswith("-recovery") else "none")
    if spec.name.startswith("pareto"):
        assert len(spec.objectives) == 2 and spec.pruner == "none"


BAD_SPECS = [
    # (yaml text, substrings the one-line error must contain)
    ("study: x\nsampeler: tpe\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n", ["sampeler", ":2", "sampler"]),
    ("study: x\nspace:\n  percentile: [10]\n  wavelett: [haar]\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space.wavelett", ":4"]),
    ("study: x\nspace:\n  level:\n    low: 1\n    high: 9\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space.level.high", ":5", "1..5"]),
    ("study: x\nspace:\n  percentile: [10, 150]\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space.percentile", ":3", "150"]),
    ("study: x\nfixed:\n  wavelet: nope\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n", ["fixed.wavelet", ":3", "nope"]),
    ("study: x\nspace: {percentile: [10]}\nobjectives:\n  top1: maximize\n  compression_ratio: maximize\npruner: median\nn_trials: 1\n",
     ["pruner", ":6", "multi-objective"]),
    ("study: x\nspace: {percentile: [10]}\nobjectives:\n  top_1: maximize\nn_trials: 1\n", ["objectives.top_1", ":4", "top1"]),
    # Wilcoxon pairs chunk k of every trial as the same examples: a searched seed gives each trial others
    ("study: x\nspace:\n  percentile: [10]\n  seed: [0, 1]\nobjectives: {top1: maximize}\npruner: wilcoxon\nn_trials: 1\n",
     ["pruner", ":6", "wilcoxon", "searched seed changes which examples", "pruner: median"]),
    ("study: x\nspace:\n  percentile: {low: 10, high: 90, stp: 5}\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space.percentile.stp", ":3"]),
    ("study: x\nspace: {percentile: [10, 20]}\nobjectives: {top1: maximize}\nsampler: grid\nn_trials: 5\n", ["n_trials", ":5", "grid"]),
    ("study: x\nspace: {percentile: [10]}\nspace: {level: [1]}\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space", ":3", "duplicate"]),
    ("study: x\nspace: {percentile: [10\nobjectives: {top1: maximize}\n", ["invalid YAML", "line"]),
    ("study: x\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nsampler: {name: tpe, n_startup: 3}\nn_trials: 1\n",
     ["sampler.n_startup", ":4", "n_startup_trials"]),
    ("study: x\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: -2\n", ["n_trials", ":4"]),
    ("study: x\nbase: {model: cnn, wavelet: haar}\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["base.wavelet", ":2", "fixed"]),
    # Optuna refuses these only when a trial samples them (every trial failed "?"), or narrows the range quietly
    ("study: x\nspace:\n  level: {low: 1, high: 5, step: 2, log: true}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.level.step", ":3", "a log range takes no step other than 1"]),
    ("study: x\nspace:\n  percentile:\n    low: 10\n    high: 95\n    step: 20\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.percentile.high", ":5", "step=20 does not divide [10, 95]", "make high 90"]),
    ("study: x\nspace:\n  level: {low: 1, high: 5, step: 3}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.level.high", ":3", "make high 4"]),
    ("study: x\nspace: {}\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space", ":2", "at least one searched parameter"]),
    # a learning rate no optimizer step can take: refused before the study starts, not a crash in a trial
    ("study: x\nfixed: {recovery: finetune}\nspace:\n  finetune_lr: {low: 1.0e-4, high: 1.0e+300, log: true}\n"
     "objectives: {top1: maximize}\nn_trials: 1\n", ["space.finetune_lr.high", ":4", "finetune_lr=1e+300 must be a number in (0, 1000]"]),
    ("study: x\nfixed: {recovery: finetune, finetune_lr: .nan}\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["fixed.finetune_lr", ":2", "finetune_lr=nan must be a number in (0, 1000]"]),
    ("study: x\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space", "at least one searched parameter"]),
    ("study: x\nspace:\n  percentile: [10, 20, 10.0]\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.percentile", ":3", "choice 10.0 appears twice"]),
    ("study: x\nspace:\n  wavelet: [haar, db2, haar]\nobjectives: {top1: maximize}\nn_trials: 1\n", ["space.wavelet", "'haar' appears twice"]),
    ("study: x\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nmax_failures: true\nn_trials: 1\n", ["max_failures", ":4"]),
    # Optuna's TPE takes n_ei_candidates 0 and fails only when its model takes over, after ten trials
    ("study: x\nspace: {percentile: {low: 10, high: 90}}\nobjectives: {top1: maximize}\nsampler:\n  name: tpe\n"
     "  n_ei_candidates: 0\nn_trials: 1\n", ["sampler", ":4", "TPESampler fails at trial 11 of a dry run"]),
    ("study: x\nspace: {percentile: {low: 10, high: 90}}\nobjectives: {top1: maximize, compression_ratio: maximize}\n"
     "sampler: {name: tpe, n_ei_candidates: 0, n_startup_trials: 2}\nn_trials: 1\n", ["sampler", ":4", "fails at trial 3 of a dry run"]),
    # a model without layers of the targets' kinds: every trial would fail, up to max_failures
    ("study: x\nbase: {model: mlp}\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["fixed.targets", ":2", "model 'mlp' has no conv layers to prune (targets='conv', the default)", "targets: linear"]),
    ("study: x\nspace: {percentile: [10], model: [cnn, mlp]}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.model", ":2", "model 'mlp' has no conv layers"]),
    ("study: x\nbase: {model: mlp}\nspace:\n  targets: [linear, conv]\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.targets", ":4", "model 'mlp' has no conv layers to prune (targets='conv')"]),
    # a layout that cannot take a target's weight: every trial that samples it fails
    ("study: x\nbase: {model: cnn}\nfixed: {targets: 'conv,linear'}\nspace:\n  layout: [kernel, filter]\n"
     "objectives: {top1: maximize}\nn_trials: 1\n",
     ["space.layout", ":5", "model 'cnn', targets='conv,linear': target layer 'fc': layout 'kernel' needs a 4-D conv weight"]),
    ("study: x\nbase: {model: mlp}\nfixed: {targets: linear, layout: kernel}\nspace: {percentile: [10]}\n"
     "objectives: {top1: maximize}\nn_trials: 1\n", ["fixed.layout", ":3", "layout 'kernel' needs a 4-D conv weight"]),
    # YAML's true is not the number 1 (float(True) is 1.0)
    ("study: x\nfixed: {percentile: true}\nspace: {level: [1]}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["fixed.percentile", ":2", "percentile=True is not a number"]),
    ("study: x\nspace: {percentile: [true, 50]}\nobjectives: {top1: maximize}\nn_trials: 1\n",
     ["space.percentile", ":2", "percentile=True is not a number"]),
    # an objective its trials never record: every trial ran in full, then failed on 'objective ... is None'
    ("study: x\nfixed: {val_fraction: 0}\nspace: {percentile: [10]}\nobjectives:\n  val_top1: maximize\nn_trials: 1\n",
     ["objectives.val_top1", ":5", "needs a validation part", "val_fraction=0"]),
    ("study: x\nfixed: {recovery: none, val_fraction: 0}\nspace: {percentile: [10]}\nobjectives:\n  prerec_top1: maximize\n"
     "n_trials: 1\n", ["objectives.prerec_top1", ":5", "not recorded by a trial with recovery='none'", "bn or finetune"]),
    ("study: x\nfixed: {val_fraction: 0}\nspace:\n  recovery: [finetune, bn]\nobjectives:\n  recovery_train_loss: minimize\nn_trials: 1\n",
     ["objectives.recovery_train_loss", ":6", "recovery='bn'", "recovery: finetune"]),
    ("study: x\nfixed: {val_fraction: 0}\nspace: {percentile: [10]}\nobjectives:\n  dwt_vs_magnitude_gap: maximize\n"
     "replicates: 2\nn_trials: 1\n", ["objectives.dwt_vs_magnitude_gap", ":5", "replicates=2", "gain_top1_vs_magnitude"]),
]


@pytest.mark.parametrize("over", [
    {"fixed": {"recovery": "bn", "val_fraction": 0}, "objectives": {"prerec_top1": "maximize"}},
    {"fixed": {"recovery": "finetune", "val_fraction": 0}, "objectives": {"recovery_train_loss": "minimize"}},
    # the last fine-tuning loss is on training batches: with a validation part (the default) it was refused
    # as 'measured on the test part only'
    {"fixed": {"recovery": "finetune"}, "objectives": {"recovery_train_loss": "minimize"}},
    {"fixed": {"val_fraction": 0}, "objectives": {"dwt_vs_magnitude_gap": "maximize"}},
    {"objectives": {"val_top1": "maximize", "magnitude_val_top1": "maximize"}, "replicates": 2},
])  # fmt: skip
def test_an_objective_its_trials_record_is_accepted(over):
    """The other side of the refusals above: what a trial with that recovery, validation part and
    replicates records (schema.headline_names, checked against a real trial's metrics elsewhere)."""
    d = {"space": {"percentile": [10, 20]}, "n_trials": 1, **over}
    spec = study.spec_from_mapping(d)
    assert [o.metric for o in spec.objectives] == list(over["objectives"])
    if "recovery_train_loss" in over["objectives"]:
        assert spec.selection_metrics == ["recovery_train_loss"]  # the same with or without a validation part


@pytest.mark.parametrize("text,needles", BAD_SPECS, ids=[f"bad{i}" for i in range(len(BAD_SPECS))])
def test_bad_spec_is_a_one_line_error_naming_key_and_line(workdir, capsys, text, needles):
    path = workdir / "bad.yaml"
    path.write_text(text)
    assert run_cli("study", str(path), "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("wavesweep: error: ")
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (workdir / "optuna.db").exists(), "nothing is created for an invalid spec"


def test_spec_targets_check_agrees_with_the_models_own_layers():
    """Which (model, targets) pairs a spec accepts equals which models have a layer of a target
    kind when built for real (the oracle: the module types of a CPU model)."""
    from torch import nn

    from wavesweep.models import MODELS, build_model

    kinds = {"conv": nn.Conv2d, "linear": nn.Linear}
    for model in MODELS.names():
        real = build_model(model, num_classes=10, in_channels=1, image_size=32 if model != "vit_b_16" else 224)
        for targets in ("conv", "linear", "conv,linear"):
            has = any(isinstance(m, tuple(kinds[k] for k in targets.split(","))) for m in real.modules())
            mapping = {"study": "x", "base": {"model": model}, "fixed": {"targets": targets},
                       "space": {"percentile": [10, 20]}, "objectives": {"top1": "maximize"}, "n_trials": 1}  # fmt: skip
            if has:
                study.spec_from_mapping(mapping)
            else:
                with pytest.raises(study.SpecError, match=f"model '{model}' has no"):
                    study.spec_from_mapping(mapping)


def test_sampler_dry_run_reaches_the_model_phase_and_leaves_no_trace(monkeypatch):
    """The dry run goes past the sampler's startup trials (where TPE's and NSGA-II's own models take
    over), on a throw-away study: a good spec passes, and Optuna's logging is as it was."""
    from wavesweep.study import storage

    base = {"study": "x", "space": {"percentile": {"low": 10, "high": 90, "step": 10}, "wavelet": ["haar", "db2"]},
            "objectives": {"top1": "maximize"}, "n_trials": 1}  # fmt: skip
    calls = []
    real = storage.make_sampler
    monkeypatch.setattr(storage, "make_sampler", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    for sampler, opts, trials in [("tpe", {}, 12), ("tpe", {"n_startup_trials": 3}, 5), ("random", {}, 2),
                                  ("nsga2", {"population_size": 4}, 9), ("gp", {}, 0), ("grid", {}, 0)]:  # fmt: skip
        calls.clear()
        verbosity = optuna.logging.get_verbosity()
        spec = study.spec_from_mapping({**base, "sampler": {"name": sampler, **opts}})
        assert storage.dry_run_trials(spec) == trials
        assert optuna.logging.get_verbosity() == verbosity
        if trials:
            (sampler_obj,) = calls
            assert type(sampler_obj) is storage.SAMPLERS[sampler]
        else:
            assert not calls


def test_missing_spec_file(workdir, capsys):
    assert run_cli("study", "nope.yaml") == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["spec", "--set"])
def test_a_wrong_data_root_stops_the_study_with_one_line_before_any_trial(workdir, capsys, how):
    """`wavesweep trial --data-root WRONG` stops with one line (exit 2); the same folder in a study
    (`--set data_root=...`, or the spec's) ran three trials that each failed on it, left a FAILED
    study run and three FAILED trial runs, and exited 1 after five lines. The study's dataset is
    read once before anything is created."""
    empty = workdir / "no-data"
    empty.mkdir()
    base = {"model": "cnn", "dataset": "mnist", "eval_limit": 40, "seed": 0}
    spec = write_spec(workdir / "tiny.yaml", "", base={**base, "data_root": str(empty)} if how == "spec" else base)
    extra = ["--set", f"data_root={empty}"] if how == "--set" else []
    assert run_cli("study", str(spec), "-q", *extra) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("wavesweep: error: mnist: files not found under") and str(empty) in err[0], err
    assert not (workdir / "optuna.db").exists()
    assert not (workdir / "mlflow.db").exists() or MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]) == []



def test_evaluation_examples_the_validation_part_cannot_split_stop_the_study_with_one_line(workdir, capsys):
    """An image folder whose val/ has a class of one image: a study (val_fraction 0.5 by default)
    ran three trials that each failed on the split, left a FAILED study run and three FAILED trial
    runs, and exited 1. The split is checked with the data, before anything is created (oracle:
    scikit-learn's stratified split refuses a class of one example)."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0)
    for split, counts in (("train", {"a": 2, "b": 2}), ("val", {"a": 3, "b": 1})):
        for c, n in counts.items():
            (workdir / "folder" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(workdir / "folder" / split / c / f"{i}.png")
    with pytest.raises(ValueError):
        train_test_split(np.arange(4), train_size=0.5, stratify=[0, 0, 0, 1], random_state=0)
    base = {"model": "cnn", "dataset": "imagefolder", "eval_limit": 0, "seed": 0, "data_root": str(workdir / "folder")}
    spec = write_spec(workdir / "tiny.yaml", "", base=base)
    assert run_cli("study", str(spec), "-q") == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err == ["wavesweep: error: val_fraction=0.5 cannot split 4 evaluation examples into stratified validation and "
                   "test parts: class 1 has 1 example(s); raise eval_limit or set val_fraction=0"], err
    assert not (workdir / "optuna.db").exists()
    assert not (workdir / "mlflow.db").exists() or MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_the_study_runs_seed_param_is_the_specs_sampler_seed_by_its_spec_name(workdir):
    """A small Fashion-MNIST study's run had the param sampler_seed=0 (the spec's sampler.seed)
    while its trials' user attribute sampler_seed was 405366682 (that seed mixed with the launch's
    salt), `--sampler-seed 0` means 'seed 0 as is', and under `mlflow run -e study` the same param
    is the -P sampler_seed value MLflow logs ('' by default). The spec's seed is the param
    `sampler.seed` now, its name in the spec and in `--set sampler.seed=N`."""
    spec = study.load_spec(write_spec(workdir / "tiny.yaml", "", sampler={"name": "random", "seed": 3}))
    params = spec.summary_params()
    assert params["sampler.seed"] == 3 and params["sampler"] == "random"
    assert "sampler_seed" not in params


def test_a_relaunch_whose_trials_run_the_same_values_is_the_same_study(workdir):
    """The study's identity is of the values its trials run with: ``percentile: 10.0`` for ``10``,
    an int range's ``step: 1`` given or not, a fixed value equal to the TrialConfig default
    (``scope: layer``) given or not, and ``10`` for ``10.0`` in a list, all resume the study (they
    were refused as "changed"); a value that does change what the trials run is still refused."""
    from wavesweep.study.storage import create_study

    space = {"percentile": {"low": 10, "high": 90, "step": 5}, "level": {"low": 1, "high": 3}, "wavelet": ["haar", "db2"]}
    path = write_spec(workdir / "tiny.yaml", "w.pt", space=space, fixed={"timing_batches": 0, "layout": "filter"})
    create_study(study.load_spec(path), study.DEFAULT_STORAGE)
    same = [
        {"space.percentile": {"low": 10.0, "high": 90.0, "step": 5.0}},
        {"space.level": {"low": 1, "high": 3, "step": 1}},
        {"fixed.scope": "layer", "fixed.keep_approx": "false"},
        {"eval_limit": 40.0},
    ]
    for overrides in same:
        create_study(study.load_spec(path, overrides=overrides), study.DEFAULT_STORAGE)
    for overrides, what in (({"space.percentile": {"low": 10, "high": 90, "step": 10}}, r"search space \(percentile: changed\)"),
                            ({"fixed.scope": "global"}, r'fixed parameters \(base, fixed, replicates\) \(scope: "layer" \(default\) -> "global"\)')):  # fmt: skip
        with pytest.raises(ValueError, match=f"ran its trials with other {what}; mixing them"):
            create_study(study.load_spec(path, overrides=overrides), study.DEFAULT_STORAGE)
    lists = write_spec(workdir / "lists.yaml", "w.pt", study="lists")
    create_study(study.load_spec(lists), study.DEFAULT_STORAGE)
    create_study(study.load_spec(lists, overrides={"space.percentile": [20.0, 40.0, 60.0, 80.0]}), study.DEFAULT_STORAGE)
    # a categorical's choices are suggested as written and compared by == on a resume: "true" is not
    # true to Optuna, which refused every new trial of such a relaunch ("dynamic value space")
    bools = write_spec(workdir / "bools.yaml", "w.pt", study="bools", space={"save_baselines": ["true", "false"], "percentile": [20, 40]})
    create_study(study.load_spec(bools), study.DEFAULT_STORAGE)
    with pytest.raises(ValueError, match=r"search space \(save_baselines: changed\); mixing them"):
        create_study(study.load_spec(bools, overrides={"space.save_baselines": [True, False]}), study.DEFAULT_STORAGE)


def test_a_study_recorded_with_the_spec_as_written_resumes_and_is_told_what_changed(workdir):
    """Studies recorded before the identity was of the values run hold digests of the spec as
    written: the same spec resumes them (and from then on they take the values run), a changed
    one is refused naming its part, compared with the recorded parts in their own form."""
    from wavesweep.study import storage

    path = write_spec(workdir / "tiny.yaml", "w.pt", fixed={"timing_batches": 0, "layout": "filter", "level": 2})
    spec = study.load_spec(path)
    s = storage.create_study(spec, study.DEFAULT_STORAGE)
    for attr, (_, digest, parts) in storage._identity(spec, as_written=True).items():  # as an older version recorded it
        s.set_user_attr(attr, digest)
        s.set_user_attr(storage._parts_attr(attr), storage.encode_parts(parts))
    s._storage.set_study_user_attr(s._study_id, "identity_form", None)
    s = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE)
    assert s.user_attrs["fixed_parts"].count("layout=") == 1 and s.user_attrs["identity_form"] is None
    with pytest.raises(ValueError, match=r"\(level: 2 -> 3\); mixing them"):
        storage.create_study(study.load_spec(path, overrides={"fixed.level": 3}), study.DEFAULT_STORAGE)
    resumed = storage.create_study(spec, study.DEFAULT_STORAGE)
    assert resumed.user_attrs["identity_form"] == "resolved"
    assert resumed.user_attrs["fixed_sha256"] == storage._identity(spec)["fixed_sha256"][1]
    assert "layout=" not in resumed.user_attrs["fixed_parts"]  # the default, left out of the values run
    no_layout = study.load_spec(write_spec(workdir / "no-layout.yaml", "w.pt", fixed={"timing_batches": 0, "level": 2}))
    storage.create_study(no_layout, study.DEFAULT_STORAGE)  # layout filter is the default: the same study now


def test_a_refused_relaunch_of_a_study_recorded_as_written_changes_none_of_its_attributes(workdir):
    """Its attributes were rewritten in the values-run form one by one until the first refused
    one: the fixed parts dropped their defaults while the study still said "as written", and the
    next refusal named parts that had not changed (dataset, layout) beside the one that had."""
    from wavesweep.study import storage

    path = write_spec(workdir / "tiny.yaml", "w.pt", fixed={"timing_batches": 0, "layout": "filter", "level": 2})
    spec = study.load_spec(path)
    s = storage.create_study(spec, study.DEFAULT_STORAGE)
    for attr, (_, digest, parts) in storage._identity(spec, as_written=True).items():
        s.set_user_attr(attr, digest)
        s.set_user_attr(storage._parts_attr(attr), storage.encode_parts(parts))
    s._storage.set_study_user_attr(s._study_id, "identity_form", None)
    before = dict(optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).user_attrs)
    with pytest.raises(ValueError, match=r"search space \(percentile: changed\)"):
        storage.create_study(study.load_spec(path, overrides={"space.percentile": [30, 50]}), study.DEFAULT_STORAGE)
    assert optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).user_attrs == before
    with pytest.raises(ValueError, match=r"fixed parameters \(base, fixed, replicates\) \(level: 2 -> 3\); mixing"):
        storage.create_study(study.load_spec(path, overrides={"fixed.level": 3}), study.DEFAULT_STORAGE)
    # parts rewritten by a launch stopped between two writes: the message reads them in their own form
    s.set_user_attr("fixed_parts", storage.encode_parts(storage._identity(spec)["fixed_sha256"][2]))
    with pytest.raises(ValueError, match=r"\(level: 2 -> 3 \(default\)\); mixing"):
        storage.create_study(study.load_spec(path, overrides={"fixed.level": 3}), study.DEFAULT_STORAGE)


def test_study_user_attrs_are_short_scalars_and_name_the_spec(workdir, caplog):
    """No spec text or lists in the study's user attributes; a changed spec on resume is noted.
    (No trial runs: the weights file is named, never read.)"""
    from wavesweep.study.storage import create_study

    path = write_spec(workdir / "tiny.yaml", "w.pt", objectives={"top1": "maximize", "compression_ratio": "maximize"})
    spec = study.load_spec(path)
    s = create_study(spec, study.DEFAULT_STORAGE)
    assert_short_scalars(s.user_attrs)
    assert s.user_attrs.keys() == {"objectives", "spec_sha256", "fixed_sha256", "space_sha256", "sampler_sha256",
                                   "fixed_parts", "space_parts", "sampler_parts", "identity_form"}
    assert s.user_attrs["sampler_parts"] == 'name="random"'  # what a changed spec is compared with
    assert s.user_attrs["objectives"] == "top1:maximize, compression_ratio:maximize"
    assert s.user_attrs["spec_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert s.metric_names == spec.selection_metrics  # optuna-dashboard's objective names: val_top1, ...
    assert study.study_objectives(s) == [("top1", "maximize"), ("compression_ratio", "maximize")]
    first = s.user_attrs["spec_sha256"]
    caplog.set_level("INFO", logger="wavesweep.study.storage")
    resumed = create_study(study.load_spec(path, overrides={"n_trials": 5}), study.DEFAULT_STORAGE)
    assert resumed.user_attrs["spec_sha256"] not in ("", first)
    # n_trials may change between launches (README): noted, not warned about
    (note,) = [r for r in caplog.records if "the spec differs from the last launch's" in r.getMessage()]
    assert note.levelname == "INFO" and "in what may change between launches" in note.getMessage()
    with pytest.raises(ValueError, match="created with objectives top1:maximize, compression_ratio:maximize"):
        create_study(study.load_spec(write_spec(workdir / "other.yaml", "w.pt")), study.DEFAULT_STORAGE)
    # what the trials compute and how they are proposed may not change under one study name (the
    # space changed on a resume ran old and new points side by side, counted towards one total)
    # (the message names what changed: a value, or a part recorded by its digest)
    for overrides, what in (({"space.percentile": [30, 50]}, r"search space \(percentile: changed\)"),
                            ({"eval_limit": 60}, r"fixed parameters \(base, fixed, replicates\) \(eval_limit: 40 -> 60\)"),
                            ({"sampler": "tpe"}, r'sampler or sampler options \(name: "random" -> "tpe"\)'),
                            ({"replicates": 2}, r"fixed parameters \(base, fixed, replicates\) \(replicates: 1 -> 2\)"),
                            ({"base.weights": "other.pt"}, r'fixed parameters \(base, fixed, replicates\) \(weights: "w.pt" -> "other.pt"\)'),
                            ({"fixed.level": 3, "fixed.mode": "zero"}, r'fixed parameters \(base, fixed, replicates\) \(level: 2 -> 3 \(default\); mode: "periodization" \(default\) -> "zero"\)')):  # fmt: skip
        with pytest.raises(ValueError, match=f"ran its trials with other {what}; mixing them"):
            create_study(study.load_spec(path, overrides=overrides), study.DEFAULT_STORAGE)
    no_mode = write_spec(workdir / "no-mode.yaml", "w.pt", fixed={"timing_batches": 0, "layout": "filter", "level": 2},
                         objectives={"top1": "maximize", "compression_ratio": "maximize"})
    zero_study = create_study(study.load_spec(path, overrides={"fixed.mode": "zero"}), study.DEFAULT_STORAGE.replace("optuna.db", "z.db"))
    assert zero_study.user_attrs["fixed_parts"].count("mode=") == 1
    with pytest.raises(ValueError, match=r'\(mode: "zero" -> "periodization" \(default\)\); mixing them'):
        create_study(study.load_spec(no_mode), study.DEFAULT_STORAGE.replace("optuna.db", "z.db"))
    create_study(study.load_spec(path, overrides={"n_trials": 9, "timeout": 60}), study.DEFAULT_STORAGE)  # these may


def test_objectives_of_studies_recorded_before(workdir):
    """Older studies kept objectives as a list of pairs; readers take both forms."""
    s = optuna.create_study(study_name="old", storage=study.DEFAULT_STORAGE, directions=["maximize", "minimize"])
    assert study.study_objectives(s) == [("value_0", "maximize"), ("value_1", "minimize")]
    s.set_user_attr("objectives", [["top1", "maximize"], ["infer_median_ms", "minimize"]])
    assert study.study_objectives(s) == [("top1", "maximize"), ("infer_median_ms", "minimize")]


def test_heartbeats_are_asked_of_the_opened_storage(workdir, monkeypatch):
    """A launch asks the storage it opened (not a study's private handle) whether it runs Optuna
    heartbeats: an RDB storage does, with the configured interval; a journal file does not."""
    from wavesweep.study.storage import HEARTBEAT_S, has_heartbeat

    monkeypatch.delenv("WAVESWEEP_HEARTBEAT_S", raising=False)
    rdb = study.open_storage(study.DEFAULT_STORAGE)
    assert has_heartbeat(rdb) and rdb.get_heartbeat_interval() == HEARTBEAT_S
    assert not has_heartbeat(study.open_storage(str(workdir / "s.journal")))


def test_an_enqueued_configuration_stopped_before_its_params_were_suggested_is_queued_again(workdir):
    """A stop held through study.ask() is taken as the objective begins, before any param is
    suggested: an enqueued configuration (here a partial one) must be queued again with its fixed
    params, which Optuna's own retry carries over; a sampled trial stopped there has nothing to repeat."""
    from wavesweep.study.storage import requeue_failed

    spec = study.load_spec(write_spec(workdir / "tiny.yaml", ""))
    s = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    s.enqueue_trial({"percentile": 60})
    stopped = s.ask()
    frozen = s.get_trials(deepcopy=False)[stopped.number]
    assert frozen.params == {} and frozen.system_attrs["fixed_params"] == {"percentile": 60}
    stopped.set_user_attr("interrupted", True)
    s.tell(stopped, state=TrialState.FAIL)
    sampled = s.ask()  # nothing enqueued: sampled params, none suggested before the stop
    sampled.set_user_attr("interrupted", True)
    s.tell(sampled, state=TrialState.FAIL)
    assert requeue_failed(s, spec) == [stopped.number]
    again = s.ask()
    assert s.get_trials(deepcopy=False)[again.number].system_attrs["retry_history"] == [stopped.number]
    params = {p.name: p.suggest(again) for p in spec.space}
    assert params["percentile"] == 60 and params["wavelet"] in ("haar", "db2")
    # not interrupted (the objective's own error before it suggested): not queued again
    s.enqueue_trial({"percentile": 20})
    failed = s.ask()
    failed.set_user_attr("error", "ValueError: bad")
    s.tell(failed, state=TrialState.FAIL)
    assert requeue_failed(s, spec) == []


def test_enqueue_counts_only_configurations_the_study_lacks(workdir):
    from wavesweep.study.workers import enqueue

    s = optuna.create_study(study_name="q", storage=study.DEFAULT_STORAGE)
    assert enqueue(s, [{"percentile": 60}, {"percentile": 60, "wavelet": "db2"}]) == 2
    assert enqueue(s, [{"percentile": 60}, {"percentile": 40}]) == 1  # the first is queued already
    assert len(s.get_trials(states=(TrialState.WAITING,))) == 3


def test_trial_user_attributes_are_schema_names():
    """The headline numbers an Optuna trial keeps are metrics a trial records (a misspelt name
    would silently keep nothing)."""
    from wavesweep import schema
    from wavesweep.study.objective import USER_ATTR_METRICS

    assert set(USER_ATTR_METRICS) <= set(schema.headline_names()), set(USER_ATTR_METRICS) - set(schema.headline_names())


# --------------------------------------------------------------------------- studies


@pytest.mark.slow
def test_small_study_completes_and_both_systems_agree(workdir, tiny_weights, capsys):
    spec = write_spec(workdir / "tiny.yaml", tiny_weights)
    assert run_cli("study", str(spec), "-q") == 0
    trials, runs = assert_agree()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials.values())
    # params: Optuna names = TrialConfig names = MLflow params, with the same values (every trial
    # that ran; a configuration the sampler proposed again is a repeat, checked by assert_agree)
    assert set(runs) == {n for n, t in trials.items() if "repeat_of" not in t.user_attrs}
    for n, run in runs.items():
        t, p = trials[n], run.data.params
        assert float(p["percentile"]) == t.params["percentile"] and p["wavelet"] == t.params["wavelet"]
        assert p["level"] == "2" and p["model"] == "cnn"
    # one study run, tagged, with the spec and the report as artifacts
    client = MlflowClient()
    parent = client.get_run(next(iter(runs.values())).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study"] == "tiny" and parent.data.tags["wavesweep.kind"] == "study"
    assert parent.data.tags["optuna.storage"] == f"sqlite:///{(workdir / 'optuna.db').resolve()}"  # not the relative default
    assert parent.data.tags["study.spec_file"] == str(spec.resolve())
    assert parent.data.metrics["n_complete"] == 3
    s = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE)
    assert s.user_attrs["mlflow_run_id"] == parent.info.run_id
    assert s.metric_names == ["val_top1"]  # objective names for optuna-dashboard: a study selects on validation
    for t in s.get_trials(states=(TrialState.COMPLETE,)):  # the value is the validation score; top1 the test part's
        if "repeat_of" in t.user_attrs:  # a configuration proposed again (assert_agree checked it): no run of numbers
            continue
        run = runs[t.number]
        assert t.values[0] == pytest.approx(run.data.metrics["val_top1"])
        assert t.user_attrs["top1"] == pytest.approx(run.data.metrics["top1"])
        assert run.data.metrics["n_val"] + run.data.metrics["n_eval"] == 40 and run.data.params["val_fraction"] == "0.5"
    assert_short_scalars(s.user_attrs)
    # the spec is the study run's artifact, byte for byte the spec file; its hash is in both systems
    got = Path(client.download_artifacts(parent.info.run_id, "spec/tiny.yaml", str(workdir / "dl")))
    assert got.read_bytes() == spec.read_bytes()
    assert s.user_attrs["spec_sha256"] == parent.data.tags["study.spec_sha256"] == hashlib.sha256(spec.read_bytes()).hexdigest()
    assert "study.spec" not in parent.data.tags  # no multi-line tag cell in the UI
    assert parent.data.metrics["best_value"] == pytest.approx(s.best_value)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/summary.csv" in arts and "report/accuracy_vs_pruned_fraction.png" in arts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "spec")] == ["spec/tiny.yaml"]
    # local report: decodable, non-empty images and a table with rows
    out = workdir / "reports" / "tiny"
    for png in ("accuracy_vs_pruned_fraction", "accuracy_vs_compression", "optimization_history", "param_importances", "layer_sparsity_best",
                "accuracy_vs_stored_mb", "gap_vs_pruned_fraction", "gap_by_wavelet_family", "gap_by_layout", "levels_best"):
        img = mpimg.imread(out / f"{png}.png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0, png
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) >= 1 and summary.loc[0, "trial"] == study.best_trial(s).number  # never a repeat, if Optuna's is one
    assert summary.loc[0, "objective val_top1"] == pytest.approx(s.best_value)
    assert summary.loc[0, "val_top1"] == pytest.approx(s.best_value) and "top1" in summary
    assert len(pd.read_csv(out / "trials.csv")) == 3
    md = (out / "summary.md").read_text()
    # importances count each configuration once: the sampler may propose one again (a repeat)
    n_configs = len({json.dumps(t.params, sort_keys=True) for t in s.get_trials(states=(TrialState.COMPLETE,))})
    assert "| selection |" in md and f"only {n_configs} distinct complete configurations (< 20)" in md and "[interactive](study.html)" in md
    html = (out / "study.html").read_text()
    assert "plotly" in html.lower() and "optimisation history: val_top1" in html and "parameter importances: val_top1" in html
    assert "**validation** part" in md and "**test** part" in md
    printed = capsys.readouterr().out
    assert "3 complete" in printed and "best trial" in printed

    # relaunch asking for more: only the missing trial runs, numbers stay unique
    assert run_cli("study", str(spec), "-q", "--n-trials", "4") == 0
    trials, runs = assert_agree()
    assert sorted(trials) == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in trials.values())
    assert len(pd.read_csv(out / "trials.csv")) == 4

    # on demand, by spec or by name, into another folder
    assert run_cli("report", "tiny", "--report-dir", "again") == 0
    assert (workdir / "again" / "summary.md").stat().st_size > 0
    assert run_cli("report", "nosuch") == 2


@pytest.mark.slow
def test_a_studys_method_runs_are_found_by_its_name(workdir, tiny_weights):
    """Comparing runs with `search_runs` as the README suggests (filter the method runs,
    `tags.method = 'dwt'`): a study's dwt, magnitude and random runs carried no tag naming the
    study or the trial (only their trial run did), so which study a dwt run belonged to took a
    second lookup of its parent. They carry the trial's `optuna.study` and `optuna.trial_number` now.
    A grid sampler: two distinct configurations (the random sampler, salted per launch, drew the
    first one again in 1 of 8 runs, and a repeat runs no method runs of its own)."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, sampler={"name": "grid"})
    assert run_cli("study", str(spec), "-q") == 0
    client = MlflowClient()
    trials = mlflow_trial_runs()
    assert len(trials) == 2
    exps = [e.experiment_id for e in client.search_experiments()]
    for method in ("dwt", "magnitude", "random"):
        found = client.search_runs(exps, f"tags.`optuna.study` = 'tiny' and tags.method = '{method}'")
        assert len(found) == 2, method
        for run in found:
            n = int(run.data.tags["optuna.trial_number"])
            assert run.data.tags["mlflow.parentRunId"] == trials[n].info.run_id, (method, n)


@pytest.mark.slow
def test_interrupt_then_resume_runs_only_the_missing_trials(workdir, tiny_weights, monkeypatch):
    # A grid study: after Ctrl-C the interrupted grid point must be run again, and only it.
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=None, sampler={"name": "grid"},
                      space={"percentile": [20, 50, 80], "wavelet": ["haar"]})  # fmt: skip
    from wavesweep import tracked_trial

    real, calls = tracked_trial.run_trial, []

    def ctrl_c_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second trial
        return real(*args, **kwargs)

    monkeypatch.setattr(tracked_trial, "run_trial", ctrl_c_on_second)
    assert run_cli("study", str(spec), "-q") == 130
    monkeypatch.setattr(tracked_trial, "run_trial", real)
    trials, runs = assert_agree()
    assert [trials[n].state for n in sorted(trials)] == [TrialState.COMPLETE, TrialState.FAIL]
    assert runs[1].info.status == "KILLED" and "KeyboardInterrupt" in runs[1].data.tags["error"]
    client = MlflowClient()
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "KILLED"
    interrupted = client.get_run(parent_id).data.tags["error"]

    # relaunch: the grid's 3 points, each exactly once among the counted trials; the failed one replaced
    assert run_cli("study", str(spec), "-q") == 0
    trials, runs = assert_agree()
    assert sorted(trials) == [0, 1, 2, 3]
    done = [t.params["percentile"] for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(done) == [20, 50, 80]
    assert client.get_run(parent_id).info.status == "FINISHED"  # the same study run, reopened and closed
    tags = client.get_run(parent_id).data.tags  # a FINISHED study run carries no error; the old one is history
    assert "error" not in tags and tags["error.previous"] == interrupted
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent_id}

    # running it again finds nothing missing
    assert run_cli("study", str(spec), "-q") == 0
    assert len(trials_by_number()) == 4


@pytest.mark.slow
def test_two_workers_share_one_storage_exactly(workdir, tiny_weights):
    # Also a two-objective study (accuracy and compression, NSGA-II): values land in both systems.
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=4, sampler={"name": "nsga2", "seed": 0, "population_size": 2},
                      objectives={"top1": "maximize", "compression_ratio": "maximize"})  # fmt: skip
    assert run_cli("study", str(spec), "-q", "--workers", "2") == 0
    trials, runs = assert_agree()
    assert sorted(trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials.values())
    # one trial run per trial that ran; a configuration NSGA-II proposed again is a repeat (assert_agree checks it)
    ran = {n for n, t in trials.items() if "repeat_of" not in t.user_attrs}
    assert set(runs) == ran and len({r.info.run_id for r in runs.values()}) == len(ran)
    summary = pd.read_csv(workdir / "reports" / "tiny" / "summary.csv")
    assert {"best val_top1 (maximize)", "best compression_ratio (maximize)", "pareto front"} <= set(summary["selection"])


@pytest.mark.slow
def test_failing_trials_are_recorded_as_failed_and_stop_the_launch(workdir, capsys):
    (workdir / "missing.pt").write_bytes(b"")  # there (a missing file is refused before the launch), and empty: each trial fails on it
    spec = write_spec(workdir / "tiny.yaml", str(workdir / "missing.pt"), max_failures=2)
    assert run_cli("study", str(spec), "-q") == 1
    trials, runs = assert_agree()
    assert [t.state for t in trials.values()] == [TrialState.FAIL] * 2
    assert all(r.info.status == "FAILED" and "missing.pt" in r.data.tags["error"] for r in runs.values())
    parent = MlflowClient().get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert "2 consecutive trials failed" in capsys.readouterr().err  # the reason, on one line


@pytest.mark.slow
def test_a_diverging_finetune_fails_its_trial_and_run_not_the_process(workdir, capsys):
    """SGD at lr 100 on an MLP (no BatchNorm) drives the fine-tuning loss to NaN. The NaN weights
    were scored as a model (top-1 0.1, loss nan) and the trial, or the study trial, finished
    COMPLETE; now a single trial stops with one line naming the method, the step and the remedy
    (exit 2, its run FAILED), and in a study the trial is FAIL with that error, its run FAILED."""
    import torch

    from wavesweep.models import build_model

    torch.manual_seed(0)
    weights = workdir / "mlp.pt"
    torch.save(build_model("mlp", num_classes=10, in_channels=1, image_size=8).state_dict(), weights)
    fixed = {"targets": "linear", "recovery": "finetune", "finetune_optimizer": "sgd", "finetune_steps": 20,
             "recovery_batch_size": 32, "timing_batches": 0}  # fmt: skip
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in fixed.items()]
    capsys.readouterr()
    assert run_cli("trial", "--model", "mlp", "--weights", str(weights), "--eval-limit", "40", "--finetune-lr", "100",
                   "-q", *flags) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wavesweep: error: dwt: fine-tuning diverged at step "), err
    assert err[0].endswith("; lower finetune_lr (it is 100, optimizer sgd)"), err
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("wavesweep").experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert all("top1" not in r.data.metrics for r in runs)  # nothing scored from NaN weights
    assert any(r.data.tags.get("error", "").startswith("FinetuneDiverged: dwt: fine-tuning diverged") for r in runs)

    spec = write_spec(workdir / "tiny.yaml", str(weights), base={"model": "mlp", "dataset": "digits", "eval_limit": 40,
                      "weights": str(weights)}, fixed=fixed, space={"finetune_lr": [100.0]}, n_trials=1, max_failures=1)  # fmt: skip
    assert run_cli("study", str(spec), "-q") == 1  # the launch gave up, as after any failed trial: no traceback
    assert "1 consecutive trials failed; last: FinetuneDiverged: dwt: fine-tuning diverged" in capsys.readouterr().err
    trials, runs = assert_agree()
    assert [t.state for t in trials.values()] == [TrialState.FAIL]
    assert trials[0].user_attrs["error"].startswith("FinetuneDiverged: dwt: fine-tuning diverged at step ")
    assert runs[0].info.status == "FAILED" and "top1" not in runs[0].data.metrics

def _bh(p) -> np.ndarray:
    """Benjamini-Hochberg by its definition, independent of scipy: min over j >= i of p_(j) * m / j, capped at 1."""
    p = np.asarray(p, float)
    m, order = len(p), np.argsort(p)
    adj = np.empty(m)
    for rank, i in enumerate(order, start=1):
        adj[i] = min(1.0, min(p[order[j - 1]] * m / j for j in range(rank, m + 1)))
    return adj


def test_the_report_adjusts_each_baseline_over_its_distinct_configurations(tmp_path):
    """A study with known p-values: 4 configurations, run 7 times (trials 4 and 5 ran 0's and 1's
    configuration again, as studies did before repeats were recognised; trial 6 is a recorded repeat
    of 2, with no numbers of its own), one pruned trial, one trial over replicate seeds (no p).
    Before, Benjamini-Hochberg counted every complete trial with a p (trials 4 and 5 twice over) and
    summary.md said "over the 6 complete trials" whatever the second baseline's count; it adjusted
    each baseline on its own without saying so. Now each family (dwt vs magnitude, dwt vs random)
    is adjusted over its distinct configurations' p-values and summary.md says which and how many."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from wavesweep import report

    dist = {"wavelet": CategoricalDistribution(["haar", "db2"]), "percentile": CategoricalDistribution([20, 50, 80])}
    p_mag = {("haar", 20): 0.011, ("haar", 50): 0.04, ("db2", 20): 0.03, ("db2", 50): 0.5}
    p_rnd = {("haar", 20): 1e-6, ("haar", 50): 0.02, ("db2", 20): np.nan, ("db2", 50): 0.2}  # one without a p
    order = [("haar", 20), ("haar", 50), ("db2", 20), ("db2", 50), ("haar", 20), ("haar", 50)]
    s = optuna.create_study(direction="maximize")
    s.set_user_attr("objectives", "top1:maximize")
    for w, pct in order:
        attrs = {"top1": 0.9, "gain_top1_vs_magnitude": 0.02, "gain_top1_vs_random": 0.5, "n_eval": 100,
                 "dwt_vs_magnitude_mcnemar_p": p_mag[w, pct], "dwt_vs_magnitude_ci_low": 0.01, "dwt_vs_magnitude_ci_high": 0.05,
                 "dwt_vs_random_ci_low": 0.4, "dwt_vs_random_ci_high": 0.6}  # fmt: skip
        attrs |= {} if np.isnan(p_rnd[w, pct]) else {"dwt_vs_random_mcnemar_p": p_rnd[w, pct]}
        s.add_trial(create_trial(params={"wavelet": w, "percentile": pct}, distributions=dist, value=0.9, user_attrs=attrs))
    s.add_trial(create_trial(params={"wavelet": "db2", "percentile": 20}, distributions=dist, value=0.9,
                             user_attrs={"repeat_of": 2, "examples_evaluated": 0}))  # fmt: skip
    s.add_trial(create_trial(params={"wavelet": "db2", "percentile": 80}, distributions=dist, state=TrialState.PRUNED))
    s.add_trial(create_trial(params={"wavelet": "db2", "percentile": 80}, distributions=dist, value=0.8,
                             user_attrs={"top1": 0.8, "n_replicates": 3, "gain_top1_vs_magnitude": 0.01}))  # fmt: skip
    frame = study.trials_frame(s)
    files = report.write_report(frame, tmp_path, study_name="known", objectives=[("top1", "maximize")])
    trials = pd.read_csv(files["trials_csv"]).set_index("number")
    configs = list(p_mag)  # trials 0..3 ran them
    want_mag = dict(zip(configs, _bh([p_mag[c] for c in configs])))
    tested_rnd = [c for c in configs if not np.isnan(p_rnd[c])]
    want_rnd = dict(zip(tested_rnd, _bh([p_rnd[c] for c in tested_rnd])))
    for n, (w, pct) in enumerate(order + [("db2", 20)]):
        assert trials.loc[n, "dwt_vs_magnitude_p_adj"] == pytest.approx(want_mag[w, pct], rel=1e-12), n  # a repeat: its original's
        if (w, pct) in want_rnd:
            assert trials.loc[n, "dwt_vs_random_p_adj"] == pytest.approx(want_rnd[w, pct], rel=1e-12), n
        else:
            assert np.isnan(trials.loc[n, "dwt_vs_random_p_adj"]), n
    assert trials.loc[[7, 8], ["dwt_vs_magnitude_p_adj", "dwt_vs_random_p_adj"]].isna().all().all()  # pruned; no p
    assert list(frame["repeat_of"].fillna(-1).astype(int)) == [-1, -1, -1, -1, 0, 1, 2, -1, -1]
    md = files["summary_md"].read_text()
    assert ("Adjusted p: Benjamini-Hochberg (scipy.stats.false_discovery_control), applied to each baseline separately, as two "
            "families: the 4 dwt-vs-magnitude McNemar p-values and the 3 dwt-vs-random McNemar p-values, one per distinct "
            "configuration among the complete trials. 3 complete trials repeated the configuration of an earlier one: the "
            "same test, not counted again.") in md  # fmt: skip
    assert "Distinct configurations among the complete trials: 5" in md  # 4 with a McNemar p, one over replicate seeds
    summary = pd.read_csv(files["summary_csv"])
    assert list(summary["trial"]) == [0]  # ties on the objective: the first trial that ran it, never a repeat


def _count_trial_runs(monkeypatch) -> list:
    """Spy on the trial computation itself: the configurations (wavelet, percentile, seed) computed, in order."""
    from wavesweep import tracked_trial

    real, calls = tracked_trial.run_trial, []

    def spy(cfg, **kwargs):
        calls.append((cfg.wavelet, cfg.percentile, cfg.seed))
        return real(cfg, **kwargs)

    monkeypatch.setattr(tracked_trial, "run_trial", spy)
    return calls


@pytest.mark.slow
def test_a_repeated_configuration_is_not_run_again(workdir, tiny_weights, monkeypatch, capsys):
    """Samplers propose a configuration again (here: 4 trials over a space of 2). Before, every one
    ran again (the same numbers, a whole trial of forward passes, a second MLflow trial run with the
    same metrics) and the report counted it as another test. A repeat now takes the earlier trial's
    values without computing, says which trial it repeats, and counts once."""
    calls = _count_trial_runs(monkeypatch)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=4, space={"percentile": [20, 80], "wavelet": ["haar"]})
    assert run_cli("study", str(spec), "-q") == 0
    trials, runs = assert_agree()
    assert all(t.state == TrialState.COMPLETE for t in trials.values()) and len(trials) == 4
    configs = {t.params["percentile"] for t in trials.values()}
    assert sorted(c[1] for c in calls) == sorted(configs), f"each configuration computed once: {calls}"
    repeats = assert_repeats(trials)
    assert len(repeats) == 4 - len(configs) > 0
    assert len(runs) == len(configs)  # one MLflow trial run (with metrics and checkpoint) per configuration
    s = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE)
    assert study.best_trial(s).number not in repeats  # the trial that ran it, whose run holds the model
    parent = MlflowClient().get_run(next(iter(runs.values())).data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["n_complete"] == 4 and parent.data.metrics["n_repeated"] == len(repeats)
    printed = capsys.readouterr().out
    assert "study tiny: 4 complete, 0 pruned, 0 failed" in printed
    assert f"{len(repeats)} of the complete trials repeated an earlier trial's configuration: not run again" in printed
    frame = study.trials_frame(s)
    assert {int(n): int(r) for n, r in zip(frame["number"], frame["repeat_of"]) if r == r} == repeats
    md = (workdir / "reports" / "tiny" / "summary.md").read_text()
    k = len(configs)  # 2, or 1 when the sampler drew one configuration four times
    assert f"Distinct configurations among the complete trials: {k}" in md
    assert f"the {k} dwt-vs-magnitude McNemar p-value{'s' * (k > 1)} and the {k} dwt-vs-random" in md
    # running it again to a larger total: only a configuration not run before is computed
    calls.clear()
    assert run_cli("study", str(spec), "-q", "--n-trials", "6") == 0
    trials, runs = assert_agree()
    now = {t.params["percentile"] for t in trials.values()}
    assert len(trials) == 6 and sorted(c[1] for c in calls) == sorted(now - configs) and len(runs) == len(now)


@pytest.mark.slow
def test_failed_or_pruned_trials_are_not_reused(workdir, tiny_weights, monkeypatch):
    """Only a COMPLETE trial's numbers are reused: the same configuration after a failed and after a
    pruned trial is computed; only after that, a repeat takes the computed trial's values."""
    from wavesweep import tracked_trial

    real, calls = tracked_trial.run_trial, []

    def fail_then_prune(cfg, **kwargs):
        calls.append(cfg.percentile)
        if len(calls) == 1:
            raise RuntimeError("a broken trial")
        if len(calls) == 2:
            raise optuna.TrialPruned("stopped early")
        return real(cfg, **kwargs)

    monkeypatch.setattr(tracked_trial, "run_trial", fail_then_prune)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3, space={"percentile": [40]})
    assert run_cli("study", str(spec), "-q") == 0
    trials, runs = assert_agree()
    assert [trials[n].state for n in sorted(trials)] == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE]
    assert calls == [40, 40, 40]
    assert assert_repeats(trials) == {3: 2}


@pytest.mark.slow
def test_a_stop_while_a_repeat_is_recorded_fails_it_and_the_retry_repeats_again(workdir, tiny_weights, monkeypatch):
    """Ctrl-C while a repeat's run records what it repeats: the trial is FAIL (interrupted), its run
    KILLED, not FINISHED beside a failed trial; the next launch retries it, a repeat again."""
    from wavesweep import tracking

    real = tracking.log_batch

    def stop_on_repeat(client, run_id, **kw):
        if "repeat_of_trial" in (kw.get("tags") or {}):
            raise KeyboardInterrupt
        return real(client, run_id, **kw)

    monkeypatch.setattr(tracking, "log_batch", stop_on_repeat)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, space={"percentile": [40]})
    assert run_cli("study", str(spec), "-q") == 130
    monkeypatch.setattr(tracking, "log_batch", real)
    trials = trials_by_number()
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["interrupted"] is True
    run = MlflowClient().get_run(trials[1].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["wavesweep.kind"] == "repeat"
    assert run.data.tags["optuna.state"] == "FAIL" and "interrupted" in run.data.tags["error"]
    assert run_cli("study", str(spec), "-q") == 0
    trials = trials_by_number()
    assert assert_repeats(trials) == {2: 0} and trials[2].system_attrs["failed_trial"] == 1


@pytest.mark.slow
def test_replicates_are_run_and_a_repeated_configuration_over_them_is_not(workdir, tiny_weights, monkeypatch):
    """Replicates are deliberate repeats with other seeds: each runs. A trial repeating a configuration
    over the same seeds is the earlier trial's configuration run and runs none of them again."""
    calls = _count_trial_runs(monkeypatch)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, replicates=2, space={"percentile": [40]})
    assert run_cli("study", str(spec), "-q") == 0
    trials = trials_by_number()
    assert [(c[1], c[2]) for c in calls] == [(40, 0), (40, 1)]  # both seeds of the one configuration, once
    assert assert_repeats(trials) == {1: 0}
    assert trials[0].user_attrs["n_replicates"] == 2 and len(trials[0].user_attrs["replicate_run_ids"].split(",")) == 2
    client = MlflowClient()
    config = client.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert config.data.tags["wavesweep.kind"] == "configuration"
    seeds = sorted(r.data.params["seed"] for r in study_trial_runs(client, "tiny"))
    assert seeds == ["0", "1"]  # the replicate trial runs, one per seed: none folded, none repeated


@pytest.mark.slow
def test_two_workers_on_a_small_space_stay_exact(workdir, tiny_weights):
    """Two workers on a space of 2 configurations: the total is exact, every repeat names a trial that
    ran it, and the report counts each configuration once (two workers may both run one configuration
    at once, when neither has finished: the later one is then counted as a repeat of the first)."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=5, space={"percentile": [20, 80], "wavelet": ["haar"]})
    assert run_cli("study", str(spec), "-q", "--workers", "2") == 0
    trials = trials_by_number()
    assert_repeats(trials)
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 5
    s = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE)
    frame = study.trials_frame(s)
    ran = frame[frame["repeat_of"].isna()]
    drawn = set(frame["percentile"])  # both, unless the sampler drew one configuration five times
    assert sorted(ran["percentile"]) == sorted(drawn)  # each configuration once, as the first trial that ran it
    for _, r in frame[frame["repeat_of"].notna()].iterrows():  # recorded as a repeat, or ran at once with the first
        first = frame[frame["number"] == r["repeat_of"]].iloc[0]
        assert first["percentile"] == r["percentile"] and pd.isna(first["repeat_of"]) and first["state"] == "COMPLETE"
    md = (workdir / "reports" / "tiny" / "summary.md").read_text()
    assert f"Distinct configurations among the complete trials: {len(drawn)}" in md


def _grid_seed_visiting_first(space: dict[str, list], first: set) -> int:
    """A GridSampler seed whose first two trials take ``first`` percentiles (GridSampler shuffles by seed)."""
    for seed in range(500):
        s = optuna.create_study(sampler=optuna.samplers.GridSampler(space, seed=seed))
        s.optimize(lambda t: t.suggest_categorical("percentile", space["percentile"]), n_trials=2)
        if {t.params["percentile"] for t in s.trials} == first:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.slow
def test_a_setting_a_later_launch_changes_is_tagged_on_the_study_run(workdir, caplog):
    """A relaunch may change the pruner (or a sampler seed); MLflow params cannot change, so the
    study run's param ``pruner`` kept the first launch's value beside a spec artifact that said
    otherwise. The run now says what the latest launch ran with (tag ``latest_launch.pruner``),
    set back when a launch returns to the first value, and nothing for launches that agree.
    Oracle: the MLflow client's view of the reopened run."""
    from wavesweep import tracking

    client, exp = tracking.init_tracking()
    first = {"study": "tiny", "sampler": "random", "pruner": "none", "sampler.seed": 3}
    kw = dict(study_name="tiny", storage="sqlite:///optuna.db", spec_file=None, spec_text="")
    run_id = tracking.start_study_run(client, exp, params=first, **kw)
    assert not [k for k in client.get_run(run_id).data.tags if k.startswith("latest_launch.")]
    seen = []
    for pruner, seed in (("median", 3), ("median", 3), ("none", 4)):
        caplog.clear()
        again = tracking.start_study_run(client, exp, params=first | {"pruner": pruner, "sampler.seed": seed},
                                         existing_run_id=run_id, **kw)  # fmt: skip
        run = client.get_run(again)
        assert again == run_id and run.data.params["pruner"] == "none" and run.data.params["sampler.seed"] == "3"
        seen.append(({k: v for k, v in run.data.tags.items() if k.startswith("latest_launch.")},
                     sum("its param" in r.getMessage() for r in caplog.records)))
    assert seen == [({"latest_launch.pruner": "median"}, 1), ({"latest_launch.pruner": "median"}, 0),
                    ({"latest_launch.pruner": "none", "latest_launch.sampler.seed": "4"}, 1)]  # back to the param: no warning


def test_median_pruner_stops_hopeless_trials(workdir, tiny_weights):
    # Two sensible thresholds first (the pruner's startup trials), then three that destroy the model.
    space = {"percentile": [10, 20, 99.6, 99.8, 99.9]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = _grid_seed_visiting_first(space, {10, 20})
    spec = write_spec(
        workdir / "tiny.yaml", tiny_weights, n_trials=None, space=space, sampler={"name": "grid", "seed": seed},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    )  # fmt: skip
    assert run_cli("study", str(spec), "-q") == 0
    trials, runs = assert_agree()
    states = [trials[n].state for n in sorted(trials)]
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert states.count(TrialState.PRUNED) == 3, states
    for n, t in trials.items():
        if t.state == TrialState.PRUNED:
            assert runs[n].info.status == "KILLED" and runs[n].data.tags["early_stopped"] == "true"
            assert t.user_attrs["examples_evaluated"] < trials[0].user_attrs["examples_evaluated"]
            assert t.intermediate_values  # partial accuracy was reported
        # what the pruner was given is the run's partial_top1, step by step (README)
        history = {m.step: m.value for m in MlflowClient().get_metric_history(runs[n].info.run_id, "partial_top1")}
        assert history == pytest.approx(t.intermediate_values), n
    best = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).best_trial
    assert best.params["percentile"] in (10, 20)


def test_wilcoxon_is_given_each_chunks_own_top1_recorded_as_chunk_top1_and_not_mixed_with_median(workdir, tiny_weights):
    """Wilcoxon pairs each chunk's own accuracy across trials: the run recorded only the cumulative
    partial_top1, so what the pruner saw was nowhere in MLflow; it is chunk_top1 now. A relaunch
    under median (given the cumulative top-1) would mix the two kinds of values in one study's
    comparisons: refused in one line, the study unchanged; pruner none may run on."""
    from wavesweep.study.storage import create_study

    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=1, space={"percentile": [10, 20]},
                      pruner={"name": "wilcoxon", "n_startup_steps": 0})  # fmt: skip
    assert run_cli("study", str(spec), "-q") == 0
    trials, runs = assert_agree()
    (t,) = trials.values()
    client = MlflowClient()
    chunk = {m.step: m.value for m in client.get_metric_history(runs[t.number].info.run_id, "chunk_top1")}
    partial = {m.step: m.value for m in client.get_metric_history(runs[t.number].info.run_id, "partial_top1")}
    assert len(chunk) == len(t.intermediate_values) > 1 and chunk == pytest.approx(t.intermediate_values)
    assert partial.keys() == chunk.keys() and partial[0] == pytest.approx(chunk[0])  # cumulative: the first chunk alone
    s = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE)
    assert s.user_attrs["intermediate_values"] == "per_chunk"
    before = dict(s.user_attrs)
    with pytest.raises(ValueError, match=r"gave its pruner each chunk's own top-1 at each evaluation chunk; pruner "
                                         r"'median' is given the cumulative top-1"):
        create_study(study.load_spec(spec, overrides={"pruner": "median"}), study.DEFAULT_STORAGE)
    assert optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).user_attrs == before
    create_study(study.load_spec(spec, overrides={"pruner": "none"}), study.DEFAULT_STORAGE)


@pytest.mark.parametrize(("fixed", "label"), [({}, "best val_top1"), ({"val_fraction": 0}, "best top1")])
def test_the_progress_bar_names_the_value_it_shows(fixed, label):
    """The bar's best value is the trials' objective value: with a validation part their
    val_top1 (it read 'best top1=0.5833' for a trial whose top1 was 0.7000)."""
    from wavesweep.study.workers import _Progress

    spec = study.spec_from_mapping({"space": {"percentile": [10, 20]}, "objectives": {"top1": "maximize"}, "n_trials": 2,
                                    "fixed": fixed})  # fmt: skip
    s = optuna.create_study(direction="maximize")
    s.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5833))
    bar = _Progress(spec, 2, enabled=False)
    bar(s)
    assert bar.bar.postfix.split(", ")[-1] == f"{label}=0.5833"
    bar.close()


def test_the_progress_bar_counts_each_pareto_optimal_configuration_once():
    """A trial that repeated a configuration (repeat_of) has its original's values, so Optuna's
    best_trials holds both: the bar said pareto=5 beside a report of 4 Pareto-optimal rows."""
    from wavesweep.study.workers import _Progress

    spec = study.spec_from_mapping({"space": {"percentile": [10, 20]}, "n_trials": 3,
                                    "objectives": {"top1": "maximize", "compression_ratio": "maximize"}})  # fmt: skip
    s = optuna.create_study(directions=["maximize", "maximize"])
    for values, attrs in (([0.9, 2.0], {}), ([0.5, 4.0], {}), ([0.5, 4.0], {"repeat_of": 1})):
        s.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=values, user_attrs=attrs))
    assert len(s.best_trials) == 3
    bar = _Progress(spec, 3, enabled=False)
    bar(s)
    assert bar.bar.postfix.split(", ")[-1] == "pareto=2"
    bar.close()


def test_importances_count_each_configuration_once(tmp_path):
    """A configuration proposed again (repeat_of) is one point of the importance analysis: 20
    complete trials of 4 configurations were analysed as 20 (duplicated points) and the report
    said 'Computed from 20 complete trials.' with no caution (it cautions below 20)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dist = {"wavelet": CategoricalDistribution(("haar", "db2")), "percentile": FloatDistribution(10, 90)}
    configs = [({"wavelet": "haar", "percentile": 20.0}, 0.9), ({"wavelet": "db2", "percentile": 80.0}, 0.2),
               ({"wavelet": "haar", "percentile": 70.0}, 0.5), ({"wavelet": "db2", "percentile": 30.0}, 0.85)]  # fmt: skip
    s = optuna.create_study(direction="maximize", study_name="dup")
    for params, value in configs:
        s.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=value))
    for k in range(16):
        params, value = configs[k % 2]
        s.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=value, user_attrs={"repeat_of": k % 2}))
    files = study.build_report(s, tmp_path)
    md = files["summary_md"].read_text()
    assert "**Caution:** importances computed from only 4 distinct complete configurations (< 20)" in md, md
    once = study.frame.distinct_study(s)
    assert [t.params for t in once.trials] == [p for p, _v in configs] and once.directions == s.directions


def test_reporter_sends_cumulative_or_per_chunk_accuracy():
    """Median and the other pruners get the cumulative partial top-1; Wilcoxon, which pairs
    per-step scores, gets each chunk's own accuracy, straight from the chunk record."""
    from types import SimpleNamespace

    from wavesweep.evaluate import Chunk
    from wavesweep.study.objective import reporter

    counts = [(2, 3), (3, 3), (1, 2), (2, 2)]  # (correct, size) of each chunk
    reported, verdicts = [], iter([False, False, False, True])
    fake_trial = SimpleNamespace(report=lambda v, s: reported.append((s, v)), should_prune=lambda: next(verdicts))
    for pruner, expected in (("wilcoxon", [2 / 3, 1.0, 0.5, 1.0]), ("median", [2 / 3, 5 / 6, 6 / 8, 8 / 10])):
        reported.clear()
        verdicts = iter([False, False, False, True])
        seen: list[Chunk] = []
        report = reporter(fake_trial, pruner, seen)
        total_correct = total = 0
        with pytest.raises(optuna.TrialPruned, match="chunk 3"):
            for step, (correct, n) in enumerate(counts):
                total_correct, total = total_correct + correct, total + n
                report(Chunk(step, SimpleNamespace(top1=total_correct / total, n=total), n, correct))
        assert [s for s, _ in reported] == [0, 1, 2, 3] and len(seen) == 4
        assert [v for _, v in reported] == pytest.approx(expected)


def test_the_interactive_history_names_its_objective_in_a_single_objective_study(tmp_path):
    """Optuna's history figure says "Objective Value" unless told the name: study.html passes it
    (val_top1 here, the objective of a study with a validation split)."""
    import re
    import warnings

    from wavesweep.study.frame import write_interactive

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        st = optuna.create_study(direction="maximize")
        st.set_metric_names(["val_top1"])
    st.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    html = write_interactive(st, tmp_path / "study.html").read_text()
    assert re.findall(r'"yaxis":\{[^}]*"title":\{"text":"([^"]+)"', html)[0] == "val_top1"
    assert "Objective Value" not in html


def test_a_multi_objective_report_names_a_pareto_optimal_best_and_draws_its_layers(tmp_path, monkeypatch):
    """Trials tied on the first objective (top-1 on a few hundred examples often is): the report's
    best on it is the Pareto-optimal one (Optuna's best_trials), the trial ``--register-best``
    registers, and the per-layer figures are that trial's, not a dominated trial's or none."""
    import warnings

    from wavesweep import figures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        st = optuna.create_study(directions=["maximize", "maximize"])
        st.set_metric_names(["val_top1", "compression_ratio"])
    st.set_user_attr("objectives", "top1:maximize, compression_ratio:maximize")
    for number, values in enumerate([(0.9, 2.0), (0.9, 3.0), (0.5, 4.0)]):
        t = st.ask()
        t.suggest_float("percentile", 0, 100)
        t.set_user_attr("metrics", {"layers": {"name": [f"conv{number}"], "dwt_coeff_sparsity": [0.5], "dwt_weight_sparsity": [0.0],
                                               "magnitude_weight_sparsity": [0.5]}})  # fmt: skip
        st.tell(t, values)
    front = st.best_trials  # Optuna's own Pareto front
    top = max(t.values[0] for t in front)
    want = min(t.number for t in front if t.values[0] == top)
    drawn = []
    real = figures.plot_layer_sparsity
    monkeypatch.setattr(figures, "plot_layer_sparsity", lambda layers, path, title: drawn.append((layers, title)) or real(layers, path, title=title))
    study.build_report(st, tmp_path / "r")
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert summary.loc[summary["selection"] == "best val_top1 (maximize)", "trial"].tolist() == [want]
    assert study.best_trial(st).number == want  # what --register-best registers
    assert drawn == [({"name": [f"conv{want}"], "dwt_coeff_sparsity": [0.5], "dwt_weight_sparsity": [0.0],
                       "magnitude_weight_sparsity": [0.5]}, f"trial {want}")]  # fmt: skip


@pytest.mark.parametrize("directions", [["maximize"], ["maximize", "maximize"]], ids=["single", "multi"])
def test_the_best_trial_is_never_an_unmarked_duplicate_the_report_counts_as_a_repeat(tmp_path, monkeypatch, directions):
    """Two workers that drew one configuration at once (or a study recorded before repeats were
    marked): the later trial, with the same params and no ``repeat_of``, is a repeat to the report.
    When it scored higher (GPU nondeterminism, a timing objective) best_trial named it while the
    report named the first, whose layers were then missing from the figures. Both now name the
    first, by its own trial number (a failed trial before it shifts nothing)."""
    import warnings

    from wavesweep import figures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        st = optuna.create_study(directions=directions)
        st.set_metric_names(["top1", "compression_ratio"][: len(directions)])
    st.set_user_attr("objectives", ", ".join(f"{m}:maximize" for m in ["top1", "compression_ratio"][: len(directions)]))
    failed = st.ask()
    failed.suggest_float("percentile", 0, 100)
    st.tell(failed, state=TrialState.FAIL)
    for percentile, values in ((80.0, (0.90, 3.0)), (80.0, (0.92, 3.0)), (40.0, (0.85, 2.0))):
        t = st.ask()
        t.suggest_float("percentile", 0, 100)  # the ask's draw, replaced by the configuration below
        t.storage.set_trial_param(t._trial_id, "percentile", percentile, optuna.distributions.FloatDistribution(0, 100))
        t.set_user_attr("metrics", {"layers": {"name": [f"conv{t.number}"], "dwt_coeff_sparsity": [0.5],
                                               "dwt_weight_sparsity": [0.0], "magnitude_weight_sparsity": [0.5]}})  # fmt: skip
        st.tell(t, values[: len(directions)])
    assert [t.params["percentile"] for t in st.trials[1:]] == [80.0, 80.0, 40.0]
    drawn = []
    real = figures.plot_layer_sparsity
    monkeypatch.setattr(figures, "plot_layer_sparsity", lambda layers, path, title: drawn.append(title) or real(layers, path, title=title))
    study.build_report(st, tmp_path / "r")
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert summary.loc[summary["selection"] == "best top1 (maximize)", "trial"].tolist() == [1]
    assert study.best_trial(st).number == 1 and drawn == ["trial 1"]


def test_a_resumed_study_records_its_trials_in_its_study_runs_experiment(workdir, monkeypatch):
    """A study resumed with another $MLFLOW_EXPERIMENT_NAME reopens its study run, which stays in
    its experiment: the new trials' runs go there too, nested under it, not into the other one."""
    from wavesweep import tracked_trial

    def broken(*args, **kwargs):  # the trial's run exists by now; no model is needed to see where
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(tracked_trial, "run_trial", broken)
    (workdir / "unused.pt").write_bytes(b"")  # a weights file that is not there is refused before the launch
    spec = write_spec(workdir / "tiny.yaml", str(workdir / "unused.pt"), max_failures=1)
    for experiment in ("first", "second"):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
        assert run_cli("study", str(spec), "-q") == 1  # the one trial fails: the launch gives up
    client = MlflowClient()
    runs = study_trial_runs(client, "tiny")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    (parent,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    study_exp = client.get_run(parent).info.experiment_id
    assert client.get_experiment(study_exp).name == "first"
    assert [r.info.experiment_id for r in runs] == [study_exp, study_exp]


def test_the_report_shows_the_fixed_settings_a_trial_ran_at(workdir, tiny_weights):
    """A spec's fixed level, layout and mode were in no trial record, so the summary table left
    them out and its reader had to open the spec: every configuration value not searched is a
    trial user attribute now, in the frame and in the summary's columns."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights)
    assert run_cli("study", str(spec), "-q") == 0
    s = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE)
    written = yaml.safe_load(spec.read_text())
    fixed = {**written["base"], **written["fixed"]}
    frame = study.trials_frame(s)
    for key in ("level", "layout", "mode", "model"):
        want = fixed.get(key, getattr(TrialConfig(), key))
        assert (frame[key].astype(str) == str(want)).all(), (key, frame[key].tolist(), want)
    for t in s.trials:  # table cells in optuna-dashboard, as the other scalar records
        assert_short_scalars({k: t.user_attrs[k] for k in ("level", "layout", "mode", "model", "eval_limit")})
    summary = pd.read_csv(workdir / "reports" / "tiny" / "summary.csv")
    assert {"level", "layout", "mode"} <= set(summary.columns)
    assert (summary["level"] == fixed["level"]).all()


@pytest.mark.parametrize(("rec", "passes"), [("none", 1), ("bn", 2)])
def test_examples_evaluated_counts_every_scoring_pass_of_the_pruned_models(tmp_path, monkeypatch, rec, passes):
    """A trial's ``examples_evaluated``: every example each pruned model was scored on. With a
    recovery each model is scored on the test part twice (before and after it): the record said
    3 * (test + validation) whatever the recovery, a third short under bn and finetune."""
    import torch

    from wavesweep import train, trial
    from wavesweep.models import build_model
    from wavesweep.study.objective import examples_scored_of, trial_record

    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "image_size": 8}
    base = train.BaseModel(build_model("cnn", **kw).eval(), "cnn", "digits", 0, "trained", tmp_path / "w.pt", "ab" * 32, kw)
    cfg = TrialConfig(model="cnn", dataset="digits", eval_limit=120, device="cpu", val_fraction=0.25, recovery=rec,
                      recovery_batches=2, timing_batches=0, level=1)  # fmt: skip
    r = trial.run_trial(cfg, base=base)
    n_test, n_val = r.eval_info["n_eval"], r.eval_info["n_val"]
    assert (n_test, n_val) == (90, 30)
    scored = sum(len(o.eval.targets) + len(o.val_eval.targets) + (0 if o.prerec_eval is None else len(o.prerec_eval.targets))
                 for o in r.outcomes.values())  # fmt: skip
    assert trial_record(r.metrics()["parent"], r)["examples_evaluated"] == scored == 3 * (passes * n_test + n_val)
    assert examples_scored_of(r.metrics()["parent"]) == scored  # a replicate reused: counted from its run's metrics


def test_stopping_spawned_workers_says_what_it_waits_for(caplog):
    """A stop (Ctrl-C, SIGTERM) with spawned workers alive: the launcher signals each once and says
    in one line that it waits for them (it was silent for up to 14 s); without a stop, or with no
    worker alive, it says nothing. The workers are real processes: the signal must end them."""
    import multiprocessing
    import signal
    import time

    from wavesweep.study.workers import _stop_workers

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=time.sleep, args=(60,)) for _ in range(2)]
    for p in procs:
        p.start()
    never_started = ctx.Process(target=time.sleep, args=(60,))  # a stop while they were started
    with caplog.at_level("WARNING", logger="wavesweep.study.workers"):
        _stop_workers([*procs, never_started], signal.SIGTERM, why="SIGTERM")
        assert [p.exitcode for p in procs] == [-signal.SIGTERM] * 2
        _stop_workers(procs, signal.SIGTERM, why="SIGTERM")  # all gone: nothing to wait for
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["SIGTERM: waiting for 2 spawned workers to stop (a running trial is closed: Optuna FAIL, "
                     "MLflow KILLED; the next launch retries it)"], lines
