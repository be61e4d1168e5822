"""The base-evaluation cache of ``trial._base_eval_cached`` against its oracle, a fresh
evaluation of the same model on the same examples (no trial, no MLflow); and where a trial's
pruning runs: on its device, the accelerator paths giving the CPU paths' numbers."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from wavesweep import evaluate, train, trial
from wavesweep.config import TrialConfig
from wavesweep.data import eval_subset, load_dataset
from wavesweep.models import build_model

FP = "0123456789abcdef"  # a data fingerprint (data.data_fingerprint)
SEL = "00112233aabbccdd"  # a selection digest (trial.eval_parts)
SEL = "00112233aabbccdd"  # a selection digest (trial.eval_parts)


@pytest.fixture
def base_and_set(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "image_size": 8}
    model = build_model("cnn", **kw).eval()  # untrained: its logits are as good an oracle as any
    base = train.BaseModel(model, "cnn", "digits", 0, "trained", tmp_path / "w.pt", "ab" * 32, kw)
    cfg = TrialConfig(model="cnn", dataset="digits", eval_limit=120, device="cpu")
    eval_set = eval_subset(load_dataset("digits").test, cfg.eval_limit, cfg.seed)
    return base, cfg, eval_set


def _same(a: evaluate.EvalResult, b: evaluate.EvalResult) -> None:
    assert a.metrics() == b.metrics() and a.n == b.n
    for f in ("correct", "preds", "targets"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_cached_base_evaluation_equals_a_fresh_one(base_and_set, monkeypatch):
    base, cfg, eval_set = base_and_set
    device = torch.device("cpu")
    fresh = evaluate.metrics_from_logits(*evaluate.predict(base.model, eval_set, batch_size=cfg.batch_size, device=device))
    first = trial._base_eval_cached(base, cfg, eval_set, device, FP, SEL)  # computes and writes the cache entry
    assert len(list((train.cache_dir() / "base-evals").glob("*.npz"))) == 1

    def no_predict(*a, **k):
        raise AssertionError("a cached base evaluation must not run the model")

    monkeypatch.setattr(evaluate, "predict", no_predict)
    second = trial._base_eval_cached(base, cfg, eval_set, device, FP, SEL)  # read from the cache
    _same(first, fresh)
    _same(second, fresh)


@pytest.mark.parametrize("rec", ["none", "bn", "finetune"])
def test_a_float16_base_model_runs_a_trial_in_its_own_dtype(base_and_set, rec):
    """The README's float16 model given to ``run_trial`` in Python: the trial failed in the base
    model's first evaluation (float32 batches into float16 weights), and then in its recovery's
    first pass. Oracle: each evaluation equals the model in its own dtype on the batches cast to
    it, the base's here."""
    base, cfg, _ = base_and_set
    base = dataclasses.replace(base, model=base.model.half())
    cfg = dataclasses.replace(cfg, recovery=rec, recovery_batches=3, finetune_steps=3, timing_batches=1, level=1)
    r = trial.run_trial(cfg, base=base)
    _, _, _, test_set, _ = trial.eval_parts(cfg)
    x, y = test_set[:]
    with torch.inference_mode():
        expected = evaluate.metrics_from_logits(base.model(x.half()).float(), y)
    assert r.base_eval.metrics() == pytest.approx(expected.metrics(), abs=1e-6)
    np.testing.assert_array_equal(r.base_eval.preds, expected.preds)
    assert all(p.dtype == torch.float16 for o in r.outcomes.values() for p in o.prune.model.parameters())
    assert r.outcomes["dwt"].timing is not None and set(r.metrics()["parent"]) >= {"top1", "magnitude_top1", "infer_median_ms"}


