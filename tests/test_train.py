"""Base models: configs, training bars, the cache (one training across processes),
checkpoints, pretrained ImageNet weights, and the errors."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import wavesweep.train as T
from wavesweep.data import data_fingerprint, load_dataset, take
from wavesweep.evaluate import evaluate
from wavesweep.architectures import MLP
from wavesweep.models import MODELS, RESNET18_IMAGENET_FILE, build_model
from wavesweep.train import TrainConfig, default_train_config, get_base_model, train_model

FAST = TrainConfig(epochs=3, batch_size=64, lr=3e-3)  # mlp on digits in about a second


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))


def test_cache_dir_from_env(tmp_path):
    assert T.cache_dir() == tmp_path / "cache"


def test_train_config_validation_and_digest():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; valid: adamw, sgd"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match=r"unknown schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)
    assert TrainConfig().digest() == TrainConfig().digest() != TrainConfig(lr=1e-3).digest()


@pytest.mark.parametrize("kwargs, line", [
    (dict(epochs=True), "epochs must be an int, got True"),
    (dict(batch_size=64.0), "batch_size must be an int, got 64.0"),
    (dict(lr=float("inf")), "lr must be a finite number, got inf"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number, got nan"),
    (dict(optimizer="sgd", schedule="cosine", momentum=float("nan")), "momentum must be a finite number, got nan"),
    (dict(optimizer="sgd", schedule="constant", momentum=0.0), r"momentum must be in \(0, 1\) for optimizer 'sgd' \(Nesterov momentum\), got 0.0"),
    (dict(optimizer="sgd", schedule="cosine", momentum=-0.5), r"momentum must be in \(0, 1\) .* got -0.5"),
    (dict(label_smoothing="0.1"), "label_smoothing must be a finite number, got '0.1'"),
])
def test_a_config_training_could_not_run_is_refused_when_made(kwargs, line):
    """Each was accepted, then failed only once training began, with torch's message about a
    setting the user cannot set (SGD's Nesterov momentum of 0), or an lr blamed for a NaN momentum's
    divergence, or recorded ``epochs: True`` in train_info."""
    with pytest.raises(ValueError, match=line):
        TrainConfig(**kwargs)


def test_equal_configs_written_with_ints_or_floats_share_one_cache_key():
    """``lr=1`` and ``lr=1.0`` train the same weights and compare equal; their JSON differed (1, 1.0),
    so each trained a base model of its own."""
    a, b = TrainConfig(lr=1, weight_decay=0, label_smoothing=0), TrainConfig(lr=1.0, weight_decay=0.0, label_smoothing=0.0)
    assert a == b and a.digest() == b.digest() and isinstance(a.lr, float)
    assert T.cache_path("mlp", "digits", 0, a) == T.cache_path("mlp", "digits", 0, b)
    # NumPy numbers (a seed read from a frame) are the same config as Python's, and hash as JSON does
    c = TrainConfig(seed=np.int64(3), epochs=np.int32(10), lr=np.float64(3e-3))
    assert c == TrainConfig(seed=3) and c.digest() == TrainConfig(seed=3).digest() and type(c.seed) is int


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_a_momentum_is_a_config_only_where_training_uses_it(schedule):
    """``momentum`` is SGD's: with onecycle, PyTorch's OneCycleLR sets SGD's momentum to 0.95 and
    cycles it down to 0.85 and back, so TrainConfig(optimizer="sgd", momentum=0.5) trained with
    0.85..0.95 while train_info and the cache key recorded 0.5; with adamw nothing reads it, yet
    it made another cache key for the same weights. Such a config is an error; where it is used,
    the optimizer holds it at every step (oracle: the param group under torch's own scheduler)."""
    cfg = TrainConfig(optimizer="sgd", schedule=schedule)  # the default momentum: accepted everywhere
    assert TrainConfig(optimizer="adamw", schedule=schedule).momentum == cfg.momentum == 0.9
    with pytest.raises(ValueError, match=r"momentum=0.5 is used by optimizer 'sgd' only, not 'adamw'; valid: optimizer='sgd', or momentum=0.9"):
        TrainConfig(momentum=0.5, schedule=schedule)
    p = [nn.Parameter(torch.zeros(3))]
    if schedule == "onecycle":
        opt = T._optimizer(p, cfg)
        sched, used = T._scheduler(opt, cfg, 20), set()
        for _ in range(20):
            used.add(round(opt.param_groups[0]["momentum"], 6))
            opt.step()
            sched.step()
        assert min(used) == 0.85 and max(used) == 0.95  # not the config's momentum, whatever it says
        with pytest.raises(ValueError, match=r"momentum=0.5 is not used with schedule 'onecycle'.+valid: schedule 'cosine' or 'constant', or momentum=0.9"):
            TrainConfig(optimizer="sgd", momentum=0.5, schedule=schedule)
        return
    cfg = TrainConfig(optimizer="sgd", momentum=0.5, schedule=schedule)
    opt = T._optimizer(p, cfg)
    sched = T._scheduler(opt, cfg, 20)
    for _ in range(20):
        assert opt.param_groups[0]["momentum"] == 0.5
        opt.step()
        if sched is not None:
            sched.step()
    assert cfg.digest() != TrainConfig(optimizer="sgd", schedule=schedule).digest()


@pytest.mark.parametrize("name", MODELS.names())
def test_default_config_for_every_model_on_digits(name):
    assert isinstance(default_train_config(name, "digits"), TrainConfig)
    with pytest.raises(ValueError, match="unknown dataset"):
        default_train_config(name, "svhn")


# Bars: the full default configs for cnn and mlp (their training targets); resnet18 with one
# epoch and a lower honest bar (bench/bench_eval.py checks its full target and time).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name,epochs,bar",
    [("cnn", None, 0.95), ("mlp", None, 0.93), ("resnet18", 1, 0.80)],
)
def test_training_reaches_bar(name, epochs, bar):
    bundle = load_dataset("digits", seed=0)
    cfg = default_train_config(name, "digits")
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, image_size=8)
    info = train_model(model, bundle, cfg, device="cpu", progress=False)
    assert info["test_top1"] >= bar, info
    assert not model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.slow  # trains twice
def test_training_is_deterministic():
    bundle = load_dataset("digits", seed=0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
        train_model(m, bundle, FAST, device="cpu", progress=False)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.slow  # trains a base model
def test_get_base_model_trains_once_then_uses_the_cache(monkeypatch, tmp_path):
    a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert a.source == "trained" and a.path.parent == tmp_path / "cache" / "models" and a.path.is_file()
    assert not a.model.training and a.train_info["test_top1"] > 0.8 and a.train_info["epochs"] == 3
    assert a.build_kwargs == {"num_classes": 10, "in_channels": 1, "image_size": 8}
    assert a.checksum == hashlib.sha256(a.path.read_bytes()).hexdigest()  # the file's own sha256
    monkeypatch.setattr(T, "train_model", lambda *a, **k: pytest.fail("trained again"))
    b = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert b.checksum == a.checksum
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    sk = a.skeleton()
    sk.load_state_dict(a.model.state_dict())
    assert type(sk) is type(a.model)
    # the entry is keyed by the data's fingerprint; another seed or config is another entry
    fp = data_fingerprint(load_dataset("digits", seed=0))
    assert a.path == T.cache_path("mlp", "digits", 0, FAST, tmp_path / "cache", data=fp)
    assert json.loads(torch.load(a.path, weights_only=True)["meta"])["data_fingerprint"] == fp
    assert T.cache_path("mlp", "digits", 1, FAST, tmp_path / "cache", data=fp) != a.path
    assert T.cache_path("mlp", "digits", 0, dataclasses.replace(FAST, lr=1e-3), tmp_path / "cache", data=fp) != a.path
    assert not list(a.path.parent.glob("*.tmp"))


def test_a_training_without_a_bar_says_it_started_and_logs_each_epoch(caplog):
    """A study's trials train without a bar: its log says a base model is being trained, then one
    line an epoch (the loss as the bar would show it, the seconds, what is left), not silence for
    the minutes or hours of a first trial. With a bar, the bar is that progress: no epoch lines."""
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="wavesweep.train"):
        a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert "no cached base model mlp on digits (seed 0): training it (3 epochs on cpu); cached for every later trial" in lines
    epochs = [m for m in lines if re.match(r"training MLP on digits: epoch \d of 3 done", m)]
    assert [m.split(": epoch ")[1][:9] for m in epochs] == ["1 of 3 do", "2 of 3 do", "3 of 3 do"]
    assert "about" in epochs[0] and "left" in epochs[0] and "left" not in epochs[-1]
    loss = float(re.search(r"train loss (\S+),", epochs[-1]).group(1))
    assert loss == pytest.approx(a.train_info["train_loss"], abs=5e-5)  # the recorded one, as printed (4 places)
    assert float(re.search(r", (\d+) s so far", epochs[-1]).group(1)) == pytest.approx(a.train_info["seconds"], abs=0.51)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wavesweep.train"):
        get_base_model("mlp", "digits", seed=1, train_config=FAST, device="cpu", progress=True)
    assert not [r for r in caplog.records if " done, train loss " in r.getMessage()]


