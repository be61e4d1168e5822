"""Nothing lost, nothing silently wrong: corrupt checkpoints through the CLI,
unsafe model URIs, aliases that move, non-finite weights, and one-line errors for hostile inputs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from tests.conftest import subprocess_env
from wavesweep import checkpoint, cli, failures, model_registry, models, tracking, train
from wavesweep import pruning as P
from wavesweep import wavelets as wv
from wavesweep.config import TrialConfig

DIGITS = {"num_classes": 10, "in_channels": 1, "image_size": 8}
TINY = {"model": "cnn", "eval_limit": 100, "timing_batches": 0, "recovery": "none"}


def _cnn_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return models.build_model("cnn", **DIGITS).state_dict()


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("wavesweep: error: "), err
    assert "Traceback" not in err
    return err


def _register_state_dict(name: str, state: dict[str, torch.Tensor], tmp: Path) -> str:
    """Register ``state`` (a plain state-dict file) as a new version of ``name``; returns the version."""
    c = MlflowClient()
    folder = tmp / f"sd-{name}-{len(list(tmp.glob('sd-*')))}"
    folder.mkdir()
    torch.save(state, folder / "weights.pt")
    exp = c.get_experiment_by_name("wavesweep") or c.get_experiment(c.create_experiment("wavesweep"))
    run = c.create_run(exp.experiment_id)
    c.log_artifacts(run.info.run_id, str(folder), "model")
    c.set_terminated(run.info.run_id)
    try:
        c.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # exists
    return c.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version


# --------------------------------------------------------------------------- 6: corrupt checkpoint, register


@pytest.mark.slow  # a subprocess or a fresh MLflow store: seconds, not milliseconds
def test_register_refuses_a_checkpoint_with_a_flipped_header_bit(workdir, capsys):
    tracking.init_tracking()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        res = P.prune_dwt(models.build_model("cnn", **DIGITS), wavelet="bior1.3", level=1, percentile=50, layout="filter")
    folder = workdir / "ckpt"
    checkpoint.save_compressed(res, folder / "dwt.wsz")
    data = bytearray((folder / "dwt.wsz").read_bytes())
    at = data.index(b'"bior1.3"', checkpoint.HEADER_FIXED_BYTES) + 7
    data[at] ^= 0x02  # bior1.3 -> bior1.1 in the metadata: before version 2 this loaded as another model
    (folder / "dwt.wsz").write_bytes(bytes(data))
    c = MlflowClient()
    exp = c.get_experiment_by_name("wavesweep").experiment_id
    run_id = c.create_run(exp, tags={"wavesweep.kind": "trial", "method": "trial"}).info.run_id
    params = {k: str(v) for k, v in TrialConfig(**{**TINY, "wavelet": "bior1.3", "level": 1}).to_dict().items()}
    params |= {f"base_{k}": str(v) for k, v in DIGITS.items()}
    tracking.log_batch(c, run_id, params=params)
    c.log_artifacts(run_id, str(folder), tracking.CHECKPOINT_DIR)
    c.set_terminated(run_id)
    capsys.readouterr()
    err = _one_line_error(capsys, cli.main(["register", run_id, "--name", "corrupt"]))
    assert f"runs:/{run_id}/checkpoints/dwt.wsz: corrupt: file CRC-32 mismatch" in err
    assert "/tmp" not in err  # the artifact is named, not the temporary download folder
    assert c.search_registered_models() == []


# --------------------------------------------------------------------------- 7: no pickles from URIs


class _Marker:
    """Unpickling this creates a file: the stand-in for code a pickle runs on the worker."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Evil(nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.payload = _Marker(marker)


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_pickle_format_registered_model_is_refused_without_running_its_code(workdir, capsys):
    tracking.init_tracking()
    marker = workdir / "pwned"
    with mlflow.start_run():
        mlflow.pytorch.log_model(_Evil(str(marker)), name="m", serialization_format="pickle",
                                 registered_model_name="evil", pip_requirements=["torch"])  # fmt: skip
    marker.unlink(missing_ok=True)
    capsys.readouterr()
    with pytest.raises(ValueError) as ei:
        model_registry.weights_from_uri("models:/evil/1", workdir / "cache")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("models:/evil/1 (data/model.pth): a pickle") and "weights_only" in msg
    assert not marker.exists()
    capsys.readouterr()  # MLflow's download bars of the call above (the CLI turns them off for itself)
    # the same through the CLI: one line, exit 2, and still no code run
    code = cli.main(["trial", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], "--weights", "models:/evil/1"])
    err = _one_line_error(capsys, code)
    assert err.startswith("wavesweep: error: models:/evil/1 (data/model.pth): a pickle") and not marker.exists()
    code = cli.main(["trial", "--model", "cnn", "--weights", "models:/evil@nosuch"])
    assert _one_line_error(capsys, code) == "wavesweep: error: models:/evil@nosuch: unknown alias of evil 'nosuch'; valid: (none set)"
    mlflow.pytorch.load_model("models:/evil/1")  # the positive control: MLflow's loader does run it
    assert marker.exists()


# --------------------------------------------------------------------------- 8: aliases