@pytest.mark.parametrize("val_fraction", [0, 0.25])
def test_another_selection_of_the_same_examples_is_evaluated_afresh(base_and_set, monkeypatch, val_fraction):
    """The cache key names which examples were evaluated, not only the settings that chose them:
    with the same settings but another selection (a changed ``stratified_order`` here, as another
    version of the code or of scikit-learn's split could give) the base model's cached logits were
    those of the old examples, scored against the pruned models' new ones (base targets != theirs)."""
    from wavesweep import data

    base, cfg, _ = base_and_set
    cfg = dataclasses.replace(cfg, recovery="none", timing_batches=0, level=1, val_fraction=val_fraction)

    def run_and_check() -> trial.TrialResult:
        r = trial.run_trial(cfg, base=base)
        _, _, val_set, test_set, _ = trial.eval_parts(cfg)
        parts = [(r.base_eval, r.outcomes["dwt"].eval, test_set)]
        if val_fraction:
            parts.append((r.base_val_eval, r.outcomes["dwt"].val_eval, val_set))
        for b, d, examples in parts:
            np.testing.assert_array_equal(b.targets, d.targets)  # paired example by example
            _same(b, evaluate.evaluate(base.model, examples, batch_size=cfg.batch_size, device="cpu"))
        return r

    first = run_and_check()
    order = data.stratified_order
    monkeypatch.setattr(data, "stratified_order", lambda t, seed=0: order(t, seed + 1))  # other examples
    again = run_and_check()
    assert not np.array_equal(again.base_eval.targets, first.base_eval.targets)  # the selection did change


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_base_evaluation_cache_is_keyed_and_a_damaged_entry_recomputed(base_and_set, caplog, damage):
    """Any damaged entry is recomputed with a warning. A truncated or empty .npz stopped every trial
    of that base model with a traceback (zipfile.BadZipFile, EOFError) until the file was deleted."""
    base, cfg, eval_set = base_and_set
    device = torch.device("cpu")
    fresh = trial._base_eval_cached(base, cfg, eval_set, device, FP, SEL)
    other = dataclasses.replace(base, checksum="cd" * 32)  # other weights: their own entry
    trial._base_eval_cached(other, cfg, eval_set, device, FP, SEL)
    trial._base_eval_cached(base, cfg, eval_set, device, "fedcba9876543210", SEL)  # other data: its own
    trial._base_eval_cached(base, dataclasses.replace(cfg, batch_size=7), eval_set, device, FP, SEL)  # other batching
    trial._base_eval_cached(base, cfg, eval_set, device, FP, "ffeeddccbbaa9988")  # other examples selected
    entries = sorted((train.cache_dir() / "base-evals").glob("*.npz"))
    assert len(entries) == 5
    for p in entries:
        whole = p.read_bytes()
        p.write_bytes({"garbage": b"not an npz", "truncated": whole[: len(whole) // 2], "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="wavesweep.trial"):
        again = trial._base_eval_cached(base, cfg, eval_set, device, FP, SEL)
    assert "unreadable base-evaluation cache" in caplog.text
    _same(again, fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_base_evaluation_is_scored_on_the_device_cached_or_not(base_and_set):
    """On CUDA the base's metrics come from the same device scoring as the pruned models'
    (evaluate_many): the fresh and the cached base evaluation both equal ``evaluate`` of the base
    model, loss included, bit for bit."""
    base, cfg, eval_set = base_and_set
    device = torch.device("cuda")
    direct = evaluate.evaluate(base.model, eval_set, batch_size=cfg.batch_size, device=device)
    _same(trial._base_eval_cached(base, cfg, eval_set, device, FP, SEL), direct)  # computed
    _same(trial._base_eval_cached(base, cfg, eval_set, device, FP, SEL), direct)  # read from the cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_trial_prunes_on_the_device_even_with_a_cached_base_evaluation(base_and_set, monkeypatch):
    """With the base evaluation read from its cache nothing else moves the base model, so the
    trial itself must: pruning runs on the device (torch transform, torch selection), never
    through PyWavelets or numpy's partition."""
    from wavesweep import baselines
    from wavesweep import wavelets as wv

    base, cfg, eval_set = base_and_set
    cfg = dataclasses.replace(cfg, device="cuda", recovery="none", timing_batches=0, level=1)
    trial._base_eval_cached(base, cfg, eval_set, torch.device("cuda"), FP, SEL)  # the cache entry, then a CPU model again
    base.model.cpu()
    monkeypatch.setattr(wv, "dwt_prune_array", lambda *a, **k: pytest.fail("PyWavelets pruning in a CUDA trial"))
    monkeypatch.setattr(baselines, "_smallest", lambda *a, **k: pytest.fail("numpy selection in a CUDA trial"))
    r = trial.run_trial(cfg, base=base)
    assert all(p.is_cuda for o in r.outcomes.values() for p in o.prune.model.parameters())


def test_a_trial_through_the_accelerator_paths_gives_the_cpu_numbers(base_and_set, monkeypatch):
    """Every device-side path a CUDA trial takes (dwt through the torch transform, magnitude and
    random selected in torch, accounting values fetched in one transfer), forced on the CPU:
    the trial's numbers equal the CPU paths' (magnitude and random bit for bit)."""
    import functools

    from wavesweep import accounting, baselines, pruning
    from wavesweep import wavelets as wv

    base, cfg, eval_set = base_and_set
    cfg = dataclasses.replace(cfg, recovery="bn", recovery_batches=3, timing_batches=0, level=2, wavelet="db2")
    want = trial.run_trial(cfg, base=base)
    monkeypatch.setattr(pruning, "prune_dwt", functools.partial(pruning.prune_dwt, backend="torch"))
    monkeypatch.setattr(pruning, "prune_matched", functools.partial(pruning.prune_matched, backend="torch"))
    monkeypatch.setattr(accounting, "_zeros_later", lambda t: t.detach().numel() - torch.count_nonzero(t.detach()))
    monkeypatch.setattr(accounting, "_norm_later", lambda t: torch.linalg.vector_norm(t))
    monkeypatch.setattr(wv, "dwt_prune_array", lambda *a, **k: pytest.fail("PyWavelets pruning on the torch path"))
    monkeypatch.setattr(baselines, "_smallest", lambda *a, **k: pytest.fail("numpy selection on the torch path"))
    got = trial.run_trial(cfg, base=base)
    for m in ("dwt", "magnitude", "random"):
        a, b = got.outcomes[m], want.outcomes[m]
        for x, y in zip(a.prune.layers, b.prune.layers):
            assert np.array_equal(x.keep, y.keep), (m, x.name)
        assert a.stats.stored_bytes == b.stats.stored_bytes and a.stats.zeroed_coeffs == b.stats.zeroed_coeffs
        if m == "dwt":  # the torch transform equals PyWavelets to float tolerance
            assert a.stats.mean_rel_l2_error == pytest.approx(b.stats.mean_rel_l2_error, rel=1e-5)
            assert abs(a.eval.top1 - b.eval.top1) <= 1 / len(eval_set)
        else:
            assert a.stats == b.stats and a.eval.metrics() == b.eval.metrics()
            np.testing.assert_array_equal(a.eval.correct, b.eval.correct)


@pytest.mark.parametrize("model", ["cnn", "mlp", "resnet18"])
@pytest.mark.parametrize("targets", ["conv", "linear", "conv,linear"])
@pytest.mark.parametrize("layout", ["kernel", "filter"])
def test_a_model_its_targets_or_layout_cannot_take_is_refused_before_any_base_model(model, targets, layout, monkeypatch):
    """``--model mlp --targets linear --layout kernel`` trained the base model, then failed at
    pruning. The check on a meta-device build refuses exactly the combinations the real model
    would (the oracle: the real model's module types and weight shapes) and names the real
    shapes, before a base model is trained or loaded."""
    from torch import nn

    real = build_model(model, num_classes=10, in_channels=1, image_size=8)  # digits
    kinds = tuple({"conv": nn.Conv2d, "linear": nn.Linear}[k] for k in targets.split(","))
    found = [(n, m) for n, m in real.named_modules() if isinstance(m, kinds)]
    bad = next((f"target layer {n!r}: layout 'kernel' needs a 4-D conv weight (out, in, kh, kw), got shape "
                f"{tuple(m.weight.shape)}" for n, m in found if layout == "kernel" and m.weight.dim() != 4), None)  # fmt: skip
    cfg = TrialConfig(model=model, dataset="digits", targets=targets, layout=layout, device="cpu")
    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("a base model was loaded"))
    if found and bad is None:
        trial.check_model_fits(cfg)
        return
    with pytest.raises(ValueError) as info:
        trial.run_trial(cfg)
    assert (bad or "has no target layers of kinds") in str(info.value)


def _tiny_imagefolder_trial(tmp_path, monkeypatch, **cfg) -> tuple[train.BaseModel, TrialConfig]:
    """An imagefolder of 2 classes x 3 small PNGs in train/ and val/ under ``tmp_path``, a random
    cnn as its base model, and a CPU trial config on it (``cfg``: its recovery settings)."""
    from PIL import Image

    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    torch.manual_seed(0)
    kw = {"num_classes": 2, "in_channels": 3, "image_size": 224}
    model = build_model("cnn", **kw).eval()
    base = train.BaseModel(model, "cnn", "imagefolder", 0, "trained", tmp_path / "w.pt", "cd" * 32, kw)
    return base, TrialConfig(model="cnn", dataset="imagefolder", data_root=str(tmp_path), timing_batches=0,
                             device="cpu", batch_size=2, **cfg)  # fmt: skip


def test_an_unreadable_image_read_by_a_worker_is_one_line_in_the_runs_error_tag(tmp_path, monkeypatch, workdir, capsys):
    """A truncated image in the evaluated split, decoded by a DataLoader worker: stderr had the
    image's one line, but the FAILED run's ``error`` tag held torch's "Caught ValueError in
    DataLoader worker process 0." and the worker's traceback. Both now say the same one line.
    Oracle: the MLflow client's view of the run."""
    from mlflow.tracking import MlflowClient

    from wavesweep import cli

    base, cfg = _tiny_imagefolder_trial(tmp_path, monkeypatch, recovery="none")
    bad = tmp_path / "val" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    torch.save(base.model.state_dict(), base.path)
    monkeypatch.setattr(trial.data, "default_num_workers", lambda: 2)
    rc = cli.main(["trial", "-q", "--model", "cnn", "--dataset", "imagefolder", "--data-root", str(tmp_path),
                   "--weights", str(base.path), "--timing-batches", "0", "--recovery", "none", "--device", "cpu",
                   "--batch-size", "2", "--experiment", "bad-image"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and f"image {str(bad)!r} cannot be read (" in err[-1], err
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("bad-image").experiment_id])
    tag = run.data.tags["error"]
    assert run.info.status == "FAILED" and "\n" not in tag and "DataLoader worker" not in tag, tag
    assert tag == "ValueError: " + err[-1].split("error: ", 1)[1], (tag, err[-1])


@pytest.mark.parametrize("stop", ["pruned", "failed"])
def test_a_trial_stopped_early_stops_its_evaluation_workers(stop, tmp_path, monkeypatch):
    """An image folder is decoded by persistent worker processes cached on the dataset. A trial that
    a pruner stops (the reporter raises) or that fails after evaluating left them running (with
    their prefetched batches) until a garbage collection found the dataset; a study's next trials
    started their own beside them. Oracle: multiprocessing's own list of live children."""
    import gc
    import multiprocessing

    base, cfg = _tiny_imagefolder_trial(tmp_path, monkeypatch, recovery="none")

    class Stop(Exception):
        pass

    def reporter(chunk):
        raise Stop

    if stop == "failed":  # after the base evaluation has started the workers
        monkeypatch.setattr(trial.pruning, "prune_dwt", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    monkeypatch.setattr(trial.data, "default_num_workers", lambda: 2)
    gc.collect()  # workers an earlier test's loader left for the collector
    before = {p.pid for p in multiprocessing.active_children()}  # any still shutting down are not this trial's
    gc.disable()  # what is asserted is the trial's doing, not a collection's
    try:
        with pytest.raises(Stop):
            trial.run_trial(cfg, base=base, reporter=reporter)
        alive = [p for p in multiprocessing.active_children() if p.pid not in before]
    finally:
        gc.enable()
        gc.collect()
    assert alive == []


# --------------------------------------------------------------------------- ImageNet with its training split


@pytest.fixture
def imagenet_with_train(tmp_path, monkeypatch):
    """A generated ImageNet (4 synsets; val/ and train/ as ImageFolders of small images) loaded
    with ``expected_classes=4`` wherever wavesweep loads it, and random ResNet-18 weights in a
    local file (as the ImageNet tests of test_evaluate do). Returns (top folder, weights file)."""
    import torchvision

    from tests.test_data import make_imagenet_tree
    from wavesweep import data

    top = tmp_path / "imagenet"
    make_imagenet_tree(top, "folder-top", per_class=4)
    real = data.load_dataset
    monkeypatch.setattr(data, "load_dataset",
                        lambda name, **kw: real(name, **({"expected_classes": 4} if name == "imagenet" else {}), **kw))
    torch.manual_seed(0)
    weights = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return top, weights


def _bn_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.slow  # ImageNet-shaped ResNet-18 (224 px), two trials: about 20 s on 2 CPU cores
def test_imagenet_trial_recovers_batchnorm_on_its_training_split(imagenet_with_train, monkeypatch, tmp_path):
    """recovery=bn on ImageNet re-estimates every BatchNorm layer of all three pruned models from
    train/ (20 layers in ResNet-18, the batches asked for): their statistics are no longer the base
    model's, which recovery=none leaves them (pruning touches conv weights only)."""
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    top, weights = imagenet_with_train
    kw = dict(model="resnet18", dataset="imagenet", data_root=str(top), weights=str(weights), percentile=60.0,
              recovery_batches=2, recovery_batch_size=4, timing_batches=0, device="cpu", batch_size=8)
    base = train.get_base_model("resnet18", "imagenet", weights=weights)
    before = _bn_stats(base.model)
    r = trial.run_trial(TrialConfig(recovery="bn", **kw), base=base)
    assert r.eval_info["data_train_root"] == str(top / "train") and r.eval_info["data_n_train"] == 16
    for m, o in r.outcomes.items():
        assert (o.recovery.recovery, o.recovery.bn_layers, o.recovery.bn_batches) == ("bn", 20, 2), m
        assert o.prerec_eval is not None and o.eval.n == 8
        after = _bn_stats(o.prune.model)
        assert all(not torch.equal(after[k], before[k]) for k in before), m
    r_none = trial.run_trial(TrialConfig(recovery="none", **kw), base=base)
    for m, o in r_none.outcomes.items():
        assert all(torch.equal(v, before[k]) for k, v in _bn_stats(o.prune.model).items()), m


def test_imagenet_without_train_folder_recovery_error_says_where_it_was_looked_for(imagenet_with_train, tmp_path):
    import shutil

    top, weights = imagenet_with_train
    shutil.rmtree(top / "train")
    with pytest.raises(ValueError) as err:
        trial.run_trial(TrialConfig(model="resnet18", dataset="imagenet", data_root=str(top / "val"), weights=str(weights),
                                    recovery="bn", device="cpu"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("recovery='bn' needs the training split of dataset 'imagenet'")
    assert f"looked for a train/ folder of synset folders at {str(top / 'train')!r}); use recovery=none" in msg


def test_imagenet_with_an_unusable_train_folder_recovery_error_says_why(imagenet_with_train):
    """A train/ that is not ImageNet's training split (here: an image beside its synset folders, as
    a train tar extracted part way leaves) is not used; a recovery that needs it stops with one line
    saying why, before any model is loaded."""
    from PIL import Image

    top, weights = imagenet_with_train
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(top / "train" / "stray.JPEG")
    with pytest.raises(ValueError) as err:
        trial.run_trial(TrialConfig(model="resnet18", dataset="imagenet", data_root=str(top), weights=str(weights),
                                    recovery="finetune", device="cpu"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(
        "recovery='finetune' needs the training split of dataset 'imagenet'; the one found is not used: imagenet: "
        f"training folder {str(top / 'train')!r} holds 1 images beside its 4 class folders (first 'stray.JPEG')")


@pytest.mark.slow  # ImageNet-shaped ResNet-18 (224 px) and MLflow: about 35 s on 2 CPU cores
def test_imagenet_trial_with_recovery_bn_runs_from_the_command_line(imagenet_with_train, workdir, capsys):
    """``wavesweep trial --dataset imagenet ... --recovery bn`` end to end (tracked in MLflow) on a
    generated tree with train/ and val/; the run records the recovery on the training split."""
    import mlflow

    from wavesweep import cli

    top, weights = imagenet_with_train
    rc = cli.main(["trial", "-q", "--model", "resnet18", "--dataset", "imagenet", "--data-root", str(top),
                   "--weights", str(weights), "--recovery", "bn", "--recovery-batches", "2", "--recovery-batch-size", "4",
                   "--timing-batches", "0", "--device", "cpu", "--batch-size", "8", "--experiment", "inet"])
    assert rc == 0, capsys.readouterr().err
    runs = mlflow.search_runs(experiment_names=["inet"], output_format="list")
    trials = [r for r in runs if r.data.tags.get("wavesweep.kind") == "trial"]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("method") in ("dwt", "magnitude", "random")]
    assert sorted(r.data.tags["method"] for r in children) == ["dwt", "magnitude", "random"]
    for r in children:
        assert r.data.params["recovery"] == "bn" and r.data.params["dataset"] == "imagenet"
        assert (r.data.metrics["recovery_bn_layers"], r.data.metrics["recovery_bn_batches"]) == (20.0, 2.0)


@pytest.mark.parametrize("stop", ["completed", "failed in recovery"])
def test_a_trial_on_an_imagefolder_stops_its_recovery_workers(stop, tmp_path, monkeypatch, decoding_processes):
    """Recovery decodes the training split in worker processes kept on it for the three methods
    (before, in the main process): the trial stops them when it ends, and when it fails. Oracle:
    the processes that decoded training images, against multiprocessing's own live children."""
    import gc
    import multiprocessing
    import os

    from wavesweep import recovery

    base, cfg = _tiny_imagefolder_trial(tmp_path, monkeypatch, recovery="bn", recovery_batches=2, recovery_batch_size=2)

    class Stop(Exception):
        pass

    if stop != "completed":  # the magnitude model's re-estimation fails after reading a batch
        real = recovery.reestimate_bn
        calls = []

        def failing(model, batches, **kw):
            calls.append(1)
            if len(calls) == 2:
                next(iter(batches))
                raise Stop
            return real(model, batches, **kw)

        monkeypatch.setattr(recovery, "reestimate_bn", failing)
    monkeypatch.setattr(trial.data, "default_num_workers", lambda: 2)
    gc.collect()  # workers an earlier test's loader left for the collector
    gc.disable()  # what is asserted is the trial's doing, not a collection's
    try:
        if stop == "completed":
            trial.run_trial(cfg, base=base)
        else:
            with pytest.raises(Stop):
                trial.run_trial(cfg, base=base)
        alive = {p.pid for p in multiprocessing.active_children()}
    finally:
        gc.enable()
        gc.collect()
    decoders = {pid for pid, split in decoding_processes() if split == "train"}
    assert decoders and os.getpid() not in decoders  # recovery read its batches from worker processes
    assert decoders.isdisjoint(alive)


def test_every_opened_dataset_is_closed_even_when_closing_one_raises(monkeypatch):
    """run_trial stops the workers of every dataset it opened (evaluation set, training split), also
    when stopping the first one raises: the training split's workers were left running then."""
    a, b = object(), object()

    def fake_run(cfg, base, reporter, progress, opened):
        opened.extend([a, b])
        return "result"

    closed = []

    def close(part):
        closed.append(part)
        if part is a:
            raise OSError("worker pipe broken")

    monkeypatch.setattr(trial, "_run_trial", fake_run)
    monkeypatch.setattr(trial.data, "close_loaders", close)
    with pytest.raises(OSError, match="worker pipe broken"):
        trial.run_trial(TrialConfig())
    assert len(closed) == 2 and {id(p) for p in closed} == {id(a), id(b)}  # both, whatever the order


def test_a_val_image_replaced_under_its_name_is_evaluated_afresh_not_taken_from_the_cache(tmp_path, monkeypatch):
    """The base evaluation's cache is keyed by the evaluation split's fingerprint. It held each
    file's path and label but not its contents, so an image replaced under the same name (a
    re-extracted or regenerated folder) gave the base the logits of the image that was there
    before, while the pruned models were scored on the new one. Its size is in the key now.
    Oracle: an uncached ``evaluate.predict`` of the base on the folder as it is."""
    from PIL import Image

    base, cfg = _tiny_imagefolder_trial(tmp_path, monkeypatch, recovery="none")
    first = trial.run_trial(cfg, base=base)
    target = tmp_path / "val" / "a" / "0.png"
    Image.fromarray(np.full((30, 24, 3), 200, np.uint8)).save(target)  # another image (another size)
    again = trial.run_trial(cfg, base=base)
    ds = load_dataset("imagefolder", root=tmp_path).test
    logits, targets = evaluate.predict(base.model, ds, batch_size=2, device="cpu")
    want = evaluate.metrics_from_logits(logits, targets)
    assert want.loss != first.base_eval.loss  # the replaced image changes the base's logits
    assert again.base_eval.loss == pytest.approx(want.loss, rel=1e-6)
    assert again.base_eval.preds.tolist() == want.preds.tolist()


def test_a_trial_checks_the_base_weights_finite_once_for_its_three_prunings(base_and_set, monkeypatch):
    """dwt, magnitude and random prune the same base model: its target weights are checked for NaN
    and infinities once (prune_dwt's check; on a GPU each check is a host sync), and the baselines
    equal ``prune_matched`` run with its own check (the oracle); a base weight that is NaN still
    stops the trial with the check's error."""
    from wavesweep import baselines, pruning

    base, cfg, _ = base_and_set
    cfg = dataclasses.replace(cfg, recovery="none", timing_batches=0)
    calls = []
    for mod in (pruning, baselines):
        real = mod.check_finite_targets
        monkeypatch.setattr(mod, "check_finite_targets", lambda layers, real=real: calls.append(len(layers)) or real(layers))
    r = trial.run_trial(cfg, base=base)
    assert calls == [len(pruning.target_layers(base.model, cfg.target_kinds))]
    want = pruning.prune_matched(base.model, r.outcomes["dwt"].prune, scope=cfg.scope, seed=cfg.seed, targets=cfg.target_kinds)
    for m in ("magnitude", "random"):
        got = r.outcomes[m].prune
        assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in want[m].layers]
        assert all(np.array_equal(a.keep, b.keep) for a, b in zip(got.layers, want[m].layers)), m
        assert all(torch.equal(x, y) for x, y in zip(got.model.state_dict().values(), want[m].model.state_dict().values())), m
    with torch.no_grad():
        pruning.target_layers(base.model)[0][1].weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"weight has 1 NaN or infinite value\(s\)"):
        trial.run_trial(cfg, base=base)


def test_compute_layout_makes_conv_models_channels_last_on_a_cpu_only(monkeypatch):
    """On a CPU a conv model is put in channels-last format in place, values unchanged; a model
    without a 4-D parameter, a CUDA device, or the switch off leave it as it is."""
    torch.manual_seed(0)
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert evaluate.compute_layout(cnn, torch.device("cpu")) == "channels_last"
    convs = [p for p in cnn.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(not p.is_contiguous() for p in convs if p.shape[1] > 1)  # one input channel: both formats at once
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    assert evaluate.compute_layout(mlp, torch.device("cpu")) == "contiguous"
    other = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    assert evaluate.compute_layout(other, torch.device("cuda")) == "contiguous"  # off by default there: not moved, not changed
    assert evaluate.compute_layout(other, torch.device("meta")) == "contiguous"  # any other device: as it comes
    monkeypatch.setattr(evaluate, "CPU_CHANNELS_LAST", False)
    assert evaluate.compute_layout(other, torch.device("cpu")) == "contiguous"
    assert all(p.is_contiguous() for p in other.parameters())
    monkeypatch.setattr(evaluate, "CUDA_CHANNELS_LAST", True)  # the switch of the device asked, not the CPU's
    assert evaluate.compute_layout(other, torch.device("cpu")) == "contiguous"
    assert evaluate.compute_layout(other, torch.device("cuda")) == "channels_last"  # values and device unchanged
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in other.parameters() if p.dim() == 4)


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_a_channels_last_trial_gives_the_contiguous_trials_numbers(base_and_set, monkeypatch, rec):
    """The speed-up's oracle: a CPU trial in channels-last format (the default) against the same
    trial with every model contiguous. The prunings are the same bit for bit (masks, kept
    coefficients, stored bytes); every model's predictions are the same and its metrics equal to
    float rounding (the convolutions add in another order); the base evaluation is cached per format."""
    _channels_last_against_contiguous(base_and_set, monkeypatch, rec, "cpu", "CPU_CHANNELS_LAST")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_a_channels_last_cuda_trial_gives_the_contiguous_trials_numbers(base_and_set, monkeypatch, rec):
    """The same oracle on a CUDA device, for ``evaluate.CUDA_CHANNELS_LAST`` (off by default until
    a GPU run measures it)."""
    _channels_last_against_contiguous(base_and_set, monkeypatch, rec, "cuda", "CUDA_CHANNELS_LAST")


def _channels_last_against_contiguous(base_and_set, monkeypatch, rec: str, device: str, switch: str) -> None:
    base, cfg, _ = base_and_set
    cfg = dataclasses.replace(cfg, recovery=rec, recovery_batches=3, finetune_steps=3, timing_batches=1, level=2,
                              wavelet="db2", device=device)  # fmt: skip
    if device == "cuda":  # TF32 convolutions differ by ~1e-3 between the algorithms two layouts get
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(evaluate, switch, False)
    want = trial.run_trial(cfg, base=base)
    assert want.eval_info["memory_format"] == "contiguous"
    monkeypatch.setattr(evaluate, switch, True)
    got = trial.run_trial(cfg, base=base)
    assert got.eval_info["memory_format"] == "channels_last"
    # every conv weight of every model in the base model's layout: dwt's fine-tuned weights too
    # (they came back contiguous, and dwt's inference timings were of another format than the others')
    strides = [p.stride() for p in base.model.parameters() if p.dim() == 4]
    assert any(p.shape[1] > 1 and not p.is_contiguous() for p in base.model.parameters() if p.dim() == 4)
    for m in ("dwt", "magnitude", "random"):
        assert [p.stride() for p in got.outcomes[m].prune.model.parameters() if p.dim() == 4] == strides, (m, rec)
    assert len(list((train.cache_dir() / "base-evals").glob("*.npz"))) == 2  # one entry per format
    np.testing.assert_array_equal(got.base_eval.preds, want.base_eval.preds)
    for m in ("dwt", "magnitude", "random"):
        a, b = got.outcomes[m], want.outcomes[m]
        for x, y in zip(a.prune.layers, b.prune.layers):
            assert np.array_equal(x.keep, y.keep), (m, x.name)
        assert a.stats.stored_bytes == b.stats.stored_bytes and a.stats.zeroed_coeffs == b.stats.zeroed_coeffs
        np.testing.assert_array_equal(a.eval.preds, b.eval.preds)
        for k, v in b.eval.metrics().items():
            assert a.eval.metrics()[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (m, k)