def test_a_base_model_file_loaded_again_in_the_process_is_not_hashed_again(monkeypatch, tmp_path):
    """A later load of an unchanged file does not hash it again, and from the third on does not
    read it either (the second keeps a copy; the first keeps none, so a single trial pays no copy):
    the same model each time, each load its own copy (what a trial does to its base reaches no
    later load), and the checksum is still the file's (oracle: hashlib over its bytes); a file
    replaced (as the cache writes it: atomically) or rewritten in place is read and hashed again."""
    a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    state_a = {k: v.clone() for k, v in a.model.state_dict().items()}
    real_read, real_sha = T.read_weights, T.file_sha256
    reads = []
    monkeypatch.setattr(T, "read_weights", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(T, "file_sha256", lambda *x, **k: pytest.fail("hashed again"))
    T._LOADED.clear()  # as in a new process
    loads = []
    for _ in range(4):
        b = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
        assert b.checksum == a.checksum == hashlib.sha256(a.path.read_bytes()).hexdigest()
        assert b.build_kwargs == a.build_kwargs and b.train_info == a.train_info and not b.model.training
        sb = b.model.state_dict()
        assert sb.keys() == state_a.keys() and all(torch.equal(sb[k], state_a[k]) for k in sb)
        # what a trial may do to its base: change its weights, its mode, its record
        with torch.no_grad():
            for v in b.model.parameters():
                v.mul_(-1)
        b.model.train()
        b.train_info["changed"] = True
        loads.append(b)
    assert reads == [a.path] * 2  # the first and second loads read it; the third and fourth copy the kept model
    ptrs = [{t.data_ptr() for t in b.model.parameters()} for b in loads]
    assert all(not (ptrs[i] & ptrs[j]) for i in range(4) for j in range(i))  # no two loads share a tensor

    # the file replaced atomically with other weights (a new inode): read and hashed again
    monkeypatch.setattr(T, "read_weights", real_read)
    monkeypatch.setattr(T, "file_sha256", real_sha)
    blob = torch.load(a.path, weights_only=True)
    blob["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    tmp = a.path.with_suffix(".new")
    torch.save(blob, tmp)
    os.replace(tmp, a.path)
    d = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert d.checksum == hashlib.sha256(a.path.read_bytes()).hexdigest() != a.checksum
    sd = d.model.state_dict()
    assert all(torch.equal(sd[k], blob["state_dict"][k]) for k in sd)

    # a checkpoint given as weights: the same, and rewritten in place it is read again
    torch.manual_seed(1)
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), path)
    e = get_base_model("cnn", "digits", weights=path)
    f = get_base_model("cnn", "digits", weights=path)
    assert e.checksum == f.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(x, y) for x, y in zip(e.model.state_dict().values(), f.model.state_dict().values()))
    with torch.no_grad():
        cnn.fc.weight.mul_(2)
    st = os.stat(path)
    torch.save(cnn.state_dict(), path)  # same inode, same size, a later time
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    g = get_base_model("cnn", "digits", weights=path)
    assert g.checksum == hashlib.sha256(path.read_bytes()).hexdigest() != e.checksum
    assert torch.equal(g.model.fc.weight, cnn.fc.weight)

    # rewritten in place with its modification time set back (cp -p, rsync -t, touch -d): same
    # inode, size and mtime; only the change time tells it was written
    st = os.stat(path)
    with torch.no_grad():
        cnn.fc.weight.mul_(3)
    time.sleep(0.01)  # a change time the clock can tell apart
    torch.save(cnn.state_dict(), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_ino, os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    h = get_base_model("cnn", "digits", weights=path)
    assert h.checksum == hashlib.sha256(path.read_bytes()).hexdigest() != g.checksum
    assert torch.equal(h.model.fc.weight, cnn.fc.weight)


@pytest.mark.parametrize("damage", ["truncated", "empty", "plain-state-dict", "another-seed", "another-config"])
def test_a_damaged_cached_base_model_is_trained_again(monkeypatch, caplog, damage):
    """A cached base model that cannot be read is trained again, with a warning, into the same
    weights (CPU training is deterministic). It was a usage error (exit 2) on every later trial and
    on ``wavesweep train`` alike, until the user found and deleted the cache file; a plain state
    dict in its place was a KeyError traceback."""
    import logging

    a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    whole = a.path.read_bytes()
    if damage == "plain-state-dict":
        torch.save(a.model.state_dict(), a.path)
    elif damage == "another-seed":  # a whole, readable entry of another key copied over this one
        other = get_base_model("mlp", "digits", seed=1, train_config=FAST, device="cpu", progress=False)
        a.path.write_bytes(other.path.read_bytes())
    elif damage == "another-config":  # the same seed and data, trained with another lr (another key)
        other = get_base_model("mlp", "digits", seed=0, train_config=dataclasses.replace(FAST, lr=1e-3), device="cpu",
                               progress=False)
        assert other.path != a.path
        a.path.write_bytes(other.path.read_bytes())
    else:
        a.path.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"")
    trained = []
    real_train = T.train_model
    monkeypatch.setattr(T, "train_model", lambda *x, **k: trained.append(1) or real_train(*x, **k))
    with caplog.at_level(logging.WARNING, logger="wavesweep.train"):
        b = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert trained == [1] and f"cached base model {a.path} cannot be used" in caplog.text
    assert b.path == a.path and b.checksum == hashlib.sha256(a.path.read_bytes()).hexdigest()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert trained == [1] and c.checksum == b.checksum  # the new file is the cache entry now
    assert not list(a.path.parent.glob("*.tmp"))


def test_a_diverged_training_is_one_error_and_nothing_is_cached(monkeypatch):
    """A training whose lr makes the weights NaN (SGD at lr 1e6: every weight of the mlp's first
    layer, 16384 of 16384) was written to the cache, refused on loading as a damaged cache file,
    trained again into the same NaN weights, and the error named the cache file, not the lr: a
    second whole training, and a NaN file left to repeat it on the next call."""
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e6, optimizer="sgd", schedule="constant")
    trained = []
    real_train = T.train_model
    monkeypatch.setattr(T, "train_model", lambda *x, **k: trained.append(1) or real_train(*x, **k))
    with pytest.raises(ValueError, match=r"training MLP on digits diverged: tensor '.+' holds NaN or infinite .+lr=1000000\.0; use a lower lr"):
        get_base_model("mlp", "digits", seed=0, train_config=cfg, device="cpu", progress=False)
    assert trained == [1]
    assert not list((T.cache_dir() / "models").glob("*.pt"))


_WORKER = """
import json, sys, torch
import wavesweep.train as T
calls = []
original = T.train_model
def counting(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)
T.train_model = counting  # get_base_model looks train_model up in the module at call time
torch.set_num_threads(1)
cfg = T.TrainConfig(epochs=3, batch_size=64, lr=3e-3)
bm = T.get_base_model("mlp", "digits", seed=0, train_config=cfg, cache_root=sys.argv[1], device="cpu", progress=False)
print(json.dumps([len(calls), bm.checksum, bm.model.state_dict()["net.1.weight"].flatten()[:5].tolist()]))
"""


@pytest.mark.slow
def test_concurrent_processes_train_once(tmp_path):
    cache = str(tmp_path / "shared")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(r[0] for r in results) == 1  # exactly one process trained
    assert results[0][1] == results[1][1] and results[0][2] == results[1][2]
    files = sorted(p.name for p in (Path(cache) / "models").iterdir())
    assert len([f for f in files if f.endswith(".pt")]) == 1 and not [f for f in files if f.endswith(".tmp")]


