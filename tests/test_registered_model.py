"""The registered model as a user downloads it: an ordinary PyTorch module, in a fresh process
where wavesweep cannot be imported; and registering leaves the source run as it was."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from wavesweep import checkpoint, models, train
from wavesweep.config import TrialConfig
from wavesweep.trial import load_eval_set

pytestmark = pytest.mark.slow

# Runs first in the child: any import of wavesweep (the editable install's finder, a path entry) fails.
NO_WAVESWEEP = """
import sys
class _NoWavesweep:
    def find_spec(self, name, path=None, target=None):
        if name == "wavesweep" or name.startswith("wavesweep."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None
sys.meta_path.insert(0, _NoWavesweep())
try:
    import wavesweep
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("wavesweep is importable")
"""

CHILD = """
import json, sys
import mlflow, numpy as np, torch
uri, folder = sys.argv[1], sys.argv[2]
x, y, expected = (np.load(f"{folder}/{k}.npy") for k in ("x", "y", "logits"))
pf = mlflow.pyfunc.load_model(uri)
net = pf.get_raw_model()
out = {"type": f"{type(net).__module__}.{type(net).__name__}", "is_module": isinstance(net, torch.nn.Module),
       "training_after_load": net.training}
with torch.no_grad():
    out["max_err_by_batch"] = {b: float(np.abs(net(torch.from_numpy(x[:b])).numpy() - expected[:b]).max()) for b in (1, 3, len(x))}
out["predict_err"] = float(np.abs(pf.predict(x[:5]) - expected[:5]).max())
out["train_returns_self"] = net.train() is net and net.training
out["eval_returns_self"] = net.eval() is net and not net.training
net.train()
before = [p.detach().clone() for p in net.parameters()]
opt = torch.optim.SGD(net.parameters(), lr=0.05)
losses = []
for _ in range(3):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y).long())
    loss.backward()
    opt.step()
    losses.append(float(loss))