@pytest.mark.slow
def test_alias_moved_between_two_trials_gives_two_base_checksums(workdir, tmp_path):
    from wavesweep.tracked_trial import run_tracked_trial

    tracking.init_tracking()
    v1 = _register_state_dict("base", _cnn_state(1), tmp_path)
    v2 = _register_state_dict("base", _cnn_state(2), tmp_path)
    c = MlflowClient()
    cfg = TrialConfig.from_mapping({**TINY, "weights": "models:/base@champion"})
    seen = []
    for version in (v1, v2):
        c.set_registered_model_alias("base", "champion", version)
        result, run_id = run_tracked_trial(cfg)
        params = c.get_run(run_id).data.params
        assert params["base_uri"] == f"models:/base/{version}" and params["weights"] == "models:/base@champion"
        assert params["base_checksum"] == result.base.checksum == train.file_sha256(result.base.path)
        seen.append(params["base_checksum"])
    assert seen[0] != seen[1]


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_alias_resolves_before_the_cache(workdir, tmp_path):
    tracking.init_tracking()
    v1 = _register_state_dict("b", _cnn_state(1), tmp_path)
    v2 = _register_state_dict("b", _cnn_state(2), tmp_path)
    c, cache = MlflowClient(), tmp_path / "cache"
    c.set_registered_model_alias("b", "a", v1)
    p1, u1 = model_registry.weights_from_uri("models:/b@a", cache)
    c.set_registered_model_alias("b", "a", v2)
    p2, u2 = model_registry.weights_from_uri("models:/b@a", cache)
    assert (u1, u2) == ("models:/b/1", "models:/b/2") and p1 != p2
    assert torch.equal(torch.load(p2, weights_only=True)["features.0.weight"], _cnn_state(2)["features.0.weight"])
    assert model_registry.weights_from_uri("models:/b/latest", cache)[1] == "models:/b/2"


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_a_missing_version_or_a_bare_name_lists_the_versions_and_aliases(workdir, tmp_path, capsys):
    """``models:/b/7`` of a model with versions 1 and 2 said only "Model Version (name=b, version=7)
    not found", and ``models:/b`` (no version, no alias) "Logged model with ID 'b' not found", though
    b exists: neither named what there is. Oracle: the registry's own versions and aliases."""
    tracking.init_tracking()
    for seed in (1, 2):
        _register_state_dict("b", _cnn_state(seed), tmp_path)
    c = MlflowClient()
    c.set_registered_model_alias("b", "champion", "2")
    versions = ", ".join(sorted(str(mv.version) for mv in c.search_model_versions("name = 'b'")))
    assert versions == "1, 2"
    for call in (lambda u: model_registry.download(u, tmp_path / "dl"), lambda u: model_registry.weights_from_uri(u, tmp_path / "cache")):
        with pytest.raises(ValueError) as ei:
            call("models:/b/7")
        assert str(ei.value).endswith(f"models:/b/7: unknown version of b '7'; valid: {versions}"), ei.value
        with pytest.raises(ValueError) as ei:
            call("models:/b")
        msg = str(ei.value)
        assert f"models:/b/VERSION (versions: {versions})" in msg and "models:/b@ALIAS (aliases: champion)" in msg, msg
    capsys.readouterr()
    code = cli.main(["trial", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], "--weights", "models:/b/7"])
    err = _one_line_error(capsys, code)
    assert err == f"wavesweep: error: models:/b/7: unknown version of b '7'; valid: {versions}"
    failed = c.search_runs([c.get_experiment_by_name("wavesweep").experiment_id], "tags.method = 'trial'")
    assert [r.info.status for r in failed] == ["FAILED"] and f"valid: {versions}" in failed[0].data.tags["error"]
    assert not (tmp_path / "dl").exists()