def test_checkpoint_weights_and_mismatch_errors(tmp_path):
    torch.manual_seed(1)
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), path)
    bm = get_base_model("cnn", "digits", weights=path)
    assert bm.source == "checkpoint" and bm.path == path and bm.checksum == T.file_sha256(path)
    assert torch.equal(bm.model.state_dict()["fc.weight"], cnn.state_dict()["fc.weight"])
    r = evaluate(bm.model, load_dataset("digits").test, device="cpu")
    assert r.n == 360
    with pytest.raises(ValueError, match=r"cnn.pt: checkpoint does not fit MLP"):
        get_base_model("mlp", "digits", weights=path)  # another architecture
    seven = tmp_path / "cnn7.pt"
    torch.save(build_model("cnn", num_classes=7, in_channels=1, image_size=8).state_dict(), seven)
    with pytest.raises(ValueError, match=r"'fc.weight': checkpoint \(7, 128\), model \(10, 128\)"):
        get_base_model("cnn", "digits", weights=seven)  # class count differs from the dataset's
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_base_model("cnn", "digits", weights=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="MLflow URI"):
        get_base_model("cnn", "digits", weights="models:/base@champion")

    # PyTorch's tutorial checkpoint ({"epoch", "model_state_dict", "optimizer_state_dict", "loss"}) holds one
    general = tmp_path / "general.pt"
    torch.save({"epoch": 3, "model_state_dict": cnn.state_dict(), "optimizer_state_dict": {}, "loss": 0.5}, general)
    assert torch.equal(get_base_model("cnn", "digits", weights=general).model.fc.weight, cnn.fc.weight)
    # what is not a state dict is named: the keys found, or the entry that is no tensor
    torch.save({"epoch": 3, "weights": cnn.state_dict(), "loss": 0.5}, general)
    with pytest.raises(ValueError, match=r"general.pt: not a state dict \(a mapping of parameter names to tensors\): "
                                         r"it holds 'epoch', 'weights', 'loss', none of them a tensor; save the model's "
                                         r"state_dict\(\) alone, or under the key 'state_dict', 'model' or 'model_state_dict'$"):
        get_base_model("cnn", "digits", weights=general)
    torch.save({**cnn.state_dict(), "step": 7}, general)
    with pytest.raises(ValueError, match=r"entry 'step' is of type int; save"):
        get_base_model("cnn", "digits", weights=general)


def test_weights_trained_on_another_seeds_digits_split_are_said_to_overlap_the_test_split(tmp_path, caplog):
    """A wavesweep base model given as weights with another seed: digits' split is drawn from the
    seed, so the run's test examples are largely the weights' training examples, and the log says
    so. Oracle: the two splits drawn by scikit-learn directly."""
    import logging

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    train0, _ = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    _, test3 = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=3)
    assert len(set(test3) & set(train0)) > 200  # what the warning is about
    trained = get_base_model("mlp", "digits", seed=0, train_config=dataclasses.replace(FAST, epochs=1), device="cpu",
                             progress=False)  # fmt: skip
    plain = tmp_path / "plain.pt"
    torch.save(trained.model.state_dict(), plain)  # no metadata: nothing to compare
    for weights, seed, warned in ((trained.path, 3, True), (trained.path, 0, False), (plain, 3, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wavesweep.train"):
            base = get_base_model("mlp", "digits", seed=seed, weights=weights)
        assert ("split of seed 0, but this run evaluates the split of seed 3" in caplog.text) is warned, (weights, seed)
        assert len(base.warnings) == warned and all("split of seed 0, but" in w for w in base.warnings)
    # a trial records it with its own warnings (the trial run's tags in MLflow)
    from wavesweep.config import TrialConfig
    from wavesweep.trial import run_trial

    result = run_trial(TrialConfig(model="mlp", seed=3, weights=str(trained.path), eval_limit=20, timing_batches=0,
                                   targets="linear", wavelet="haar", level=1, recovery="none"))  # fmt: skip
    assert any("split of seed 0, but this run evaluates the split of seed 3" in w for w in result.warnings)


def test_a_trials_checkpoint_given_as_weights_with_another_seed_is_said_to_overlap_the_test_split(tmp_path):
    """A trial's compressed checkpoint (what a trial run logs, and what a model registered from it
    is read as) records its trial: a digits trial of seed 0 pruned a base trained on seed 0's
    split, so as weights for seed 3 most test examples are its training examples (290 of 360,
    the test above). It said nothing, where the base model's own file is warned about."""
    from wavesweep import checkpoint, pruning
    from wavesweep.config import TrialConfig

    torch.manual_seed(1)
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    cases = [  # (trial's weights, its recovery, the seed given here, warned)
        ("", "bn", 3, True), ("", "none", 0, False), ("base.pt", "bn", 3, False), ("base.pt", "finetune", 3, True)]
    for i, (weights, recovery, seed, warned) in enumerate(cases):
        trial = TrialConfig(model="mlp", dataset="digits", seed=0, weights=weights, recovery=recovery, targets="linear")
        wsz = tmp_path / f"dwt{i}.wsz"  # the metadata of tracked_trial's checkpoints
        checkpoint.save_compressed(pruning.prune_magnitude(mlp, 0.5, targets="linear"), wsz,
                                   metadata={"trial": trial.to_dict(), "base_checksum": "0" * 64})  # fmt: skip
        base = get_base_model("mlp", "digits", seed=seed, weights=wsz)
        assert len(base.warnings) == warned, (weights, recovery, seed)
        assert all("split of seed 0, but this run evaluates the split of seed 3" in w for w in base.warnings)


def test_weights_wavesweep_made_for_another_dataset_are_a_usage_error(tmp_path):
    """A cnn made for digits loads into the cnn of fashion-mnist (1 channel, 10 classes, pooled to
    any image size): the trial ran on, recording a chance-accuracy base model as fashion-mnist's.
    A file that records its dataset (a cached base model, a compressed checkpoint) is checked;
    a plain state dict records none and loads as before."""
    from wavesweep import checkpoint, pruning

    torch.manual_seed(1)
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    cached = tmp_path / "cached.pt"  # the layout of get_base_model's cache files
    meta = {"model_name": "cnn", "dataset_name": "digits", "seed": 0,
            "build_kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8}}  # fmt: skip
    torch.save({"state_dict": cnn.state_dict(), "meta": json.dumps(meta)}, cached)
    wsz = tmp_path / "dwt.wsz"
    checkpoint.save_compressed(pruning.prune_magnitude(cnn, 0.5), wsz, metadata={"trial": {"dataset": "digits"}})
    plain = tmp_path / "plain.pt"
    torch.save(cnn.state_dict(), plain)
    for weights in (cached, wsz):
        with pytest.raises(ValueError, match=r"holds a model for dataset 'digits', not 'fashion-mnist'; valid: dataset=digits"):
            get_base_model("cnn", "fashion-mnist", weights=weights)
        assert get_base_model("cnn", "digits", weights=weights).dataset_name == "digits"
    assert get_base_model("cnn", "fashion-mnist", weights=plain).build_kwargs["image_size"] == 28


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'"):
        get_base_model("vgg", "digits")
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'"):
        get_base_model("cnn", "svhn")


def test_no_train_split_is_an_error(tmp_path):
    from tests.test_data import make_image_folder

    make_image_folder(tmp_path / "val", ["n00000001", "n00000002"], per_class=1, size=(8, 8))
    bundle = load_dataset("imagenet", root=tmp_path / "val", expected_classes=2)
    with pytest.raises(ValueError, match="has no train split"):
        train_model(build_model("cnn", num_classes=2), bundle, FAST, progress=False)


@pytest.mark.slow  # an ImageNet-shaped ResNet-18
def test_resnet18_imagenet_is_pretrained_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=RESNET18_IMAGENET_FILE):
        get_base_model("resnet18", "imagenet")
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_IMAGENET_FILE
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    bm = get_base_model("resnet18", "imagenet")
    assert bm.source == "pretrained" and bm.path == ckpt and bm.checksum == T.file_sha256(ckpt)
    assert bm.build_kwargs == {"num_classes": 1000, "in_channels": 3, "image_size": 224}
    assert bm.skeleton().fc.out_features == 1000


# --------------------------------------------------------------------------- accelerator settings

#: TrainConfig digests computed by the code before amp/channels_last existed (cache file names)
_DIGESTS_BEFORE_AMP = {
    TrainConfig(): "a67e81b87d92",
    TrainConfig(epochs=3, batch_size=32, lr=2e-3, weight_decay=5e-4): "4c75fa773eaf",
    TrainConfig(epochs=10, batch_size=64, lr=1e-2, weight_decay=5e-4): "de7d1b14fae2",
    TrainConfig(epochs=30, batch_size=64, lr=3e-3, weight_decay=1e-4): "1769c71029c4",
}


def _digest_before_amp(cfg: TrainConfig) -> str:
    """The old digest: sha256 of the sorted JSON of the fields that existed then."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("amp", "channels_last", "cuda_graphs")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def test_amp_and_channels_last_validation():
    with pytest.raises(ValueError, match=r"^unknown amp 'fp16'; valid: auto, bf16, off; did you mean bf16\?$"):
        TrainConfig(amp="fp16")
    with pytest.raises(ValueError, match=r"^unknown channels_last True; valid: auto, on, off$"):
        TrainConfig(channels_last=True)


def test_digest_of_float32_configs_is_unchanged():
    """Cached base models keep their file names: on CPU every default config resolves to
    amp off / channels-last off and hashes as before; bf16 or channels-last get new keys."""
    for cfg, old in _DIGESTS_BEFORE_AMP.items():
        assert cfg.digest("cpu") == old == _digest_before_amp(cfg)
        assert dataclasses.replace(cfg, amp="off", channels_last="off", cuda_graphs="off").digest("cuda") == old
        # a graphed step is another recipe (beta1 not cycled, capturable AdamW): another key
        assert dataclasses.replace(cfg, amp="off", channels_last="off", cuda_graphs="on").digest("cuda") != old
    for cfg in T._DEFAULTS.values():
        assert cfg.digest("cpu") == _digest_before_amp(cfg)
    base = TrainConfig().digest("cpu")
    assert TrainConfig(amp="bf16").digest("cpu") != base
    assert TrainConfig(channels_last="on").digest("cpu") != base
    assert len({TrainConfig(amp="bf16").digest("cpu"), TrainConfig(channels_last="on").digest("cpu"),
                TrainConfig(amp="bf16", channels_last="on").digest("cpu")}) == 3
    if not torch.cuda.is_available():
        assert TrainConfig().digest() == base  # "auto" device is the CPU here
        assert T.cache_path("mlp", "digits", 0, TrainConfig(), "/c") == Path(f"/c/models/mlp-digits-seed0-{base}.pt")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_resolves_per_device(monkeypatch, native_bf16):
    """auto: bf16 + channels-last on a CUDA device with native bf16, channels-last only where
    bf16 is emulated, neither on CPU; the digest follows the resolved values."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation)
    cuda, cpu = TrainConfig().resolved("cuda"), TrainConfig().resolved("cpu")
    assert (cuda.amp, cuda.channels_last) == ("bf16" if native_bf16 else "off", "on")
    assert (cpu.amp, cpu.channels_last) == ("off", "off")
    assert TrainConfig().resolved() == cuda == TrainConfig().resolved(torch.device("cuda", 0))
    assert TrainConfig().digest("cuda") == cuda.digest("cpu") != TrainConfig().digest("cpu")
    assert TrainConfig(amp="bf16", channels_last="off").resolved("cpu").amp == "bf16"  # explicit stays
    assert TrainConfig(amp="off").resolved("cuda").amp == "off"
    # cuda_graphs auto: on for AdamW on CUDA, off on CPU and for SGD; explicit values kept
    assert (cuda.cuda_graphs, cpu.cuda_graphs) == ("on", "off")
    assert TrainConfig(optimizer="sgd").resolved("cuda").cuda_graphs == "off"
    assert TrainConfig(cuda_graphs="off").resolved("cuda").cuda_graphs == "off"
    assert TrainConfig(cuda_graphs="on").resolved("cuda") == cuda
    assert TrainConfig(cuda_graphs="on").digest("cuda") == TrainConfig().digest("cuda")
    # the eager recipe on CUDA (beta1 cycled by OneCycleLR) keeps a key of its own
    assert TrainConfig(cuda_graphs="off").digest("cuda") != TrainConfig().digest("cuda")
    assert TrainConfig(cuda_graphs="off").digest("cuda") == TrainConfig(cuda_graphs="off").resolved("cuda").digest("cpu")


def test_cuda_graphs_validation():
    with pytest.raises(ValueError, match=r"^unknown cuda_graphs 'yes'; valid: auto, off, on$"):
        TrainConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match=r"^cuda_graphs='on' needs optimizer 'adamw' \(its capturable form\), got optimizer 'sgd'$"):
        TrainConfig(cuda_graphs="on", optimizer="sgd")
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^cuda_graphs='on' needs a CUDA device; training runs on cpu \(use cuda_graphs='off'\)$"):
        train_model(model, load_dataset("digits", seed=0), TrainConfig(cuda_graphs="on"), device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))  # untouched


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedule_feed_gives_the_schedulers_values_step_by_step(schedule):
    """The graphed step's AdamW reads its lr from a tensor that :class:`_ScheduleFeed` fills each
    step: the values are those PyTorch's scheduler (OneCycleLR without momentum cycling) gives a
    plain AdamW, beta1 stays 0.9, and training a model with them gives the plain AdamW's weights
    to float32 tolerance. (On CPU the capturable form does not run: the same tensor lr, the
    non-capturable step.)"""
    cfg = TrainConfig(lr=3e-3, schedule=schedule)
    steps = 12
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    b = copy.deepcopy(a)
    opt_a = T._optimizer(a.parameters(), cfg)
    sched = T._scheduler(opt_a, cfg, steps, cycle_momentum=False)
    opt_b = T._capturable_adamw(b.parameters(), cfg, torch.device("cpu"), capturable=False, foreach=False)
    feed = T._ScheduleFeed(opt_b, cfg, steps)
    g = torch.Generator().manual_seed(1)
    lrs = set()
    for _ in range(steps):
        ga, gb = opt_a.param_groups[0], opt_b.param_groups[0]
        assert torch.is_tensor(gb["lr"])
        assert gb["lr"].item() == pytest.approx(ga["lr"], rel=1e-6)
        assert gb["betas"] == ga["betas"] == (0.9, 0.999)
        lrs.add(round(ga["lr"], 12))
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
        if sched is not None:
            sched.step()
        feed.step()
    assert (len(lrs) > steps // 2) == (schedule != "constant")  # the schedule did move
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_a_graphed_steps_schedule_and_optimizer_resume_where_they_stopped(tmp_path):
    """The graphed recipe's optimizer (a tensor lr, filled by :class:`_ScheduleFeed`) kept after 5
    of 12 steps and restored into a new model, optimizer and feed (train_model's way,
    ``_restore_training``, through the kept file) continues as the run never stopped: the same lr
    each step and the same weights, bit for bit on CPU (the non-capturable step, as above); the
    optimizer keeps its own lr tensor (a captured step reads that one), not the file's."""
    cfg = TrainConfig(lr=3e-3, schedule="onecycle")
    steps, stop = 12, 5
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]

    def fresh():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = T._capturable_adamw(net.parameters(), cfg, torch.device("cpu"), capturable=False, foreach=False)
        return net, opt, T._ScheduleFeed(opt, cfg, steps)

    def run(net, opt, feed, todo, lrs):
        for x, y in todo:
            lrs.append(opt.param_groups[0]["lr"].item())
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            feed.step()

    a, opt_a, feed_a = fresh()
    lrs_a: list[float] = []
    run(a, opt_a, feed_a, batches, lrs_a)

    b, opt_b, feed_b = fresh()
    lrs_b: list[float] = []
    run(b, opt_b, feed_b, batches[:stop], lrs_b)
    kept_at = tmp_path / "state.pt"
    T._save_resume(kept_at, {"k": 1}, {"epoch": 1, "model": b.state_dict(), "optimizer": opt_b.state_dict(),
                                       "schedule": feed_b.state_dict()})
    c, opt_c, feed_c = fresh()
    own_lr = opt_c.param_groups[0]["lr"]
    T._restore_training(T._read_resume(kept_at, {"k": 1}), c, opt_c, None, feed_c)
    assert opt_c.param_groups[0]["lr"] is own_lr
    run(c, opt_c, feed_c, batches[stop:], lrs_b)
    assert lrs_b == lrs_a and len(set(lrs_a)) > steps // 2
    assert all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def _train_before_amp(model, bundle, config):
    """The training loop as it was before amp/channels-last (one loss.item() per step): the
    oracle for "float32 training on CPU is unchanged"."""
    import torch.nn.functional as F

    from wavesweep.data import make_loader

    dev = torch.device("cpu")
    T._seed_everything(config.seed)
    loader = make_loader(bundle.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    steps = len(loader) * config.epochs
    model.to(dev).train()
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, nesterov=True)
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    elif config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        sched = None
    running = float("nan")
    for epoch in range(config.epochs):
        for x, y in loader:
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            running = loss.item() if running != running else 0.9 * running + 0.1 * loss.item()
    model.eval()
    return running