out["losses"] = losses
out["params_changed"] = sum(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
out["n_params"] = len(before)
exported = mlflow.pytorch.load_model(uri)  # the pytorch flavour: the module exported with torch.export (pt2)
with torch.no_grad():
    out["pytorch_flavour_err_by_batch"] = {b: float(np.abs(exported(torch.from_numpy(x[:b])).numpy() - expected[:b]).max())
                                           for b in (1, 3, len(x))}
out["pytorch_flavour_is_module"] = isinstance(exported, torch.nn.Module)
out["wavesweep_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "wavesweep")
print(json.dumps(out))
"""


@pytest.fixture
def trial_run(workdir, shared_cache):
    from wavesweep.tracked_trial import run_tracked_trial

    base = train.get_base_model("cnn", "digits", seed=0, cache_root=shared_cache, progress=False,
                                train_config=train.TrainConfig(epochs=1, batch_size=64, lr=1e-2))  # fmt: skip
    cfg = TrialConfig.from_mapping({"model": "cnn", "weights": str(base.path), "eval_limit": 100, "timing_batches": 0,
                                    "recovery": "none", "wavelet": "haar", "level": 2, "percentile": 60})  # fmt: skip
    _result, run_id = run_tracked_trial(cfg)
    return cfg, run_id


def test_register_leaves_the_source_run_unchanged(trial_run):
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    client = MlflowClient()
    before = client.get_run(run_id)
    mv = register_trial_model(run_id, name="unchanged", alias="champion")
    after = client.get_run(run_id)
    assert mv.run_id == run_id and str(mv.version) == "1"
    # the version says every setting that decided which weights were pruned (the run's params)
    for key in ("wavelet", "level", "percentile", "layout", "mode", "scope", "keep_approx", "targets", "recovery", "seed"):
        assert mv.tags[key] == before.data.params[key], key
    assert (after.info.status, after.info.end_time, after.info.start_time) == (before.info.status, before.info.end_time, before.info.start_time)
    assert before.info.status == "FINISHED" and before.info.end_time is not None
    assert after.data.tags == before.data.tags
    assert after.data.params == before.data.params and after.data.metrics == before.data.metrics
    # what changed: one folder of artifacts, the model
    assert "registered-dwt" in [f.path for f in client.list_artifacts(run_id)]
    # the version says what made it, recovery and seed included (a bn and a finetune model of one
    # configuration differ only there); oracle: the source run's params
    tags = client.get_model_version("unchanged", mv.version).tags
    for key in ("wavelet", "level", "percentile", "layout", "mode", "model", "dataset", "recovery", "seed"):
        assert float(tags[key]) == float(before.data.params[key]) if key in ("level", "percentile", "seed") \
            else tags[key] == before.data.params[key], key


def test_versions_of_models_that_recovered_otherwise_differ_in_their_tags(workdir, shared_cache):
    """Two finetune trials of one configuration, fine-tuned at lr 1e-3 and 1e-2: their versions'
    tags were equal but for top1 (finetune_lr, steps, optimizer, schedule, the recovery batches and
    the base weights were not tags). Oracle: each source run's params."""
    from wavesweep.tracked_trial import register_trial_model, run_tracked_trial

    base = train.get_base_model("cnn", "digits", seed=0, cache_root=shared_cache, progress=False,
                                train_config=train.TrainConfig(epochs=1, batch_size=64, lr=1e-2))  # fmt: skip
    client = MlflowClient()
    tags = []
    for lr in (1e-3, 1e-2):
        cfg = TrialConfig.from_mapping({"model": "cnn", "weights": str(base.path), "eval_limit": 60, "timing_batches": 0,
                                        "recovery": "finetune", "finetune_steps": 2, "recovery_batches": 2,
                                        "finetune_lr": lr, "percentile": 60})  # fmt: skip
        _result, run_id = run_tracked_trial(cfg)
        mv = register_trial_model(run_id, name="recovered")
        tags.append(client.get_model_version("recovered", mv.version).tags)
        params = client.get_run(run_id).data.params
        keys = ("recovery_batches", "recovery_batch_size", "finetune_steps", "finetune_lr", "finetune_optimizer",
                "finetune_schedule", "weights", "base_checksum")
        for key in keys:
            assert tags[-1][key] == params[key] or float(tags[-1][key]) == float(params[key]), key
    differ = {k for k in tags[0] if tags[0][k] != tags[1].get(k)} - {"top1", "source_run_id", "compression_ratio", "stored_bytes"}
    assert differ == {"finetune_lr"}, differ


def test_registered_model_is_an_ordinary_module_without_wavesweep(trial_run, tmp_path):
    from wavesweep.tracked_trial import register_trial_model

    cfg, run_id = trial_run
    register_trial_model(run_id, name="plain", alias="champion")
    client = MlflowClient()
    run = client.get_run(run_id)

    # the download: the dense model twice (the state dict, and the exported program of the pytorch
    # flavour, whose graph adds some kB) plus its compressed checkpoint (+ a few kB of MLmodel,
    # requirements, the two code files and the input example)
    dl = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/plain@champion", dst_path=str(tmp_path / "dl")))
    total = sum(p.stat().st_size for p in dl.rglob("*") if p.is_file())
    ckpt = next(dl.rglob("dwt.wsz"))
    dense = run.data.metrics["dense_bytes"]
    pt2 = next(dl.rglob("model.pt2")).stat().st_size
    assert dense < pt2 <= dense + 200_000, (pt2, dense)
    assert total <= dense + pt2 + ckpt.stat().st_size + 64_000, (total, dense, pt2, ckpt.stat().st_size)
    flavours = yaml.safe_load((dl / "MLmodel").read_text())["flavors"]
    from wavesweep import pruned_model

    loader = flavours["python_function"]["loader_module"]  # this version's loader, named by its contents
    assert flavours["pytorch"]["model_data"] == "exported" and loader == pruned_model.loader_module(Path(pruned_model.__file__).read_bytes())
    assert (dl / "code" / f"{loader}.py").read_bytes() == Path(pruned_model.__file__).read_bytes()
    assert ckpt.stat().st_size - checkpoint.read_header(ckpt)["header_bytes"] == run.data.metrics["stored_bytes"]

    # the oracle: the evaluated weights, decoded from the trial's compressed checkpoint by wavesweep
    _, eval_set = load_eval_set(cfg)
    x = torch.stack([eval_set[i][0] for i in range(7)])
    y = np.array([int(eval_set[i][1]) for i in range(7)])
    model, _ = checkpoint.load_compressed(ckpt, models.build_model("cnn", num_classes=10, in_channels=1, image_size=8))
    with torch.no_grad():
        logits = model.eval()(x).numpy()
    for k, v in {"x": x.numpy(), "y": y, "logits": logits}.items():
        np.save(tmp_path / f"{k}.npy", v)

    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "-c", NO_WAVESWEEP + CHILD, "models:/plain@champion", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["is_module"] and re.fullmatch(r"wavesweep_architectures_[0-9a-f]{16}\.SmallCNN", out["type"]), out["type"]
    assert out["wavesweep_modules"] == []
    assert out["training_after_load"] is False  # loaded in eval mode, as evaluated
    assert all(err < 1e-5 for err in out["max_err_by_batch"].values()), out["max_err_by_batch"]  # batch sizes 1, 3, 7
    assert out["predict_err"] < 1e-5
    assert out["train_returns_self"] and out["eval_returns_self"]
    assert out["params_changed"] == out["n_params"] > 0  # fine-tuning updates every parameter
    assert out["losses"][-1] < out["losses"][0]
    # mlflow.pytorch.load_model works too (DESIGN.md's promise): the same logits at any batch size
    assert out["pytorch_flavour_is_module"]
    assert all(err < 1e-5 for err in out["pytorch_flavour_err_by_batch"].values()), out["pytorch_flavour_err_by_batch"]


SIDE_BY_SIDE = """
import json, sys
import mlflow, torch
a, b, user = sys.argv[1:4]
sys.path.insert(0, user)
import architectures, pruned_model  # the user's own modules of those names, imported first
assert architectures.WHOSE == pruned_model.WHOSE == "the user's"
x = torch.randn(5, 1, 8, 8)
out = []
for folder in (a, b, a):
    net = mlflow.pyfunc.load_model(folder).get_raw_model()
    with torch.no_grad():
        out.append([getattr(net, "built_by", "A"), getattr(net, "loaded_by", "A"), net(x).tolist()])
print(json.dumps(out))
"""


def test_models_whose_shipped_code_differs_load_side_by_side_each_by_its_own(trial_run, tmp_path):
    """MLflow puts a model's code/ first on sys.path but keeps a module already imported: a process
    that had imported a module named ``architectures`` (its own, or another model's copy) built the
    next model with that code, or failed ("module 'architectures' has no attribute 'build'"). Each
    model is now built by its own code/architectures.py, read by path; the user's modules of those
    names stay theirs. Oracle: a copy of the model whose shipped code marks what it builds."""
    import shutil

    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    register_trial_model(run_id, name="side", alias="champion")
    a = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/side@champion", dst_path=str(tmp_path / "a")))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    with open(b / "code" / "architectures.py", "a") as fh:  # model B: code of another version, which marks its models
        fh.write("\n_build_unmarked = build\n\ndef build(*args, **kwargs):\n    model = _build_unmarked(*args, **kwargs)\n"
                 "    model.built_by = 'B'\n    return model\n")  # fmt: skip
    from wavesweep import pruned_model

    mlmodel = yaml.safe_load((b / "MLmodel").read_text())  # and a loader of another version, named by its contents
    old = b / "code" / f"{mlmodel['flavors']['python_function']['loader_module']}.py"
    source = old.read_bytes() + (b"\n_load_unmarked = _load_pyfunc\n\ndef _load_pyfunc(data_path):\n"
                                 b"    model = _load_unmarked(data_path)\n    model.module.loaded_by = 'B'\n    return model\n")  # fmt: skip
    old.unlink()
    (b / "code" / f"{pruned_model.loader_module(source)}.py").write_bytes(source)
    mlmodel["flavors"]["python_function"]["loader_module"] = pruned_model.loader_module(source)
    (b / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    user = tmp_path / "user"
    user.mkdir()
    for name in ("architectures", "pruned_model"):
        (user / f"{name}.py").write_text("WHOSE = \"the user's\"\n")
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "-c", NO_WAVESWEEP + SIDE_BY_SIDE, str(a), str(b), str(user)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (by_a, la, logits_a), (by_b, lb, logits_b), (by_a_again, la2, logits_a_again) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [by_a, by_b, by_a_again] == [la, lb, la2] == ["A", "B", "A"]
    assert logits_a == logits_b == logits_a_again  # the same weights, whichever code built the module


def test_threads_loading_a_model_at_once_each_get_it_whole(trial_run, tmp_path):
    """The shipped architectures.py is run by path; a thread that found its module in sys.modules
    before another had finished running it got a module without ``build`` (3 of 5 runs failed with
    8 threads and a short switch interval). The first runs it whole, the others wait for it."""
    import threading

    from wavesweep import pruned_model
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    register_trial_model(run_id, name="threads", alias="champion")
    dl = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/threads@champion", dst_path=str(tmp_path / "dl")))
    code = dl / "code" / "architectures.py"
    errors, shapes = [], []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: the window wide open
    try:
        for attempt in range(5):
            code.write_text(code.read_text() + f"\n# attempt {attempt}\n")  # other contents: a module not yet run
            start = threading.Barrier(8)

            def load():
                start.wait()
                try:
                    shapes.append(tuple(pruned_model._load_pyfunc(str(dl / "data" / "data")).predict(np.zeros((2, 1, 8, 8))).shape))
                except Exception as exc:  # noqa: BLE001 - what a thread met is the finding
                    errors.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=load) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and shapes == [(2, 10)] * 40, errors[:3]


def test_registered_model_serves_as_base_weights(trial_run, tmp_path):
    """``--weights models:/NAME@alias`` reads the registered state dict (tensors only)."""
    from wavesweep import model_registry
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    register_trial_model(run_id, name="as-base", alias="champion")
    path, resolved = model_registry.weights_from_uri("models:/as-base@champion", tmp_path)
    assert resolved == "models:/as-base/1"  # the alias pinned to its version
    state, meta = models.read_weights(path)  # a weights file as `--weights FILE` reads it
    assert meta["checkpoint"]["user"]["trial"]["dataset"] == "digits"  # what the shipped checkpoint records
    dl = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/as-base@champion", dst_path=str(tmp_path / "dl")))
    saved = torch.load(next(dl.rglob("state_dict.pt")), weights_only=True)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)


def test_load_table_as_documented_and_no_metric_per_layer(trial_run):
    """``mlflow.load_table`` (MLflow's documented call, in the run's experiment) reads the per-layer
    table; per-layer numbers are series over the layer index, not one metric per layer name."""
    import pandas as pd

    _cfg, run_id = trial_run
    client = MlflowClient()
    run = client.get_run(run_id)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    table = mlflow.load_table("layers.json", run_ids=[run_id], extra_columns=["run_id"])
    csv = pd.read_csv(client.download_artifacts(run_id, "layers_dwt.csv"))
    assert list(table["name"]) == list(csv["name"]) and set(table["run_id"]) == {run_id}
    assert np.allclose(table["coeff_sparsity"], csv["coeff_sparsity"])
    every = mlflow.load_table("layers.json", extra_columns=["run_id"])  # the trial run and its 3 method runs
    assert every["run_id"].nunique() == 4 and len(every) == 4 * len(csv)
    kids = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    for r in [run, *kids]:
        assert not [k for k in r.data.metrics if k.startswith("layers/")]
        history = client.get_metric_history(r.info.run_id, "layer_coeff_sparsity")
        assert sorted(m.step for m in history) == list(range(len(csv)))


def _model_files(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, bytes]:
    folder = Path(client.download_artifacts(run_id, "registered-dwt", str(tmp)))
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_registering_again_reuses_the_version_and_never_rewrites_its_files(trial_run, tmp_path):
    """The same run and method under the same name: the same version (the alias moves), no second
    upload; under another name: a new version pointing at the files the first uploaded, which
    stay byte for byte as they were (before, each registration rewrote the run's folder)."""
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    client = MlflowClient()
    first = register_trial_model(run_id, name="twice", alias="champion")
    files = _model_files(client, run_id, tmp_path / "a")
    again = register_trial_model(run_id, name="twice", alias="again")
    other = register_trial_model(run_id, name="elsewhere", alias="champion")
    assert str(again.version) == str(first.version) == "1" and str(other.version) == "1"
    assert [str(mv.version) for mv in client.search_model_versions("name = 'twice'")] == ["1"]
    assert {k: str(v) for k, v in client.get_registered_model("twice").aliases.items()} == {"champion": "1", "again": "1"}
    assert other.source == first.source
    assert _model_files(client, run_id, tmp_path / "b") == files  # MLmodel's time and uuid included


def test_a_registration_stopped_after_its_version_was_created_is_listed_once_rerun(trial_run, monkeypatch):
    """A stop (Ctrl-C, SIGTERM) right after MLflow created the version left a model without its
    ``wavesweep`` tag: ``wavesweep models`` did not list it, and registering it again (which reuses
    the version) did not tag it either."""
    from wavesweep import model_registry
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    real = MlflowClient.create_model_version

    def create_then_stop(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_stop)
    with pytest.raises(KeyboardInterrupt):
        register_trial_model(run_id, name="halfway", alias="champion")
    monkeypatch.setattr(MlflowClient, "create_model_version", real)
    mv = register_trial_model(run_id, name="halfway", alias="champion")
    assert str(mv.version) == "1" and mv.aliases == ["champion"]
    listed = [(r["name"], str(r["version"]), r["aliases"]) for r in model_registry.list_registered()]
    assert listed == [("halfway", "1", ["champion"])]


def test_register_refuses_unfinished_runs_and_bad_names_before_registering_anything(trial_run):
    """A FAILED or KILLED run, an alias MLflow would refuse (checked against MLflow's own
    validators) and a name with '@' (read as an alias in models:/ URIs): one ValueError each and
    no registered model, where a bad alias used to leave a version without it."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    from wavesweep.names import check_alias
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    client = MlflowClient()
    for alias in ("bad alias!", "v3", "V12", "latest", "LATEST", "", "x" * 256, "champion", "a-b_c", "v3a", "é"):
        try:
            _validate_model_alias_name(alias)
            _validate_model_alias_name_reserved(alias)
            mlflow_ok = True
        except MlflowException:
            mlflow_ok = False
        if mlflow_ok:
            assert check_alias(alias) == alias
        else:
            with pytest.raises(ValueError, match="alias"):
                check_alias(alias)
    with pytest.raises(ValueError, match="alias 'bad alias!' is not valid"):
        register_trial_model(run_id, name="ok", alias="bad alias!")
    with pytest.raises(ValueError, match="alias 'v3' is reserved"):
        register_trial_model(run_id, name="ok2", alias="v3")
    with pytest.raises(ValueError, match="contains '@'"):
        register_trial_model(run_id, name="rev@x")
    with pytest.raises(ValueError, match=r"has no magnitude checkpoint \(it has: dwt\); .* save_baselines=true"):
        register_trial_model(run_id, name="mag", method="magnitude")  # MLflow's own download error before
    for status in ("FAILED", "KILLED"):
        client.set_terminated(run_id, status)
        with pytest.raises(ValueError, match=f"is {status}: only a FINISHED trial run can be registered"):
            register_trial_model(run_id, name="no")
    assert client.search_registered_models() == []


def test_register_names_the_status_of_a_run_mlflow_run_created_that_failed_before_wavesweep_tagged_it(workdir):
    """`mlflow run . -P wavelet=nope` leaves a FAILED run (reason in its `error` tag) without
    wavesweep's tags. Registering it said "not a wavesweep trial run (tag wavesweep.kind=None)";
    the README's rule is that only a FINISHED trial run can be registered, and the message says so."""
    from wavesweep.tracked_trial import register_trial_model

    client = MlflowClient()
    exp = client.create_experiment("wavesweep")
    for status, error in (("FAILED", "invalid parameters: unknown wavelet 'nope'"), ("KILLED", None)):
        run = client.create_run(exp, tags={"mlflow.project.entryPoint": "main", **({"error": error} if error else {})})
        client.set_terminated(run.info.run_id, status)
        with pytest.raises(ValueError) as err:
            register_trial_model(run.info.run_id, name="no")
        msg = str(err.value)
        assert f"is {status}" in msg and "only a FINISHED trial run can be registered" in msg, msg
        assert error is None or error in msg, msg
    assert client.search_registered_models() == []


def test_list_registered_reads_every_page(trial_run, monkeypatch):
    """`wavesweep models` listed the first page only (100 models by default): with pages of 2,
    all 5 models are listed."""
    from wavesweep import model_registry
    from wavesweep.tracked_trial import register_trial_model

    _cfg, run_id = trial_run
    for i in range(5):
        register_trial_model(run_id, name=f"m{i}", alias=None)
    real = MlflowClient.search_registered_models
    monkeypatch.setattr(MlflowClient, "search_registered_models",
                        lambda self, *a, max_results=100, **k: real(self, *a, max_results=min(max_results, 2), **k))  # fmt: skip
    assert sorted(r["name"] for r in model_registry.list_registered()) == [f"m{i}" for i in range(5)]


def test_an_empty_mlproject_default_reads_as_empty():
    """`mlflow run` logs an empty default as the shell's quoted empty string (shlex.quote), which the
    run keeps; the trial saw an empty value, and so does `register` (it looked for files under a
    folder named '')."""
    import shlex
    from types import SimpleNamespace

    from wavesweep import tracking

    quoted = shlex.quote("")
    run = SimpleNamespace(data=SimpleNamespace(params={"model": "cnn", "data_root": quoted, "weights": quoted, "dataset": "digits"}))
    cfg = tracking.trial_config_of(run)
    assert (cfg.data_root, cfg.weights, cfg.model) == ("", "", "cnn")


def test_a_tied_weight_is_saved_once_and_loads_tied():
    """The registered model's state dict (and a downloaded base model's) cloned every key, so a
    weight listed under two names (tied layers) was written twice and loaded untied."""
    import io

    import torch

    from wavesweep.model_registry import saved_copy

    a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    b.weight = a.weight
    sd = torch.nn.Sequential(a, b).state_dict()

    def size(obj) -> tuple[int, dict]:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return len(buf.getvalue()), torch.load(io.BytesIO(buf.getvalue()))

    ours, loaded = size(saved_copy(sd))
    untied, _ = size({k: v.clone() for k, v in sd.items()})
    once, _ = size({k: v.clone() for k, v in sd.items() if k != "1.weight"})  # the oracle: the tensor written once
    assert abs(ours - once) < 200 and untied - ours >= 64 * 64 * 4
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert loaded["0.weight"].untyped_storage().data_ptr() == loaded["1.weight"].untyped_storage().data_ptr()
    view = {"w": torch.arange(1000.0)[:10]}  # a view saves its own 10 values, not the 1000 behind it
    assert size(saved_copy(view))[0] < size(view)[0] - 3000


def test_a_method_runs_id_registers_that_methods_model(trial_run, capsys):
    """`wavesweep register` takes a trial run id "or one of its method runs", but given the
    magnitude run's id it registered the trial's dwt model (version tag method=dwt, dwt's top-1)
    and printed "registered ... from run <the magnitude run>". A method run's id now picks its
    method: the magnitude run of a trial without save_baselines has no magnitude model to register
    (one line, exit 2, nothing registered); one with save_baselines registers the magnitude model;
    a --method that contradicts the run is refused."""
    import dataclasses

    from wavesweep import cli
    from wavesweep.tracked_trial import register_trial_model, run_tracked_trial

    cfg, run_id = trial_run
    client = MlflowClient()
    kids = {r.data.tags["method"]: r.info.run_id
            for r in client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")}  # fmt: skip
    assert cli.main(["register", kids["magnitude"], "--name", "mag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no magnitude checkpoint (it has: dwt)" in err[0], err
    assert client.search_registered_models() == []
    with pytest.raises(ValueError, match=f"run {kids['magnitude']} is the magnitude run of trial run {run_id}"):
        register_trial_model(kids["magnitude"], name="mag", method="dwt")
    assert client.search_registered_models() == []
    capsys.readouterr()
    assert cli.main(["register", kids["dwt"], "--name", "dwt-model"]) == 0
    assert client.get_model_version("dwt-model", "1").tags["method"] == "dwt"
    # the run the model came from, and the id given (it said "from run <the dwt method run>")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"registered dwt-model version 1 alias champion from trial run {run_id} (given {kids['dwt']})", out
    assert client.get_model_version("dwt-model", "1").tags["source_run_id"] == run_id

    _result, both = run_tracked_trial(dataclasses.replace(cfg, save_baselines=True))
    mag_run = client.search_runs([client.get_run(both).info.experiment_id],
                                 f"tags.`mlflow.parentRunId` = '{both}' and tags.method = 'magnitude'")[0]  # fmt: skip
    assert cli.main(["register", mag_run.info.run_id, "--name", "mag"]) == 0
    tags = client.get_model_version("mag", "1").tags
    assert tags["method"] == "magnitude" and tags["checkpoint"] == "magnitude.wsz"
    assert float(tags["top1"]) == mag_run.data.metrics["top1"]


def test_a_run_registers_where_its_dataset_is_not(workdir, tmp_path, capsys):
    """Registering rebuilds the model from the run's checkpoint; the data only gave the input
    example. A trial on files at its data_root could not be registered once they were not there
    (another machine, a moved folder): the one-line error said to pass --data-root, an option
    `wavesweep register` does not have. Now the version is made, with an input example of the
    model's input shape, and its model is the one the trial evaluated (oracle: predictions.csv)."""
    import pandas as pd

    from tests.test_data import make_idx_set
    from wavesweep import cli
    from wavesweep.tracked_trial import run_tracked_trial

    data = tmp_path / "mnist"
    make_idx_set(data, n_train=30, n_test=20)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(models.build_model("cnn", num_classes=10, in_channels=1, image_size=28).state_dict(), weights)
    cfg = TrialConfig.from_mapping({"model": "cnn", "dataset": "mnist", "data_root": str(data), "weights": str(weights),
                                    "timing_batches": 0, "recovery": "none", "wavelet": "haar", "level": 2, "percentile": 60})  # fmt: skip
    _result, run_id = run_tracked_trial(cfg)
    moved = data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["register", run_id, "--name", "no-data-here"]) == 0, capsys.readouterr().err
    client = MlflowClient()
    mv = client.get_model_version_by_alias("no-data-here", "champion")
    assert mv.run_id == run_id and mv.tags["method"] == "dwt"
    info = mlflow.models.get_model_info("models:/no-data-here@champion")
    assert json.loads(info.signature.inputs.to_json())[0]["tensor-spec"]["shape"] == [-1, 1, 28, 28]
    net = mlflow.pyfunc.load_model("models:/no-data-here@champion").get_raw_model()
    _, eval_set = load_eval_set(TrialConfig.from_mapping({**cfg.to_dict(), "data_root": str(moved)}))
    x = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    preds = pd.read_csv(client.download_artifacts(run_id, "predictions.csv", str(tmp_path)))
    with torch.no_grad():
        assert np.array_equal(net(x).argmax(1).numpy(), preds["dwt"].to_numpy())


def test_a_registered_model_of_another_dataset_is_refused_as_base_weights(trial_run, tmp_path):
    """A weights file wavesweep made for another dataset is refused (a digits cnn loads on any
    1-channel 10-class set and would be recorded as that set's base model at chance accuracy),
    but the same model given as ``models:/NAME@alias`` or as the run's ``checkpoints/dwt.wsz`` by
    ``runs:/`` ran: the cache kept only its state dict, not what it records. Oracle: the version's
    dataset tag and the run's params, read with the MLflow client."""
    from tests.test_data import make_idx_set
    from wavesweep.tracked_trial import register_trial_model, run_tracked_trial

    cfg, run_id = trial_run
    register_trial_model(run_id, name="digits-model", alias="champion")
    client = MlflowClient()
    trained_on = client.get_model_version("digits-model", "1").tags["dataset"]
    assert trained_on == client.get_run(run_id).data.params["dataset"] == "digits"
    data = tmp_path / "mnist"
    make_idx_set(data, n_train=30, n_test=20)
    for uri in ("models:/digits-model@champion", f"runs:/{run_id}/checkpoints/dwt.wsz"):
        other = TrialConfig.from_mapping({**cfg.to_dict(), "dataset": "mnist", "data_root": str(data), "weights": uri})
        with pytest.raises(ValueError) as ei:
            run_tracked_trial(other)
        pinned = "models:/digits-model/1" if uri.startswith("models:/") else uri
        assert str(ei.value).startswith(f"{pinned} holds a model for dataset {trained_on!r}, not 'mnist'"), ei.value
    failed = client.search_runs([client.get_run(run_id).info.experiment_id], "attributes.status = 'FAILED' and tags.method = 'trial'")
    assert len(failed) == 2 and all("holds a model for dataset 'digits'" in r.data.tags["error"] for r in failed)
    # the same model on its own dataset still serves as the base (positive control)
    _result, ok = run_tracked_trial(TrialConfig.from_mapping({**cfg.to_dict(), "weights": "models:/digits-model@champion"}))
    assert client.get_run(ok).data.params["base_uri"] == "models:/digits-model/1"


def test_a_run_with_one_evaluation_example_registers_with_a_free_batch_axis(workdir, shared_cache):
    """The input example is min(2, len(eval set)) of the evaluation inputs: one for a trial run
    with ``eval_limit=1``. torch.export specializes a size-1 axis, so exporting the pytorch
    flavour with ``Dim("batch", min=1)`` raised 'Constraints violated (batch)!' and the run could
    not be registered at all. Oracle: the pyfunc module's logits, at batch sizes 1 and 3."""
    from wavesweep.tracked_trial import register_trial_model, run_tracked_trial

    base = train.get_base_model("cnn", "digits", seed=0, cache_root=shared_cache, progress=False,
                                train_config=train.TrainConfig(epochs=1, batch_size=64, lr=1e-2))  # fmt: skip
    cfg = TrialConfig.from_mapping({"model": "cnn", "weights": str(base.path), "eval_limit": 1, "timing_batches": 0,
                                    "recovery": "none", "wavelet": "haar", "level": 2, "percentile": 60})  # fmt: skip
    _result, run_id = run_tracked_trial(cfg)
    register_trial_model(run_id, name="one-example", alias="champion")
    info = mlflow.models.get_model_info("models:/one-example@champion")
    assert json.loads(info.signature.inputs.to_json())[0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]
    net = mlflow.pyfunc.load_model("models:/one-example@champion").get_raw_model()
    exported = mlflow.pytorch.load_model("models:/one-example@champion")
    torch.manual_seed(0)
    for b in (1, 3):
        x = torch.randn(b, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(exported(x), net(x), atol=1e-5), b


def test_an_alias_or_latest_uri_with_a_path_is_pinned_with_its_path(workdir, tmp_path):
    """``resolve_model_uri`` dropped the path after an alias (``models:/NAME@alias/PATH`` became
    ``models:/NAME/VERSION``, the whole model: a model with two weights files was refused as
    "several weights files ... give the one to use", the one given), and pinned ``latest`` only
    spelt so and without a path: ``models:/NAME/Latest`` (MLflow reads it as latest) and
    ``models:/NAME/latest/PATH`` stayed unpinned, so the cache keyed by URI served version 1
    after version 2 was registered. Oracle: the state dicts written, and MLflow's own download
    of ``models:/NAME/2``."""
    from tests.test_integrity import _cnn_state, _register_state_dict
    from wavesweep import model_registry, tracking

    tracking.init_tracking()
    c, cache = MlflowClient(), tmp_path / "cache"
    _register_two_folders(c, tmp_path)
    c.set_registered_model_alias("two", "champion", "1")
    for sub, seed in (("a", 1), ("b", 2)):
        path, resolved = model_registry.weights_from_uri(f"models:/two@champion/{sub}/weights.pt", cache)
        assert resolved == f"models:/two/1/{sub}/weights.pt"
        state, _ = models.read_weights(path)
        assert all(torch.equal(state[k], v) for k, v in _cnn_state(seed).items()), sub

    _register_state_dict("b", _cnn_state(1), tmp_path)
    uris = ("models:/b/latest", "models:/b/Latest", "models:/b/LATEST/weights.pt", "models:/b/latest/weights.pt")
    for uri in uris:
        model_registry.weights_from_uri(uri, cache)  # version 1, cached
    _register_state_dict("b", _cnn_state(2), tmp_path)
    v2 = torch.load(next(Path(mlflow.artifacts.download_artifacts("models:/b/2", dst_path=str(tmp_path / "v2"))).rglob("weights.pt")),
                    weights_only=True)  # fmt: skip
    for uri in uris:
        path, resolved = model_registry.weights_from_uri(uri, cache)
        assert resolved == "models:/b/2" + uri[len("models:/b/latest") :], (uri, resolved)
        state, _ = models.read_weights(path)
        assert all(torch.equal(state[k], v) for k, v in v2.items()), uri


def test_a_download_that_cannot_finish_leaves_dst_as_it_was(workdir, tmp_path, capsys, monkeypatch):
    """``download`` promises that a failed download leaves ``--dst`` as it was, but it moved the
    files in one by one and stopped at the first that could not go: with a file ``b`` in ``--dst``
    where the model has a folder ``b/``, ``a/weights.pt`` stayed behind beside the error
    "[Errno 20] Not a directory"; a ``--dst`` that is a file gave a FileExistsError traceback; and
    a move cut short (a full disk) left what was moved before it. Oracle: the folder's files."""
    import errno
    import shutil

    from tests.test_integrity import _one_line_error
    from wavesweep import cli, model_registry, tracking

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the download's bars: not the error's lines
    tracking.init_tracking()
    c = MlflowClient()
    _register_two_folders(c, tmp_path)

    def files(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    out = workdir / "out"
    out.mkdir()
    (out / "b").write_text("mine")
    for force in ([], ["--force"]):
        err = _one_line_error(capsys, cli.main(["download", "models:/two/1", "--dst", "out", *force]))
        assert err == "wavesweep: error: out/b is a file where the download of models:/two/1 needs a folder: give another --dst or move it"
        assert files(out) == {"b": b"mine"} and sorted(p.name for p in out.iterdir()) == ["b"]
    (workdir / "afile").write_text("mine")
    err = _one_line_error(capsys, cli.main(["download", "models:/two/1", "--dst", "afile/sub"]))
    assert err.startswith("wavesweep: error: afile is a file where the download"), err
    assert (workdir / "afile").read_text() == "mine"
    (out / "b").unlink()
    (out / "a").mkdir()
    (out / "a" / "weights.pt").mkdir()
    err = _one_line_error(capsys, cli.main(["download", "models:/two/1", "--dst", "out", "--force"]))
    assert err.startswith("wavesweep: error: out/a/weights.pt is a folder where the download"), err
    (out / "a" / "weights.pt").rmdir()

    real, calls = shutil.move, []

    def full_disk(src, target, *a, **k):
        calls.append(target)
        if len(calls) == 2:
            Path(target).write_bytes(b"part")  # a copy cut short
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, target, *a, **k)

    monkeypatch.setattr(shutil, "move", full_disk)
    (out / "keep.txt").write_text("mine")
    for dst in (out, workdir / "new" / "deeper"):
        calls.clear()
        before = files(out)
        with pytest.raises(OSError, match="No space left"):
            model_registry.download("models:/two/1", dst)
        assert len(calls) == 2 and files(out) == before == {"keep.txt": b"mine"}
        assert sorted(p.name for p in out.rglob("*")) == ["a", "keep.txt"]  # the folder that was there before
        assert not (workdir / "new").exists()
    monkeypatch.setattr(shutil, "move", real)
    got = model_registry.download("models:/two/1", out)  # the positive control
    assert got == out and files(out)["b/weights.pt"] == (tmp_path / "two" / "b" / "weights.pt").read_bytes()


def _register_two_folders(c: MlflowClient, tmp_path: Path):
    """Version 1 of registered model ``two``: a run's ``model`` folder with ``a/weights.pt`` and
    ``b/weights.pt`` (cnn state dicts of seeds 1 and 2). Returns the run."""
    from tests.test_integrity import _cnn_state

    folder = tmp_path / "two"
    for sub, seed in (("a", 1), ("b", 2)):
        (folder / sub).mkdir(parents=True)
        torch.save(_cnn_state(seed), folder / sub / "weights.pt")
    run = c.create_run(c.get_experiment_by_name("wavesweep").experiment_id)
    c.log_artifacts(run.info.run_id, str(folder), "model")
    c.set_terminated(run.info.run_id)
    c.create_registered_model("two")
    c.create_model_version("two", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return run