def _registered_weights(uri: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The oracle: the weights file of ``uri`` as MLflow itself downloads it."""
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
    return torch.load(next(folder.rglob("weights.pt")), weights_only=True)


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_a_registered_model_made_again_is_not_served_the_deleted_ones_weights(workdir, tmp_path):
    """A registered model deleted and made again numbers its versions from 1 anew: its
    ``models:/NAME/1`` is other weights, and the cache must not serve the deleted version's."""
    tracking.init_tracking()
    c, cache = MlflowClient(), tmp_path / "cache"
    assert str(_register_state_dict("b", _cnn_state(1), tmp_path)) == "1"
    p1, _ = model_registry.weights_from_uri("models:/b/1", cache)
    c.delete_registered_model("b")
    assert str(_register_state_dict("b", _cnn_state(2), tmp_path)) == "1"  # MLflow numbers it 1 again
    p2, u2 = model_registry.weights_from_uri("models:/b/1", cache)
    expected = _registered_weights("models:/b/1", tmp_path / "oracle")
    got = models.read_weights(p2)[0]
    assert u2 == "models:/b/1" and p1 != p2
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(got["features.0.weight"], _cnn_state(1)["features.0.weight"])


_SAME_NAME_CHILD = """
import sys
from pathlib import Path
from tests.test_integrity import _cnn_state, _register_state_dict, _registered_weights
from wavesweep import model_registry, models, tracking
seed, tmp = int(sys.argv[1]), Path(sys.argv[2])
tracking.set_tracking_uri()
tracking.init_tracking()
assert str(_register_state_dict("b", _cnn_state(seed), tmp)) == "1"
path, _ = model_registry.weights_from_uri("models:/b/1", Path(sys.argv[3]))
got, expected = models.read_weights(path)[0], _registered_weights("models:/b/1", tmp / "oracle")
print(max(float((got[k].float() - expected[k].float()).abs().max()) for k in expected))
"""


@pytest.mark.slow  # two child processes
def test_two_projects_default_stores_do_not_share_cached_weights(tmp_path, shared_cache):
    """Two working directories, each with MLflow's default store (``sqlite:///mlflow.db``, a
    relative path) and one cache (``~/.cache/wavesweep``): each project's ``models:/b/1`` is its
    own registered weights, not the other project's cached under the same URI."""
    cache = tmp_path / "cache"
    for seed in (1, 2):
        project = tmp_path / f"project{seed}"
        project.mkdir()
        env = subprocess_env(project, shared_cache, fresh_store=True)
        del env["MLFLOW_TRACKING_URI"]  # the default store of the working directory
        out = subprocess.run([sys.executable, "-c", _SAME_NAME_CHILD, str(seed), str(project), str(cache)], cwd=project,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert (project / "mlflow.db").is_file()
        assert float(out.stdout.strip().splitlines()[-1]) == 0.0, f"project {seed} got other weights than its registry holds"


# --------------------------------------------------------------------------- 12: non-finite weights


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_base_weights_are_refused_naming_the_tensor(workdir, tmp_path, bad):
    state = _cnn_state(0)
    state["features.3.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"tensor 'features\.3\.weight' has 1 NaN or infinite value"):
        train.get_base_model("cnn", "digits", weights=path)
    tracking.init_tracking()  # the same weights registered and given by URI
    _register_state_dict("nan", state, tmp_path)
    with pytest.raises(ValueError, match=r"^models:/nan/1 \(weights\.pt\): tensor 'features\.3\.weight'"):
        model_registry.weights_from_uri("models:/nan/1", tmp_path / "cache")


def test_non_finite_wsz_weights_are_refused(tmp_path):
    state = _cnn_state(0)
    state["fc.bias"][3] = float("nan")
    model = models.build_model("cnn", **DIGITS)
    model.load_state_dict(state)
    res = P.prune_magnitude(model, 0.5)
    checkpoint.save_compressed(res, tmp_path / "m.wsz")
    with pytest.raises(ValueError, match=r"tensor 'fc\.bias' has 1 NaN"):
        train.get_base_model("cnn", "digits", weights=tmp_path / "m.wsz")


# --------------------------------------------------------------------------- 11: spec parsing limits

_SPEC_TAIL = "space: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n"
BILLION_LAUGHS = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    + ["study: laughs", "description: *a9"]
) + "\n"  # 12 lines; 9**10 nodes once expanded


@pytest.mark.parametrize(
    "content, needles",
    [
        (BILLION_LAUGHS.encode(), ["bad.yaml:", "expands to over 100000 YAML nodes"]),
        (("study: deep\nfixed: " + "[" * 5000 + "]" * 5000 + "\n" + _SPEC_TAIL).encode(), ["bad.yaml:2", "nested deeper than 50 levels"]),
        (("study: deep\nfixed:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 5000)) + _SPEC_TAIL).encode(), ["bad.yaml:", "nested deeper than 50"]),
        (b"study: x\n" + _SPEC_TAIL.encode() + b"description: caf\xe9\n", ["bad.yaml:5", "not UTF-8", "0xe9"]),
        (b"study: x\nsampler: {name: grid}\nspace:\n  percentile: {low: 0, high: 100, step: 1.0e-9}\nobjectives: {top1: maximize}\n",
         ["bad.yaml:4", "space.percentile.step", "1e+11 grid points", "limit of 100000"]),
        (b"study: x\nsampler: {name: grid}\nspace:\n  percentile: {low: 0, high: 100, step: 0.01}\n  level: [1, 2, 3, 4, 5]\n"
         b"  wavelet: [haar, db2, db4]\nobjectives: {top1: maximize}\n", ["space", "150015 points (10001 x 5 x 3)", "limit of 100000"]),
        (("study: x\nsampler: {name: tpe, n_startup_trials: x}\n" + _SPEC_TAIL).encode(),
         ["bad.yaml:2", "sampler.n_startup_trials", "n_startup_trials='x' must be integer"]),
        (("study: x\nsampler: {name: tpe, multivariate: 3}\n" + _SPEC_TAIL).encode(), ["sampler.multivariate", "true/false"]),
        (("study: x\npruner: {name: median, n_warmup_steps: 1.5}\n" + _SPEC_TAIL).encode(), ["pruner.n_warmup_steps", "must be integer"]),
        (("study: x\nsampler: {name: nsga2, crossover_prob: yes}\n" + _SPEC_TAIL).encode(), ["crossover_prob=True", "number"]),
        (("study: x\nsampler: {name: random, n_startup_trials: 3}\n" + _SPEC_TAIL).encode(),
         ["bad.yaml:2", "unknown RandomSampler option 'n_startup_trials': it takes none here (name and seed aside)"]),
        # a NaN step was "cannot convert float NaN to integer", naming neither the file, the key nor the value
        (b"study: x\nspace:\n  percentile: {low: 10, high: 90, step: .nan}\nobjectives: {top1: maximize}\nn_trials: 2\n",
         ["bad.yaml:3", "space.percentile.step", "step=nan must be a positive number"]),
        (b"study: x\nspace:\n  finetune_lr: {low: 0.001, high: 0.01, step: .inf}\nobjectives: {top1: maximize}\nn_trials: 2\n",
         ["bad.yaml:3", "space.finetune_lr.step", "step=inf must be a positive number"]),
    ],
    ids=["billion-laughs", "deep-flow", "deep-block", "latin-1", "grid-step", "grid-product", "startup-x", "bool", "int", "float",
         "no-options", "nan-step", "inf-step"],
)
def test_spec_resource_limits_are_one_line_errors(workdir, capsys, content, needles):
    import time

    (workdir / "bad.yaml").write_bytes(content)
    t0 = time.perf_counter()
    err = _one_line_error(capsys, cli.main(["study", "bad.yaml", "-q"]))
    assert time.perf_counter() - t0 < 10  # fails fast, before building anything large
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (workdir / "optuna.db").exists()


def test_aliases_within_the_bounds_still_work(workdir):
    from wavesweep import study

    (workdir / "ok.yaml").write_text("study: ok\nfixed: &f {mode: symmetric}\n" + _SPEC_TAIL + "description: x\n")
    assert study.load_spec(workdir / "ok.yaml").fixed == {"mode": "symmetric", "timing_batches": 0, "val_fraction": 0.5}  # study defaults: no timing, a validation part
    (workdir / "ok.yaml").write_text("study: ok\nsampler: {name: tpe, n_startup_trials: 3, multivariate: true, prior_weight: 2}\n" + _SPEC_TAIL)
    assert study.load_spec(workdir / "ok.yaml").sampler_options == {"n_startup_trials": 3, "multivariate": True, "prior_weight": 2}


# --------------------------------------------------------------------------- 10: paths and names


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_registered_name_with_a_quote_does_not_break_models(workdir, tmp_path, capsys):
    tracking.init_tracking()
    c = MlflowClient()
    for name in ("it's", "plain"):
        _register_state_dict(name, _cnn_state(0), tmp_path)
        c.set_registered_model_tag(name, "wavesweep", "true")
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "it's v1 aliases=-" in out and "plain v1 aliases=-" in out
    err = _one_line_error(capsys, cli.main(["register", "0" * 32, "--name", "bad'name"]))
    assert "registered model name \"bad'name\" is not a valid name" in err


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_download_refuses_to_overwrite_without_force(workdir, tmp_path, capsys):
    tracking.init_tracking()
    _register_state_dict("dl", _cnn_state(0), tmp_path)
    dst = workdir / "out"
    dst.mkdir()
    (dst / "weights.pt").write_text("mine")
    err = _one_line_error(capsys, cli.main(["download", "models:/dl/1", "--dst", "out"]))
    assert "out/weights.pt exists (1 file(s) would be overwritten); pass --force" in err
    assert (dst / "weights.pt").read_text() == "mine"
    assert cli.main(["download", "models:/dl/1", "--dst", "out", "--force"]) == 0
    assert torch.equal(torch.load(dst / "weights.pt", weights_only=True)["fc.bias"], _cnn_state(0)["fc.bias"])


def test_read_only_commands_create_no_store_experiment_or_folder(workdir, capsys):
    assert cli.main(["models"]) == 0
    assert "no registered wavesweep models" in capsys.readouterr().out
    err = _one_line_error(capsys, cli.main(["download", "models:/nope/1", "--dst", "d"]))
    assert "no MLflow store at" in err
    # register reads a run before it writes anything: no store, no run (it made mlflow.db, then
    # failed with MLflow's "Run with id=... not found", naming no store)
    err = _one_line_error(capsys, cli.main(["register", "0123abcd", "--name", "x"]))
    assert f"no MLflow store at sqlite:///{(workdir / 'mlflow.db').resolve()}: no run 0123abcd to register" in err
    assert sorted(p.name for p in workdir.iterdir()) == []  # no mlflow.db, lock file, mlruns/ or d/


def test_register_of_a_run_the_store_does_not_hold_names_the_store(workdir, capsys):
    tracking.init_tracking()  # a store with the wavesweep experiment, without that run
    err = _one_line_error(capsys, cli.main(["register", "0123abcd", "--name", "x"]))
    assert f"no run 0123abcd in the MLflow store sqlite:///{(workdir / 'mlflow.db').resolve()}" in err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_normal_modes(tmp_path, umask, mode):
    from wavesweep.fileio import atomic_write

    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f.bin") as fh:
            fh.write(b"x")
        res = P.prune_magnitude(nn.Sequential(nn.Conv2d(1, 2, 3)), 0.5)
        checkpoint.save_compressed(res, tmp_path / "c.wsz")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "c.wsz").stat().st_mode & 0o777 == mode


def test_a_write_killed_outright_leaves_a_file_the_next_write_removes(tmp_path):
    """kill -9 during atomic_write left its hidden temporary file for good (a base model's: 45-100
    MB in the cache, one per kill). A real process is killed mid-write; the next write of the same
    file removes its leftover once it is ORPHAN_AGE_S old, and leaves a live process's, another
    host's, another file's and a recent one."""
    import signal
    import subprocess
    import sys
    import time

    from wavesweep import fileio

    target = tmp_path / "results.md"
    code = ("import sys, time; from wavesweep.fileio import atomic_write\n"
            "with atomic_write(sys.argv[1], 'w') as fh:\n    fh.write('half'); fh.flush(); print('writing', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    (killed,) = tmp_path.glob(".results.md.*.tmp")
    assert f".{fileio._HOST}-{p.pid}." in killed.name
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    host = fileio._HOST
    live = tmp_path / f".results.md.{host}-{os.getpid()}.abc123.tmp"  # this process: alive
    other_host = tmp_path / f".results.md.{host}x-{p.pid}.abc123.tmp"
    other_file = tmp_path / f".other.md.{host}-{p.pid}.abc123.tmp"
    recent = tmp_path / f".results.md.{host}-{p.pid}.recent1.tmp"  # the dead pid's, written just now
    old = time.time() - fileio.ORPHAN_AGE_S - 5
    for f in (live, other_host, other_file):
        f.write_text("x")
        os.utime(f, (old, old))
    os.utime(killed, (old, old))
    recent.write_text("x")
    with fileio.atomic_write(target, "w") as fh:
        fh.write("whole")
    assert target.read_text() == "whole"
    assert not killed.exists()
    assert all(f.exists() for f in (live, other_host, other_file, recent))


# --------------------------------------------------------------------------- 9: secrets


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_credentials_are_redacted_in_params_tags_errors_and_logs(workdir, capsys, caplog):
    from wavesweep.redact import RedactingFilter, redact

    url = "postgresql://user:s3cret@db.example:5432/optuna"
    assert redact(url) == "postgresql://user:***@db.example:5432/optuna"
    assert redact("https://h/x?token=abc&y=1") == "https://h/x?token=***&y=1"
    assert redact("sqlite:///optuna.db user@host") == "sqlite:///optuna.db user@host"
    client, exp = tracking.init_tracking()
    run_id = client.create_run(exp).info.run_id
    tracking.log_batch(client, run_id, params={"storage": url}, tags={"optuna.storage": url, "study.spec": f"storage: {url}\n"})
    tracking.close_run(client, run_id, "FAILED", error=f"OperationalError: cannot connect to {url}", children=False)
    run = client.get_run(run_id)
    recorded = [run.data.params["storage"], run.data.tags["optuna.storage"], run.data.tags["study.spec"], run.data.tags["error"]]
    assert all("s3cret" not in v and "user:***@" in v for v in recorded), recorded
    capsys.readouterr()  # MLflow's store-creation lines, when this is the first test to create a store
    err = _one_line_error(capsys, cli.main(["trial", "--dataset", url]))
    assert "postgresql://user:***@db.example" in err and "s3cret" not in err
    record = __import__("logging").LogRecord("x", 30, __file__, 1, "connecting to %s", (url,), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "connecting to postgresql://user:***@db.example:5432/optuna"


def test_trial_table_does_not_print_the_tracking_uris_password(workdir, tmp_path, capsys, monkeypatch):
    """The trial table names the store the run went to: a tracking server URL with a password in it
    is printed with the password as ``***``, as in every other line wavesweep prints."""
    from wavesweep import trial

    torch.save(_cnn_state(0), tmp_path / "w.pt")
    cfg = TrialConfig.from_mapping({**TINY, "eval_limit": 40, "weights": str(tmp_path / "w.pt"), "device": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trial.run_trial(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:s3cret@tracking.example/mlflow")
    capsys.readouterr()
    cli._print_trial(result, "0123abcd")
    out = capsys.readouterr().out
    assert "trial run 0123abcd (https://user:***@tracking.example/mlflow)" in out
    assert "s3cret" not in out


def test_trial_table_says_how_many_warnings_it_left_out(workdir, tmp_path, capsys):
    """The table prints the first 5 warnings and counts the rest (all of them are in the run's
    warnings.txt): a kernel layout on 3x3 kernels warns once per layer."""
    import dataclasses

    from wavesweep import trial

    torch.save(_cnn_state(0), tmp_path / "w.pt")
    cfg = TrialConfig.from_mapping({**TINY, "eval_limit": 40, "weights": str(tmp_path / "w.pt"), "device": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trial.run_trial(cfg)
    for n, tail in ((5, None), (8, "warning: ... and 3 more (all 8: the trial run's warnings.txt)")):
        capsys.readouterr()
        cli._print_trial(dataclasses.replace(result, warnings=[f"w{i}" for i in range(n)]), "0123abcd")
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: ")]
        assert lines[:5] == [f"warning: w{i}" for i in range(5)]
        assert lines[5:] == ([tail] if tail else [])
    # the 'pruned' column is each method's pruned_fraction, the budget the baselines are matched to
    capsys.readouterr()
    cli._print_trial(result, "0123abcd")
    rows = capsys.readouterr().out.splitlines()
    header = next(r.split() for r in rows if r.startswith("method "))
    assert header[header.index("c-sparsity") + 1] == "pruned"  # recovery none: one token per column before it
    for m in ("dwt", "magnitude", "random"):
        row = next(r.split() for r in rows if r.startswith(f"{m} "))
        assert float(row[header.index("c-sparsity") + 1]) == round(result.outcomes[m].prune.matched_fraction, 3), (m, row)


def test_passwords_the_url_pattern_misses_are_redacted_once_the_url_is_seen(workdir):
    """SQLAlchemy accepts a password with '/', a quote or a space unencoded; the URL pattern stops at
    those, so the storage check remembers the parsed password and redacts it as a string."""
    from wavesweep.redact import redact
    from wavesweep.study.storage import check_storage_url

    assert redact("postgresql://u:pw@h/db?sslpassword=abc&sslmode=require") == "postgresql://u:***@h/db?sslpassword=***&sslmode=require"
    for password in ("sl/ash-9x", "qu'ote and space"):
        url = f"postgresql://user:{password}@127.0.0.1:1/optuna"
        check_storage_url(url)  # what every launch and worker does before using a storage URL
        for text in (url, repr(url), f"storage {url!r}: could not connect", f"storage: {url}\n"):
            assert password not in redact(text), text
        assert redact(url) == "postgresql://user:***@127.0.0.1:1/optuna"
    assert redact("the sl in slash and a quote") == "the sl in slash and a quote"  # only whole passwords


# --------------------------------------------------------------------------- one-line errors


def _weights_file(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(_cnn_state(0), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))  # fixed: a chance first byte "c" (GLOBAL) would read as a pickle naming code
    elif kind == "malicious":
        torch.save({"state_dict": _Marker(str(folder / "pwned"))}, path)
        (folder / "pwned").unlink(missing_ok=True)  # torch.save does not run it; be sure
    return path


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["trial", "--wavelet", "bior13"], ["unknown wavelet 'bior13'", "did you mean bior1.3"]),
        (["trial", "--wavelt", "haar"], ["unrecognized arguments: --wavelt haar", "did you mean --wavelet?"]),
        (["trial", "--model", "cnn", "--weights", "~nouser_wavesweep/x.pt"], ["weights file '~nouser_wavesweep/x.pt': cannot expand '~nouser_wavesweep'"]),
        (["download", "mlflow-artifacts:/../..", "--dst", "d"], ["'mlflow-artifacts:/../..'", "'..' is not allowed"]),
        (["trial", "--keep-approx", "maybe"], ["keep_approx='maybe' is not a boolean"]),
        (["trial", "--no-keep-approx=1"], ["--no-keep-approx takes no value"]),
        (["study"], ["study: the following arguments are required: spec"]),
        (["trial", "--model", "cnn", "--weights", "."], ["weights file '.' is a folder; give the weights file in it"]),  # was "does not exist"
    ],
    ids=["wavelet-typo", "flag-typo", "nouser", "download-dotdot", "bool-value", "no-flag-value", "missing-arg", "weights-folder"],
)
@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
def test_bad_input_is_one_line_exit_2(workdir, capsys, argv, needles):
    err = _one_line_error(capsys, cli.main(argv))
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.slow  # a fresh MLflow store: seconds, not milliseconds
def test_a_layout_the_model_cannot_take_fails_its_run_before_the_base_model(workdir, capsys, monkeypatch):
    """``wavesweep trial --model mlp --targets linear --layout kernel`` trained the base model
    (25 s on CPU) and only then said the layout cannot take a Linear weight."""
    from wavesweep import train

    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("a base model was trained or loaded"))
    err = _one_line_error(capsys, cli.main(["trial", "--model", "mlp", "--targets", "linear", "--layout", "kernel"]))
    assert "target layer 'net.1': layout 'kernel' needs a 4-D conv weight (out, in, kh, kw), got shape (256, 64)" in err
    (run,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "FAILED" and "layout 'kernel'" in run.data.tags["error"]


@pytest.mark.slow  # a fresh MLflow store per test: seconds, not milliseconds
@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "malicious"])
def test_bad_weights_file_is_one_line_exit_2(workdir, capsys, kind):
    path = _weights_file(kind, workdir)
    err = _one_line_error(capsys, cli.main(["trial", "--model", "cnn", "--weights", str(path)]))
    assert str(path) in err
    if kind == "malicious":
        assert "refused: weights_only=True" in err and not (workdir / "pwned").exists()
    elif kind != "empty":  # damaged bytes are not called a pickle that needs code, nor met with torch's weights_only=False advice
        assert "not a torch state-dict file" in err and "weights_only` set to `False`" not in err, err


@pytest.mark.parametrize(
    "make, argv, needle",
    [
        (lambda d: (d / "empty.pt").write_bytes(b""), ["trial", "--model", "cnn", "--weights", "empty.pt"], "'empty.pt' is empty"),
        (lambda d: None, ["study", "s.yaml", "-q", "--storage", "postgresql+pg8000://u:secret@127.0.0.1:1/optuna"],
         "the postgresql driver is missing (pg8000)"),
    ],
    ids=["bad-weights-fresh-store", "password-url-without-driver"],
)
@pytest.mark.slow  # a subprocess
def test_one_line_on_stderr_from_a_fresh_directory(workdir, shared_cache, make, argv, needle):
    """The whole stderr of the process is the one line: no MLflow store-creation INFO lines before it
    (a fresh store), no credentials warning before a storage error."""
    (workdir / "s.yaml").write_text("study: s\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n")
    make(workdir)
    env = subprocess_env(workdir, shared_cache, fresh_store=True)
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "wavesweep", *argv], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("wavesweep: error: "), proc.stderr
    assert needle in proc.stderr and "secret" not in proc.stderr


LAUGHS_FLOW = "[" + ",".join(["&a0 [x,x,x,x,x,x,x,x,x]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 6)]) + "]"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", "fixed=" + "[" * 5000 + "]" * 5000], "--set fixed=...: nested deeper than 50 levels"),
        (["--enqueue", "percentile=" + "[" * 5000 + "]" * 5000], "--enqueue percentile=...: nested deeper than 50 levels"),
        (["--set", "description=" + LAUGHS_FLOW], "--set description=...: expands to over 100000 YAML nodes"),
    ],
    ids=["set-deep", "enqueue-deep", "set-aliases"],
)
def test_command_line_spec_values_have_the_spec_files_bounds(workdir, capsys, argv, needle):
    (workdir / "s.yaml").write_text("study: s\nspace: {percentile: [10]}\nobjectives: {top1: maximize}\nn_trials: 1\n")
    err = _one_line_error(capsys, cli.main(["study", "s.yaml", "--dry-run", *argv]))
    assert needle in err and len(err) < 300, err[:300]


def test_an_error_line_is_capped():
    assert len(failures.one_line(ValueError("x" * 100_000))) < failures.MAX_ERROR_CHARS + 50
    assert len(failures.error_text(ValueError("x" * 100_000))) < failures.MAX_ERROR_CHARS + 70


@pytest.mark.parametrize("flag, value", [("--data-root", "fm"), ("--weights", "w.pt")])
def test_a_relative_path_not_found_under_mlflow_run_says_it_was_taken_from_the_project(workdir, capsys, monkeypatch,
                                                                                      flag, value):  # fmt: skip
    """``mlflow run`` runs the command in the project directory: ``-P data_root=fm`` given from
    another directory was looked for there and not found, and the line did not say where it had
    looked from. Under ``mlflow run`` (a launched run, an MLproject here) stderr's line now does;
    elsewhere the line is as it was."""
    from mlflow.tracking import MlflowClient

    argv = ["trial", "--model", "cnn", "--dataset", "fashion-mnist", flag, value, "--timing-batches", "0"]
    if flag == "--weights":
        argv[argv.index("fashion-mnist")] = "digits"
    assert cli.main(argv) == 2
    plain = capsys.readouterr().err.strip()
    assert "mlflow run" not in plain and len(plain.splitlines()) == 1, plain
    (workdir / "MLproject").write_text("name: p\n")
    client = MlflowClient()
    launched = client.create_run(client.create_experiment("launched")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, 2)
    want = (f"({flag[2:].replace('-', '_')}={value}: under `mlflow run` a relative path is taken from the project "
            f"directory {workdir}; give an absolute path)")  # fmt: skip
    assert err.startswith(plain) and err.endswith(want), err
    run = client.get_run(launched)  # closed by the trial itself, with the error (stderr's line adds the hint)
    assert run.info.status == "FAILED" and plain.split("error: ", 1)[1] in run.data.tags["error"]


def test_the_error_recorded_for_a_worker_error_is_the_workers_own():
    """``error_text`` (a run's ``error`` tag, a trial's ``error`` attribute): an error torch
    re-raised from a DataLoader worker (its own ``ExceptionWrapper``, as a worker raises it) is the
    worker's error, not "Caught ..." and the worker's traceback; any other message is kept whole
    (several lines included), typed, credentials redacted."""
    from torch._utils import ExceptionWrapper

    try:
        raise ValueError("image 'a.png' cannot be read (OSError: image file is truncated); remove or replace it")
    except ValueError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError) as caught:
        wrapped.reraise()
    assert "Traceback" in str(caught.value)  # what torch gives
    want = "ValueError: image 'a.png' cannot be read (OSError: image file is truncated); remove or replace it"
    assert failures.error_text(caught.value) == want
    assert failures.error_text(RuntimeError("shape mismatch:\n  expected 3, got 4")) == "RuntimeError: shape mismatch:\n  expected 3, got 4"
    assert failures.error_text(KeyError()) == "KeyError"
    assert "hunter2" not in failures.error_text(ValueError("cannot reach postgresql://u:hunter2@db/x"))