@pytest.mark.parametrize(
    "name,cfg",
    [pytest.param("mlp", FAST, marks=pytest.mark.slow),  # training, twice
     pytest.param("cnn", TrainConfig(epochs=1, batch_size=64, lr=1e-2, optimizer="sgd", schedule="cosine"),
                  marks=pytest.mark.slow)],
)
def test_cpu_training_is_bit_identical_to_the_loop_before_amp(name, cfg):
    """Defaults on CPU (amp and channels-last resolve to off): the same weights, bit for bit,
    as the loop before (which read loss.item() every step); the running loss agrees to float32."""
    bundle = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    ours = build_model(name, num_classes=10, in_channels=1, image_size=8)
    ref = copy.deepcopy(ours)
    info = train_model(ours, bundle, cfg, device="cpu", progress=False)
    running = _train_before_amp(ref, bundle, cfg)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert info["train_loss"] == pytest.approx(running, rel=1e-5)
    assert info["config"]["amp"] == info["config"]["channels_last"] == "off"


@pytest.mark.slow  # training
def test_bf16_autocast_and_channels_last_train_on_cpu():
    """amp=bf16 and channels_last=on run on CPU too (the code path a GPU takes): the forward
    runs in bf16, the loss falls, and the model comes back float32, contiguous, eval, on CPU."""
    bundle = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, amp="bf16", channels_last="on")
    seen = []  # (fc output dtype, whether conv 2's weight is channels-last) per training forward
    conv2 = model.features[3]  # (64, 32, 3, 3)
    hook = model.fc.register_forward_hook(
        lambda m, i, o: seen.append((o.dtype, conv2.weight.is_contiguous(memory_format=torch.channels_last)
                                     and not conv2.weight.is_contiguous())) if m.training else None
    )
    info = train_model(model, bundle, cfg, device="cpu", progress=False)
    hook.remove()
    assert seen and set(seen) == {(torch.bfloat16, True)}  # autocast ran; weights were channels-last
    assert info["config"]["amp"] == "bf16" and info["config"]["channels_last"] == "on"
    assert info["train_loss"] < 1.0 < 2.3  # from ~ln(10) at the start
    assert info["test_top1"] > 0.6, info
    assert not model.training
    for k, t in model.state_dict().items():
        assert t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64), k
        assert t.is_contiguous(), k  # not channels-last: checkpoints keep the usual layout


def test_get_base_model_keys_the_cache_by_resolved_settings(tmp_path):
    """An explicit device resolves auto before the key is taken: training on CPU with the
    default config lands in the file name the float32 digest gives."""
    cfg = dataclasses.replace(FAST, epochs=1)
    bm = get_base_model("mlp", "digits", seed=0, train_config=cfg, device="cpu", progress=False)
    fp = data_fingerprint(load_dataset("digits", seed=0))
    assert bm.path.name == f"mlp-digits-seed0-{_digest_before_amp(cfg)}-{fp}.pt"
    assert bm.train_info["config"]["amp"] == "off"


def test_another_copy_of_a_dataset_with_other_labels_gets_its_own_model_and_base_evaluation(tmp_path, monkeypatch):
    """Two KMNIST folders with the same file names and other labels: each trains its own base
    model (the cache key holds the data's fingerprint) and a trial on the second scores the
    base against the second's labels (the base evaluation's cache key holds it too). Oracle: the
    labels written to the files."""
    from tests.test_data import make_idx_set
    from wavesweep import trial as trial_mod
    from wavesweep.config import TrialConfig
    from wavesweep.data_sources import write_idx

    first = make_idx_set(tmp_path / "a" / "kmnist", n_train=40, n_test=20, gz=False)
    make_idx_set(tmp_path / "b" / "kmnist", n_train=40, n_test=20, gz=False)
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):  # the same images, labels shifted by 3
        write_idx(tmp_path / "b" / "kmnist" / stem, (first[stem] + 3) % 10)
    trained = []
    real_train = T.train_model
    monkeypatch.setattr(T, "train_model", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    kw = {"seed": 0, "train_config": FAST, "device": "cpu", "progress": False}
    a, b = (get_base_model("mlp", "kmnist", data_root=tmp_path / d / "kmnist", **kw) for d in ("a", "b"))
    assert len(trained) == 2 and a.path != b.path and a.checksum != b.checksum
    assert get_base_model("mlp", "kmnist", data_root=tmp_path / "a" / "kmnist", **kw).path == a.path and len(trained) == 2
    cfg = TrialConfig(model="mlp", dataset="kmnist", targets="linear", recovery="none", timing_batches=0, device="cpu")
    for d, labels in (("a", first["t10k-labels-idx1-ubyte"]), ("b", (first["t10k-labels-idx1-ubyte"] + 3) % 10)):
        monkeypatch.setenv("WAVESWEEP_DATA", str(tmp_path / d))  # data_root unset: found through the environment
        assert get_base_model("mlp", "kmnist", **kw).path == {"a": a, "b": b}[d].path
        r = trial_mod.run_trial(cfg, base=a)  # one model (a weights file) on both: the base is scored on each's labels
        assert sorted(r.base_eval.targets.tolist()) == sorted(labels.tolist())
        assert r.base_eval.targets.tolist() == r.outcomes["dwt"].eval.targets.tolist()


def _bn_net() -> torch.nn.Module:
    """BatchNorm1d after pooling: one value per channel in a batch of one (as ResNet-18's last
    BatchNorm layers on 1x1 maps)."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 10))


def test_a_last_training_batch_of_one_is_left_out_for_batchnorm(caplog):
    """1437 digits in batches of 359 leave a last batch of one: BatchNorm raised after a whole
    epoch's work. That example is now left out of each epoch (drop_last); the weights equal a
    direct loop over torch.randperm with the last incomplete batch dropped."""
    import torch.nn.functional as F

    bundle = load_dataset("digits", seed=0)
    n, cfg = len(bundle.train), TrainConfig(epochs=2, batch_size=359, lr=3e-3, schedule="constant")
    assert n % cfg.batch_size == 1
    torch.manual_seed(0)
    ours = _bn_net()
    ref = copy.deepcopy(ours)
    with caplog.at_level("WARNING", logger="wavesweep.train"):
        info = train_model(ours, bundle, cfg, device="cpu", progress=False)
    assert info["dropped_per_epoch"] == 1 and "left out of each epoch" in caplog.text

    T._seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref.train()
    steps = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - 1, cfg.batch_size):
            x, y = bundle.train[perm[i : i + cfg.batch_size]]
            loss = F.cross_entropy(ref(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    assert steps == cfg.epochs * (n // cfg.batch_size)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))

    # a model without BatchNorm keeps every example
    torch.manual_seed(0)
    assert train_model(build_model("mlp", num_classes=10, in_channels=1, image_size=8), bundle,
                       dataclasses.replace(cfg, epochs=1), device="cpu", progress=False)["dropped_per_epoch"] == 0


def test_training_batches_of_one_under_batchnorm_is_one_line():
    bundle = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^batch_size=1: a BatchNorm layer of Sequential sees one value per channel "
                                         r"in a training batch of 1 \(Expected more .*\); use batch_size >= 2$") as err:
        train_model(_bn_net(), bundle, TrainConfig(epochs=1, batch_size=1), device="cpu", progress=False)
    assert "\n" not in str(err.value)


def test_a_training_split_of_one_example_under_batchnorm_names_the_split():
    """One training example: every batch is that one, whatever batch_size says (the line told the
    user to raise batch_size=64 to >= 2)."""
    bundle = load_dataset("digits", seed=0)
    one = dataclasses.replace(bundle, train=take(bundle.train, np.array([0])))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^the training split holds 1 example: a BatchNorm layer of Sequential sees one "
                                         r"value per channel in a training batch of 1 \(Expected .*\), whatever "
                                         r"batch_size is; give it at least 2 training examples$") as err:
        train_model(_bn_net(), one, TrainConfig(epochs=1, batch_size=64), device="cpu", progress=False)
    assert "\n" not in str(err.value)


def test_tensor_batches_drop_last_equal_torchs_dataloader():
    from torch.utils.data import DataLoader

    from wavesweep.data import _TensorBatches

    for n, bs in ((10, 3), (9, 3), (1, 4), (7, 1)):
        seq = list(_TensorBatches(n, bs, shuffle=False, seed=0, drop_last=True))
        ref = list(DataLoader(range(n), batch_size=bs, drop_last=True))
        assert [list(range(n))[s] for s in seq] == [r.tolist() for r in ref] and len(seq) == len(ref)
        shuffled = _TensorBatches(n, bs, shuffle=True, seed=5, drop_last=True)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
        assert [b.tolist() for b in shuffled] == [b.tolist() for b in perm[: n - n % bs].split(bs)][: n // bs]
        assert len(shuffled) == n // bs


# --------------------------------------------------------------------------- CUDA graphs (GPU only)


def _graph_bundle(n_train: int = 200):
    """A small in-memory image set: 200 training images make 6 batches of 32 and a short one of 8."""
    from wavesweep.data import DatasetBundle, TensorImages

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n_train + 64, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (n_train + 64,), generator=g)
    mk = lambda a, b: TensorImages(x[a:b], y[a:b], divisor=255.0, mean=(0.4,), std=(0.3,))  # noqa: E731
    return DatasetBundle(name="graph-set", train=mk(0, n_train), test=mk(n_train, n_train + 64), num_classes=4,
                         in_channels=1, image_size=12)


def _graph_net() -> nn.Module:
    torch.manual_seed(0)
    # no bias before a BatchNorm (either conv): its gradient is rounding noise, which AdamW's
    # normalisation turns into full-size steps of either sign
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4))


#: graphed against eager training of :func:`_graph_net` (2 epochs, lr 3e-3), by amp. The two
#: AdamW steps round differently (capturable: float32 lr and bias corrections on the device), and
#: weights whose gradient is near zero amplify one ulp to ~1e-5 over 14 steps; an lr fed one step
#: late is ~6e-3 off, an lr not fed ~2e-2 (measured on CPU: test_graphed_steps_optimizer_...)
_GRAPH_TOL = {"off": {"rtol": 1e-4, "atol": 2e-4}, "auto": {"rtol": 2e-2, "atol": 2e-3}}  # auto: bf16 forward


def _cpu_capturable_adamw(monkeypatch) -> None:
    """Lets PyTorch's capturable AdamW step run on CPU tensors (it refuses devices it cannot
    graph-capture on): the very arithmetic a replayed step does, without a GPU."""
    import torch.optim.adam as adam

    supported = getattr(adam, "_get_capturable_supported_devices", None)
    if supported is None:
        pytest.skip("this torch's AdamW has no _get_capturable_supported_devices to widen")
    monkeypatch.setattr(adam, "_get_capturable_supported_devices",
                        lambda supports_xla=True: [*supported(supports_xla), "cpu"])


@pytest.mark.parametrize("amp", ["off", "auto"])
def test_graphed_steps_optimizer_matches_eager_within_the_cuda_tests_tolerance(amp, monkeypatch):
    """The arithmetic of the graphed recipe (capturable, foreach AdamW with the lr tensor that
    _ScheduleFeed fills, run here on CPU) against eager training (plain AdamW and scheduler), on the
    CUDA test's net, data and tolerances: within them, and an lr fed one step late is not. With a
    conv bias before a BatchNorm (the net before) that bias and the BatchNorm's running mean
    drifted apart by ~1e-2: the CUDA test could not pass for a correct implementation."""
    import contextlib
    import warnings

    from wavesweep.data import make_loader

    _cpu_capturable_adamw(monkeypatch)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, schedule="cosine")
    loader = make_loader(_graph_bundle().train, batch_size=32, shuffle=True, seed=0)
    steps = cfg.epochs * len(loader)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "auto" else contextlib.nullcontext
    nets = [_graph_net().train() for _ in range(3)]  # eager, graphed, graphed with its lr one step late
    eager = T._optimizer(nets[0].parameters(), cfg)
    sched = T._scheduler(eager, cfg, steps)
    graphed = [T._capturable_adamw(n.parameters(), cfg, torch.device("cpu")) for n in nets[1:]]
    feeds = [T._ScheduleFeed(o, cfg, steps) for o in graphed]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
        for _ in range(cfg.epochs):
            for x, y in loader:
                feeds[1].step()  # before the step: one step late
                for net, opt in zip(nets, [eager, *graphed]):
                    opt.zero_grad(set_to_none=True)
                    with autocast():
                        loss = F.cross_entropy(net(x), y)
                    loss.backward()
                    opt.step()
                sched.step()
                feeds[0].step()
    assert all(int(o.state[p]["step"]) == steps for o in graphed for p in o.state)
    for (k, a), b in zip(nets[1].state_dict().items(), nets[0].state_dict().values()):
        torch.testing.assert_close(a, b, **_GRAPH_TOL[amp], msg=k)
    with pytest.raises(AssertionError):
        for a, b in zip(nets[2].state_dict().values(), nets[0].state_dict().values()):
            torch.testing.assert_close(a, b, **_GRAPH_TOL[amp])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["off", "auto"])
def test_cuda_graph_training_equals_eager_training(amp, monkeypatch):
    """With cuda_graphs on, the training step is captured as a CUDA graph after 3 eager warm-up steps
    and replays it for every full batch; a short last batch runs eagerly between replays. The
    weights, BatchNorm statistics and loss equal those of the same training without graphs
    (PyTorch's plain AdamW and scheduler) to float tolerance, and ``graph_steps`` counts the replays:
    2 epochs of 6 full batches and a short one = 14 steps, 3 warm-up, 2 eager short ones, 9 replays."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    bundle = _graph_bundle()
    # cosine: no momentum to cycle, so both runs follow the same recipe
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, schedule="cosine", amp=amp, channels_last="auto", cuda_graphs="on")
    graphed, eager = _graph_net(), _graph_net()
    info_g = train_model(graphed, bundle, cfg, device="cuda", progress=False)
    info_e = train_model(eager, bundle, dataclasses.replace(cfg, cuda_graphs="off"), device="cuda", progress=False)
    assert (info_g["graph_steps"], info_e["graph_steps"]) == (9, 0)
    assert info_g["config"]["cuda_graphs"] == "on" and info_e["config"]["cuda_graphs"] == "off"
    for (k, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        assert a.device.type == "cpu" and a.is_contiguous(), k
        torch.testing.assert_close(a, b, **_GRAPH_TOL[amp], msg=k)
    assert int(graphed[1].num_batches_tracked) == 14
    assert info_g["train_loss"] == pytest.approx(info_e["train_loss"], rel=1e-3 if amp == "off" else 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet18", "resnet50", "vit_b_16"])
def test_cuda_default_training_of_every_registry_model_is_graphed(name):
    """The default config on CUDA (cuda_graphs auto: on for AdamW) captures and replays the
    training step of every model of the registry: 6 full batches of 16 and a short one give 3
    warm-up steps, then 3 replays, the short batch eager between them. The trained weights are
    finite, and no eager step after the capture meets the capture's autograd nodes (PyTorch's
    AccumulateGrad stream warning: the captured loss kept its autograd graph alive)."""
    from wavesweep.data import DatasetBundle, TensorImages

    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (104 + 32, 1, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (104 + 32,), generator=g)
    mk = lambda a, b: TensorImages(x[a:b], y[a:b], divisor=255.0, mean=(0.4,), std=(0.3,))  # noqa: E731
    bundle = DatasetBundle(name="graph-set", train=mk(0, 104), test=mk(104, 136), num_classes=4, in_channels=1,
                           image_size=32)
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, in_channels=1, image_size=32)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3)
    assert cfg.resolved("cuda").cuda_graphs == "on"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = train_model(model, bundle, cfg, device="cuda", progress=False)
    assert info["config"]["cuda_graphs"] == "on" and info["graph_steps"] == 3
    assert all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    assert math.isfinite(info["test_loss"])
    assert not [w for w in caught if "AccumulateGrad" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", ["off", "on"])
def test_cuda_training_stopped_and_resumed_equals_one_never_stopped(graphs, tmp_path, monkeypatch):
    """On CUDA (eager, and with graphs: the resumed run warms up and captures again), a training
    stopped after epoch 1 and resumed equals one never stopped to the graph tests' tolerance, and
    the learning rate a captured step reads stays a tensor on the device after the resume."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    bundle = _graph_bundle()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, schedule="cosine", amp="off", channels_last="auto", cuda_graphs=graphs)
    plain = _graph_net()
    info_p = train_model(plain, bundle, cfg, device="cuda", progress=False)
    start = copy.deepcopy(_graph_net())
    kept_at = tmp_path / "state.pt"
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_model(copy.deepcopy(start), bundle, cfg, device="cuda", progress=False, resume=kept_at, resume_key="k")
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    lrs = []
    real_feed = T._ScheduleFeed.load_state_dict
    monkeypatch.setattr(T._ScheduleFeed, "load_state_dict",
                        lambda self, st: (real_feed(self, st), lrs.extend(g["lr"] for g in self.opt.param_groups)))
    resumed = copy.deepcopy(start)
    info_r = train_model(resumed, bundle, cfg, device="cuda", progress=False, resume=kept_at, resume_key="k")
    assert info_r["resumed_at_epoch"] == 1 and info_r["device"].startswith("cuda")
    if graphs == "on":
        assert lrs and all(isinstance(lr, torch.Tensor) and lr.device.type == "cuda" for lr in lrs)
        assert info_r["graph_steps"] == info_p["graph_steps"] - T.GRAPH_WARMUP_STEPS  # captured again after a warm-up
    for (k, a), b in zip(resumed.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, **_GRAPH_TOL["off"], msg=k)


class _SyncsInForward(nn.Module):
    """A model whose forward pass waits for the host (``.item()``): it cannot be captured."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _graph_net()

    def forward(self, x):
        out = self.net(x)
        if out.abs().max().item() > 1e30:
            raise AssertionError("not reached")
        return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_model_that_cannot_be_captured_is_one_clear_error():
    """A step that cannot be captured is one RuntimeError naming the first cause and the way out
    (no eager fallback: a failed capture can leave the allocator in the graph's pool), and CUDA
    still works afterwards."""
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, amp="off", channels_last="off", cuda_graphs="on")
    with pytest.raises(RuntimeError, match=r"^cuda_graphs='on': the training step could not be captured as a CUDA "
                                           r"graph \(.+\); use cuda_graphs='off'$"):
        train_model(_SyncsInForward(), _graph_bundle(), cfg, device="cuda", progress=False)
    assert torch.ones(3, device="cuda").sum().item() == 3.0