@pytest.mark.parametrize("argv", [["trial", "--report-dir", "x"], ["trial", "--dst", "x"], ["models", "--name", "x"]])
def test_did_you_mean_names_only_flags_of_the_command_given(capsys, argv):
    err = _one_line_error(capsys, cli.main(argv))
    assert f"unrecognized arguments: {argv[1]} x" in err and f"did you mean {argv[1]}?" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_before_any_run(workdir, capsys):
    err = _one_line_error(capsys, cli.main(["trial", "--model", "cnn", "--device", "cuda"]))
    assert "device 'cuda' requested but CUDA is not available" in err
    assert not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize(
    "argv, error",
    [
        (["trial", "--model", "cnn", "--nosuch", "1"], "invalid command line: unrecognized arguments: --nosuch 1"),
        (["trial", "--model", "cnn", "--wavelet", "nope"], "invalid parameters: unknown wavelet 'nope'"),
        (["trial", "--model", "cnn", "--recovery", "finetune", "--finetune-lr", "1e300"],
         "invalid parameters: finetune_lr=1e+300 must be a number in (0, 1000]"),
        (["study", "bad.yaml"], "bad.yaml:1: study: study name '../x' is not a valid name"),
    ],
    ids=["unknown-P-key", "bad-value", "bad-finetune-lr", "study-entry-point"],
)
@pytest.mark.slow  # a subprocess or a fresh MLflow store: seconds, not milliseconds
def test_every_mlflow_run_failure_carries_the_error_tag(workdir, shared_cache, argv, error):
    """As `mlflow run` starts it: MLFLOW_RUN_ID names a run created beforehand; the process fails
    with one line and that run gets status FAILED and the tag ``error``."""
    (workdir / "bad.yaml").write_text("study: ../x\n" + _SPEC_TAIL)
    client, exp = tracking.init_tracking()
    run_id = client.create_run(exp).info.run_id
    env = {**subprocess_env(workdir, shared_cache), "MLFLOW_RUN_ID": run_id}
    proc = subprocess.run([sys.executable, "-m", "wavesweep", *argv], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wavesweep: error: "), proc.stderr
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(error), run.data.tags["error"]


# --------------------------------------------------------------------------- packaging and CLI


def _reqs(lines) -> dict[str, str]:
    import re

    return {re.split(r"[<>=!~]", r, 1)[0].lower(): r for r in lines}


def test_environments_match_pyproject_and_are_bounded():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+ (the package supports 3.10)")

    import yaml

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = _reqs(project["dependencies"])
    pe = yaml.safe_load((root / "python_env.yaml").read_text())
    assert pe["python"] == "3.11" and pe["build_dependencies"] == ["pip", "setuptools", "wheel"]
    conda = yaml.safe_load((root / "conda.yaml").read_text())
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    for reqs in (_reqs(pe["dependencies"]), _reqs(conda_pip)):
        assert set(reqs) == set(deps)
        assert all("<" in r for r in reqs.values()), reqs  # every version bounded above
    assert yaml.safe_load((root / "MLproject").read_text())["python_env"] == "python_env.yaml"
    assert "dashboard" in project["optional-dependencies"]
    assert project["license"] == {"text": "MIT"} and (root / "LICENSE").read_text().startswith("MIT License")


def test_every_package_the_code_imports_is_a_declared_dependency():
    """A module the package imports (at any depth: inside functions too) comes from a dependency it
    declares, not one that arrives through another's (scipy came only through scikit-learn)."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+ (the package supports 3.10)")

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = set(_reqs(project["dependencies"])) | {
        r for extra in project["optional-dependencies"].values() for r in _reqs(extra)
    }
    declared = {re.sub(r"\[.*", "", d).replace("_", "-").lower() for d in declared}
    dists = packages_distributions()
    imported: dict[str, str] = {}
    for path in sorted((root / "wavesweep").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])  # fmt: skip
            for name in names:
                imported.setdefault(name.split(".")[0], path.name)
    undeclared = {}
    for top, where in imported.items():
        # architectures: wavesweep's own module, imported by that name beside a registered model's
        # loader; safetensors: read only when installed (models.read_weights says so)
        if top in sys.stdlib_module_names or top in ("wavesweep", "architectures", "safetensors"):
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
        if not owners & declared:
            undeclared[top] = (where, sorted(owners))
    assert not undeclared, undeclared


def test_version_and_help_for_every_subcommand_and_flag(capsys):
    import wavesweep

    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"wavesweep {wavesweep.__version__}"
    import re

    parser = cli.build_parser()
    assert set(parser.commands) >= {"trial", "study", "report", "register", "download", "train", "ui"}
    usage = parser.format_help()
    for name, sub in parser.commands.items():
        assert re.search(rf"^ +{name} +\S", usage, re.M), f"command {name} has no help line"
        for action in sub.arguments:
            assert action.help, (name, action.option_strings or action.dest)
        with pytest.raises(SystemExit) as ei:  # every flag it keeps is one argparse parses
            parser.parse_args([name, "--help"])
        assert ei.value.code == 0
        shown = capsys.readouterr().out
        assert all(o in shown for a in sub.arguments for o in a.option_strings), name



@pytest.mark.parametrize(
    "argv, hint",
    [(["trial", "--wavelt", "haar"], "--wavelet"), (["--verbsoe", "trial"], "--verbose"), (["study", "s.yaml", "--wrokers", "2"], "--workers")],
)
def test_a_mistyped_flag_names_the_closest_one(argv, hint):
    """The "did you mean" comes from the flags the parser was given: its own and the command's."""
    from wavesweep.cli_args import UsageError

    with pytest.raises(UsageError, match=rf"unrecognized arguments: .*\(did you mean {hint}\?\)$"):
        cli.build_parser().parse_args(argv)


def test_uploaded_checkpoint_files_are_their_sources_byte_for_byte(tmp_path, monkeypatch):
    """Oracle of the hard-linked upload (``tracking._log_files``): the folder handed to MLflow holds
    the source's bytes whether the link works (the same file) or the copy fallback runs, and
    the source survives the upload. (A stub client: MLflow's own upload is not under test.)"""
    src = tmp_path / "model.wsz"
    payload = os.urandom(100_000)
    src.write_bytes(payload)
    seen = {}

    class Client:
        def log_artifacts(self, run_id, local_dir, artifact_path=None):
            f = Path(local_dir) / "checkpoint" / "model.wsz"
            seen[run_id] = (f.read_bytes(), os.path.samefile(f, src), (Path(local_dir) / "note.txt").read_text())

    def no_link(a, b):
        raise OSError("cross-device link")

    tracking._log_files(Client(), "linked", {"note.txt": "x"}, copies={"checkpoint/model.wsz": src})
    monkeypatch.setattr(tracking.os, "link", no_link)
    tracking._log_files(Client(), "copied", {"note.txt": "x"}, copies={"checkpoint/model.wsz": src})
    assert seen == {"linked": (payload, True, "x"), "copied": (payload, False, "x")}
    assert src.read_bytes() == payload


@pytest.mark.parametrize("field, value, hint", [
    ("model", "CNN", "cnn"), ("dataset", "MNIST", "mnist"), ("layout", "FILTER", "filter"),
    ("recovery", "BN", "bn"), ("wavelet", "DB4", "db4"), ("wavelet", "Bior4.4", "bior4.4"),
])  # fmt: skip
def test_a_name_in_other_case_is_suggested(field, value, hint):
    """`wavesweep trial --model CNN` (the README writes "the small CNN") said "unknown model 'CNN';
    valid: cnn, ..." with no "did you mean", as did DB4, MNIST, BN, FILTER, while 'Haar' got "did
    you mean haar?": difflib finds no likeness between two spellings that differ only in case."""
    with pytest.raises(ValueError) as err:
        TrialConfig.from_mapping({field: value})
    assert f"did you mean {hint}?" in str(err.value), str(err.value)
    from wavesweep.study.spec_yaml import unknown_choice

    assert unknown_choice("trial parameter", "Percentile", ["percentile", "level"]).endswith("did you mean percentile?")


def test_a_model_uri_naming_nothing_lists_what_there_is(workdir, tmp_path):
    """`wavesweep download models:/fashion-cnn-dwt@champio` said "Registered model alias champio not
    found." and `--weights models:/nosuch@champion` "Registered Model with name=nosuch not found",
    naming neither the aliases nor the models there are. Both name the bad part and the choices."""
    client = MlflowClient()
    src = tmp_path / "model"
    src.mkdir()
    for name in ("fashion-cnn-dwt", "other"):
        client.create_registered_model(name)
        client.create_model_version(name, str(src))
    client.set_registered_model_alias("fashion-cnn-dwt", "champion", "1")
    cases = {
        "models:/fashion-cnn-dwt@champio": "unknown alias of fashion-cnn-dwt 'champio'; valid: champion; did you mean champion?",
        "models:/fashion-cnn-dwt-x@champion": "unknown registered model 'fashion-cnn-dwt-x'; valid: fashion-cnn-dwt, other; did you mean fashion-cnn-dwt?",
        "models:/nosuch/1": "unknown registered model 'nosuch'; valid: fashion-cnn-dwt, other",
    }  # fmt: skip
    for uri, needle in cases.items():
        for call in (lambda: model_registry.download(uri, tmp_path / "dl"), lambda: model_registry.weights_from_uri(uri, tmp_path / "cache")):
            with pytest.raises(ValueError) as err:
                call()
            msg = str(err.value)
            assert needle in msg and uri in msg and "\n" not in msg, msg
    assert not (tmp_path / "dl").exists()