def test_the_step_is_captured_thread_local_and_a_failed_capture_names_its_first_cause(monkeypatch):
    """The capture runs in ``thread_local`` mode: in PyTorch's default ``global`` mode the pinning
    thread of a file dataset's DataLoader (cudaHostAlloc, cudaEventQuery while the batch after is
    pinned) breaks a capture from this thread, or not, by timing. A failure is one RuntimeError
    naming the first error, not the one capture_end raises after it. (torch.cuda's graph faked, on CPU:
    the body runs, then ends as an invalidated capture does.)"""
    import contextlib

    modes = []

    class Invalidated:
        def __init__(self, graph, **kwargs):
            modes.append(kwargs.get("capture_error_mode", "global"))

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def forward_loss(x, y, cache_enabled=True):
        assert cache_enabled is False  # autocast's weight cache is not allowed under capture
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", Invalidated)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(RuntimeError, match=r"^cuda_graphs='on': the training step could not be captured as a CUDA graph "
                                           r"\(RuntimeError: CUDA error: operation not permitted when stream is capturing\); "
                                           r"use cuda_graphs='off'$"):
        T._GraphedStep.capture(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), forward_loss, opt)
    assert modes == ["thread_local"]


# --------------------------------------------------------------------------- file datasets, worker processes


def _tiny_imagefolder(root: Path):
    """imagefolder at 16 px: 3 classes of 5 training images (random flips), 1 val image each."""
    from tests.test_data import make_image_folder

    make_image_folder(root / "train", ["a", "b", "c"], per_class=5)
    make_image_folder(root / "val", ["a", "b", "c"], per_class=1)
    return load_dataset("imagefolder", root=root, image_size=16)


def test_a_file_training_loader_gives_the_same_epochs_for_any_worker_count(tmp_path):
    """``make_loader``'s workers drew imagefolder's flips from their own generators (seeded by
    worker id): two epochs with 2 workers differed from the same epochs in the main process."""
    from wavesweep.data import make_loader, shutdown_workers

    train = _tiny_imagefolder(tmp_path).train
    epochs = {}
    for workers in (0, 2, 1):
        loader = make_loader(train, batch_size=4, shuffle=True, seed=3, num_workers=workers)
        try:
            epochs[workers] = [[(x, y) for x, y in loader] for _ in range(2)]
        finally:
            shutdown_workers(loader)
    a = epochs[0]
    assert [len(e) for e in a] == [4, 4] and a[0][-1][0].shape == (3, 3, 16, 16)  # 15 = 3 * 4 + 3
    for other in (epochs[2], epochs[1]):
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for ea, eb in zip(a, other) for (xa, ya), (xb, yb) in zip(ea, eb))
    assert sorted(torch.cat([y for _, y in a[0]]).tolist()) == sorted(train.targets)  # an epoch is a permutation
    # the second epoch is a new order and new draws (position = epoch * 15 + k)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(a[0], a[1]))


def test_training_on_an_imagefolder_gives_the_same_weights_with_0_and_2_workers(tmp_path, monkeypatch, decoding_processes):
    """Base training read a file dataset in the main process; now in ``data.default_num_workers()``
    worker processes (stopped when training ends), with the same weights for 0 and 2 of them."""
    import multiprocessing

    from wavesweep import data

    bundle = _tiny_imagefolder(tmp_path)
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2)
    weights = {}
    for workers in (0, 2):
        monkeypatch.setattr(data, "default_num_workers", lambda w=workers: w)
        torch.manual_seed(0)
        model = build_model("cnn", num_classes=3, in_channels=3, image_size=16)
        train_model(model, bundle, config, device="cpu", progress=False)
        weights[workers] = model.state_dict()
    workers_seen = {pid for pid, split in decoding_processes() if split == "train" and pid != os.getpid()}
    assert workers_seen, "no training image was decoded in a worker process"
    # the training workers stopped with the training (the final evaluation's stay with bundle.test)
    assert workers_seen.isdisjoint(p.pid for p in multiprocessing.active_children())
    data.close_loaders(bundle.test)
    a, b = weights[0], weights[2]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- resuming a stopped training


def _stop_after_first_save(monkeypatch):
    """``train_model`` stops (as Ctrl-C stops it) right after it first keeps its state; returns the
    epochs it kept."""
    real, kept = T._save_resume, []

    def save_then_stop(path, identity, state):
        real(path, identity, state)
        kept.append(state["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_resume", save_then_stop)
    return kept


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, config", [
    ("mlp", FAST),  # AdamW, one-cycle
    ("cnn", TrainConfig(epochs=3, batch_size=32, lr=1e-2, optimizer="sgd", schedule="cosine", momentum=0.8)),
])
def test_a_stopped_training_resumes_into_the_weights_of_one_never_stopped(name, config, tmp_path, monkeypatch):
    """Oracle: the same training run without a stop. Stopped after its state was kept at the end of
    epoch 1 and started again (from other initial weights: they must not matter), it gives the same
    weights, loss and accuracy bit for bit; the optimizer, schedule, data order and random state
    all come back."""
    bundle = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    plain = build_model(name, num_classes=10, in_channels=1, image_size=8)
    want = train_model(plain, bundle, config, device="cpu", progress=False)
    assert want["resumed_at_epoch"] == 0

    kept_at = tmp_path / "state.pt"
    # kept at most every RESUME_EVERY_SECONDS: a training of a few seconds keeps nothing
    torch.manual_seed(0)
    once = build_model(name, num_classes=10, in_channels=1, image_size=8)
    train_model(once, bundle, config, device="cpu", progress=False, resume=kept_at, resume_key="k")
    assert not kept_at.exists() and _same_state(once, plain)

    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    kept = _stop_after_first_save(monkeypatch)
    torch.manual_seed(0)
    stopped = build_model(name, num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(KeyboardInterrupt):
        train_model(stopped, bundle, config, device="cpu", progress=False, resume=kept_at, resume_key="k")
    assert kept == [1]
    saved = torch.load(kept_at, weights_only=True)  # readable without running code
    assert saved["epoch"] == 1 and saved["step"] == len(range(0, len(bundle.train), config.batch_size))
    monkeypatch.undo()
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    torch.manual_seed(123)
    resumed = build_model(name, num_classes=10, in_channels=1, image_size=8)
    got = train_model(resumed, bundle, config, device="cpu", progress=False, resume=kept_at, resume_key="k")
    assert _same_state(resumed, plain)
    assert got["resumed_at_epoch"] == 1
    for key in ("test_top1", "test_loss", "train_loss", "epochs", "n_train", "config"):
        assert got[key] == want[key], key
    assert got["seconds"] > saved["seconds"] > 0
    assert torch.load(kept_at, weights_only=True)["epoch"] == 2  # kept again after epoch 2; the caller removes it


def test_a_stopped_training_on_image_files_resumes_into_the_same_weights(tmp_path, monkeypatch):
    """A file dataset's loader (per-example draws for its random flips, positioned by epoch)
    resumes at its epoch: stopped after epoch 1 with 2 decoding workers and resumed with none, the
    weights equal a training never stopped."""
    from wavesweep import data

    bundle = _tiny_imagefolder(tmp_path)
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-2)
    monkeypatch.setattr(data, "default_num_workers", lambda: 0)
    torch.manual_seed(0)
    plain = build_model("cnn", num_classes=3, in_channels=3, image_size=16)
    train_model(plain, bundle, config, device="cpu", progress=False)

    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(data, "default_num_workers", lambda: 2)
    _stop_after_first_save(monkeypatch)
    torch.manual_seed(0)
    stopped = build_model("cnn", num_classes=3, in_channels=3, image_size=16)
    kept_at = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train_model(stopped, bundle, config, device="cpu", progress=False, resume=kept_at, resume_key="k")
    assert not _same_state(stopped, plain)
    monkeypatch.undo()
    monkeypatch.setattr(data, "default_num_workers", lambda: 0)
    resumed = build_model("cnn", num_classes=3, in_channels=3, image_size=16)
    info = train_model(resumed, bundle, config, device="cpu", progress=False, resume=kept_at, resume_key="k")
    assert info["resumed_at_epoch"] == 1 and _same_state(resumed, plain)
    data.close_loaders(bundle.test)


@pytest.mark.parametrize("other", ["key", "config", "unreadable", "architecture"])
def test_a_kept_state_of_another_training_is_set_aside(other, tmp_path, monkeypatch, caplog):
    """A state kept for another cache entry or config, or a damaged file, is not resumed from: the
    training starts afresh (the weights of one never stopped) and says why in one log line."""
    import logging

    bundle = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    plain = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    train_model(plain, bundle, FAST, device="cpu", progress=False)
    kept_at = tmp_path / "state.pt"
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    _stop_after_first_save(monkeypatch)
    torch.manual_seed(0)
    # another MLP of the same class: a state of other shapes, which loading would refuse on every retry
    stopped = MLP(10, 64, hidden=(16,)) if other == "architecture" else build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(KeyboardInterrupt):
        train_model(stopped, bundle,
                    dataclasses.replace(FAST, lr=1e-3) if other == "config" else FAST,
                    device="cpu", progress=False, resume=kept_at, resume_key="other" if other == "key" else "k")
    if other == "unreadable":
        kept_at.write_bytes(kept_at.read_bytes()[:1000])
    monkeypatch.undo()
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    with caplog.at_level(logging.WARNING, logger="wavesweep.train"):
        info = train_model(model, bundle, FAST, device="cpu", progress=False, resume=kept_at, resume_key="k")
    assert info["resumed_at_epoch"] == 0 and _same_state(model, plain)
    lines = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert {"key": "it differs in: key)", "config": "it differs in: config)", "unreadable": "cannot be read",
            "architecture": "it differs in: shapes)"}[other] in lines[0]
    assert not kept_at.exists()


def test_get_base_model_resumes_a_stopped_training_and_removes_the_kept_state(tmp_path, monkeypatch, caplog):
    """The cache's training keeps its state beside the cache entry; a second request after a stop
    resumes it (the cached weights equal those of a cache that was never stopped: another cache
    root), and the kept state is removed once the model is cached."""
    import logging

    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    models = tmp_path / "cache" / "models"
    kept = list(models.glob("*.resume.pt"))
    assert len(kept) == 1
    entry = kept[0].with_name(kept[0].name.replace(".resume.pt", ".pt"))
    assert kept == [T.resume_path(entry)] and not entry.exists()
    monkeypatch.undo()
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="wavesweep.train"):
        a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert a.path == entry and a.train_info["resumed_at_epoch"] == 1
    assert "resuming the training of MLP on digits after epoch 1 of 3" in caplog.text
    assert not T.resume_path(entry).exists() and not list(models.glob("*.tmp"))
    b = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False,
                       cache_root=tmp_path / "never-stopped")
    assert b.train_info["resumed_at_epoch"] == 0 and _same_state(a.model, b.model)
    assert a.train_info["test_top1"] == b.train_info["test_top1"]
    # a process stopped after caching the model but before removing the state: the next request removes it
    T.resume_path(entry).write_bytes(b"left by a process killed after it cached the model")
    c = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert c.checksum == a.checksum and not T.resume_path(entry).exists()


def test_a_write_of_the_state_killed_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    """A process killed while it writes the kept state leaves atomic_write's temporary file (never
    read: the kept state is the one renamed before); the next training of the entry, resuming,
    removes it. It stayed in the cache, one per kill, up to 135 MB each (ResNet-18, AdamW)."""
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    _stop_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    (kept,) = (tmp_path / "cache" / "models").glob("*.resume.pt")
    half = kept.with_name(f".{kept.name}.k9x2ab7q.tmp")  # as tempfile.mkstemp names atomic_write's
    half.write_bytes(kept.read_bytes()[:1000])
    other = kept.with_name(".other-entry.resume.pt.k9x2ab7q.tmp")  # another entry's: not this lock's
    other.write_bytes(b"x")
    a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert a.train_info["resumed_at_epoch"] == 1
    assert not half.exists() and not kept.exists() and other.exists()


def test_a_diverged_training_leaves_no_state_to_resume(tmp_path, monkeypatch):
    """A training that diverges would diverge again from its kept state: the state goes with it."""
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    with pytest.raises(ValueError, match="diverged"):
        get_base_model("mlp", "digits", seed=0, train_config=dataclasses.replace(FAST, lr=1e6), device="cpu",
                       progress=False)
    assert not list((tmp_path / "cache" / "models").glob("*.pt"))


def test_a_state_that_does_not_fit_on_the_disk_does_not_end_the_training(tmp_path, monkeypatch, caplog):
    """The kept state (AdamW: three times the model) may not fit where the model does. A full disk
    stopped the training with an OSError at its first write, and the model that would have fitted
    was not cached; now it is one warning, the training goes on (no more writes tried) and the cached
    model is that of a cache never stopped."""
    import contextlib
    import errno
    import logging

    from wavesweep import fileio

    class Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) says it: no file named
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    tries = []

    @contextlib.contextmanager
    def full_for_states(path, mode="wb"):
        with fileio.atomic_write(path, mode) as fh:
            if str(path).endswith(".resume.pt"):
                tries.append(path)
                yield Full(fh)
            else:
                yield fh

    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(T, "atomic_write", full_for_states)
    with caplog.at_level(logging.WARNING, logger="wavesweep.train"):
        a = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False)
    assert len(tries) == 1 and a.train_info["resumed_at_epoch"] == 0
    lines = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "goes on" in lines[0], caplog.text
    assert not T.resume_path(a.path).exists() and not list(a.path.parent.glob("*.tmp"))
    b = get_base_model("mlp", "digits", seed=0, train_config=FAST, device="cpu", progress=False,
                       cache_root=tmp_path / "never-stopped")
    assert _same_state(a.model, b.model) and a.train_info["test_top1"] == b.train_info["test_top1"]


def test_a_training_stopped_by_an_unreadable_image_keeps_its_state(tmp_path, monkeypatch):
    """An image file that cannot be read (a ValueError naming it) stopped the training after epoch 1
    was kept: the kept state was removed with it, as a diverged training's is, and with the file
    back (the same data, the same cache entry) the training started again from epoch 0. Only a
    diverged training removes it; this one resumes after epoch 1 into the weights of a cache never
    stopped."""
    from wavesweep import data

    root = tmp_path / "images"
    _tiny_imagefolder(root)
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-2)
    monkeypatch.setattr(data, "default_num_workers", lambda: 0)
    monkeypatch.setattr(T, "RESUME_EVERY_SECONDS", 0.0)
    victim = sorted((root / "train" / "a").iterdir())[0]
    away = victim.with_name(victim.name + ".away")
    real = T._save_resume

    def save_then_hide(path, identity, state):
        real(path, identity, state)
        if state["epoch"] == 1:
            victim.rename(away)  # gone for a moment (a network share, a sync tool)

    monkeypatch.setattr(T, "_save_resume", save_then_hide)
    get = lambda **kw: get_base_model("cnn", "imagefolder", data_root=root, image_size=16, seed=0,  # noqa: E731
                                      train_config=config, device="cpu", progress=False, **kw)
    with pytest.raises(ValueError, match="cannot be read"):
        get()
    (kept,) = (tmp_path / "cache" / "models").glob("*.resume.pt")
    assert torch.load(kept, weights_only=True)["epoch"] == 1
    away.rename(victim)
    monkeypatch.setattr(T, "_save_resume", real)
    a = get()
    assert a.train_info["resumed_at_epoch"] == 1 and not kept.exists()
    b = get(cache_root=tmp_path / "never-stopped")
    assert b.path.name == a.path.name and _same_state(a.model, b.model)


@pytest.mark.slow  # two processes train, one stopped by a real SIGINT
def test_wavesweep_train_stopped_by_ctrl_c_resumes_where_it_stopped(tmp_path):
    """`wavesweep train` stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it)
    after its state was kept at the end of epoch 1: exit 130 with one line, no cache entry, the
    state kept; run again, it says it resumes, and caches the weights of a training never stopped
    (oracle: ``get_base_model`` in another cache, in this process)."""
    import signal

    env = {**os.environ, "WAVESWEEP_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(T.__file__).parents[1])}
    start = ("import sys, time, wavesweep.train as T\n"
             "T.RESUME_EVERY_SECONDS = 0.0\n"
             f"T._DEFAULTS[('mlp', 'digits')] = T.{FAST!r}\n"  # 3 epochs, not 30
             "real = T._save_resume\n"
             "def kept_then_wait(*a, **k):\n"
             "    real(*a, **k)\n"
             "    print('KEPT', flush=True)\n"
             "    time.sleep(120)\n"
             "T._save_resume = kept_then_wait if sys.argv[1] == 'stop' else T._save_resume\n"
             "from wavesweep.cli import run\n"
             "run(['train', '--model', 'mlp', '--dataset', 'digits', '--device', 'cpu', '--quiet'])\n")
    proc = subprocess.Popen([sys.executable, "-c", start, "stop"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "KEPT", proc.stderr.read() if proc.poll() is not None else ""
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "wavesweep: interrupted" in err and "Traceback" not in err, err
    models = tmp_path / "cache" / "models"
    (kept,) = models.glob("*.resume.pt")
    entry = kept.with_name(kept.name.replace(".resume.pt", ".pt"))
    assert not entry.exists() and torch.load(kept, weights_only=True)["epoch"] == 1

    again = subprocess.run([sys.executable, "-c", start, "go"], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming the training of MLP on digits after epoch 1 of" in again.stderr
    printed = json.loads(again.stdout)
    assert printed["resumed_at_epoch"] == 1 and printed["path"] == str(entry) and not kept.exists()
    oracle = get_base_model("mlp", "digits", seed=0, device="cpu", progress=False, train_config=FAST,
                            cache_root=tmp_path / "never-stopped")
    cached = torch.load(entry, weights_only=True)["state_dict"]
    want = oracle.model.state_dict()
    assert cached.keys() == want.keys() and all(torch.equal(cached[k], want[k]) for k in want)
    assert printed["test_top1"] == oracle.train_info["test_top1"]
