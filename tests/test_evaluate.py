"""Evaluation: metrics against scikit-learn, determinism, chunks, devices, timing,
and the ImageNet path on a generated folder with random weights from a local file."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score, top_k_accuracy_score

from torch.utils.data import Subset, TensorDataset

from tests.test_data import make_image_folder
from wavesweep.data import close_loaders, dataset_targets, default_num_workers, eval_subset, load_dataset, take
from wavesweep.evaluate import (
    EvalResult,
    evaluate,
    evaluate_chunks,
    evaluate_many,
    metrics_from_logits,
    predict,
    predict_many,
    resolve_device,
    time_inference,
)
from wavesweep.models import RESNET18_IMAGENET_FILE, build_model, load_pretrained_resnet18

METRIC_KEYS = {"top1", "top5", "loss", "f1_macro", "recall_macro", "precision_macro", "f1_weighted"}


def _sklearn_oracle(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    c = logits.shape[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pred = logits.argmax(1)
    labels = np.unique(y)
    kw = dict(labels=labels, zero_division=0)
    return {
        "top1": accuracy_score(y, pred),
        "top5": top_k_accuracy_score(y, logits, k=min(5, c), labels=np.arange(c)),
        "loss": log_loss(y, p, labels=np.arange(c)),
        "f1_macro": f1_score(y, pred, average="macro", **kw),
        "recall_macro": recall_score(y, pred, average="macro", **kw),
        "precision_macro": precision_score(y, pred, average="macro", **kw),
        "f1_weighted": f1_score(y, pred, average="weighted", **kw),
    }


@pytest.mark.parametrize("n,c,absent", [(300, 10, ()), (120, 3, ()), (200, 12, (4, 7))])
@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")  # the oracle's top-3 of 3 classes: 1, as ours
def test_metrics_agree_with_sklearn(n, c, absent):
    rng = np.random.default_rng(n + c)
    y = rng.integers(0, c, size=n)
    for a in absent:  # classes with no example: outside the macro average, as in sklearn with these labels
        y[y == a] = (a + 1) % c
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), y] += rng.normal(1.0, 1.0, size=n).astype(np.float32)  # better than chance
    r = metrics_from_logits(torch.from_numpy(logits), torch.from_numpy(y))
    assert set(r.metrics()) == METRIC_KEYS
    oracle = _sklearn_oracle(logits.astype(np.float64), y)
    for k, v in oracle.items():
        assert r.metrics()[k] == pytest.approx(v, abs=1e-5), k
    assert r.n == n and r.correct.dtype == bool and r.correct.shape == (n,)
    assert np.array_equal(r.correct, logits.argmax(1) == y) and np.array_equal(r.targets, y)
    assert r.preds.dtype == np.int64


def test_tied_logits_rank_the_target_as_argmax_does_for_top1_and_top5():
    """Equal logits (a collapsed model, a classifier pruned to nothing) rank the lowest class
    first, argmax's rule, for top-1 and top-5 alike: an example right at top-1 is right at top-5.
    Oracle: the target's position when the classes are sorted by (-logit, index)."""
    cases = [(torch.zeros(1, 10), 0, 1.0, 1.0), (torch.zeros(1, 10), 9, 0.0, 0.0), (torch.zeros(1, 100), 4, 0.0, 1.0),
             (torch.tensor([[1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0]]), 0, 1.0, 1.0),
             (torch.tensor([[1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0]]), 5, 0.0, 0.0)]  # fmt: skip
    for logits, y, top1, top5 in cases:
        r = metrics_from_logits(logits, torch.tensor([y]))
        assert (r.top1, r.top5) == (top1, top5), (logits.tolist(), y)
    rng = np.random.default_rng(5)
    logits = rng.integers(0, 3, size=(400, 12)).astype(np.float32)  # ties everywhere
    y = rng.integers(0, 12, size=400)
    r = metrics_from_logits(torch.from_numpy(logits), torch.from_numpy(y))
    rank = [sorted(range(12), key=lambda j, row=row: (-row[j], j)).index(t) for row, t in zip(logits, y)]
    assert r.top5 == np.mean(np.array(rank) < 5) and r.top1 == np.mean(np.array(rank) == 0)
    assert np.array_equal(r.correct, logits.argmax(1) == y) and r.top5 >= r.top1


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="need logits"):
        metrics_from_logits(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=8).eval()


def test_evaluate_is_deterministic_and_in_dataset_order(cnn, digits):
    a = evaluate(cnn, digits.test, batch_size=64, device="cpu")
    b = evaluate(cnn, digits.test, batch_size=100, device="cpu")
    assert a.metrics() == pytest.approx(b.metrics(), abs=1e-6)
    assert np.array_equal(a.correct, b.correct) and np.array_equal(a.preds, b.preds)
    assert np.array_equal(a.targets, digits.test.targets.numpy())
    assert not cnn.training  # the flag is restored
    logits, targets = predict(cnn, digits.test, device="cpu")
    assert logits.dtype == torch.float32 and logits.shape == (360, 10) and targets.dtype == torch.int64


def test_evaluate_chunks_cumulative_and_last_equals_evaluate(cnn, digits):
    full = evaluate(cnn, digits.test, device="cpu")
    chunks = list(evaluate_chunks(cnn, digits.test, n_chunks=4, device="cpu"))
    parts = [c.result for c in chunks]
    assert [p.n for p in parts] == [90, 180, 270, 360]
    assert [c.step for c in chunks] == [0, 1, 2, 3] and [c.n for c in chunks] == [90, 90, 90, 90]
    # each chunk's own correct count is the growth of the cumulative count
    cumulative = [int(p.correct.sum()) for p in parts]
    assert [c.correct for c in chunks] == [b - a for a, b in zip([0, *cumulative], cumulative)]
    last = parts[-1]
    assert np.array_equal(last.correct, full.correct) and last.top1 == full.top1
    assert last.metrics() == pytest.approx(full.metrics(), abs=1e-5)
    first = np.bincount(parts[0].targets, minlength=10)  # the first quarter is stratified
    expected = 90 * np.bincount(dataset_targets(digits.test), minlength=10) / 360
    assert np.all(np.abs(first - expected) <= 1)
    with pytest.raises(ValueError, match="n_chunks"):
        next(evaluate_chunks(cnn, digits.test, n_chunks=0))


def test_class_count_mismatch_is_an_error(digits):
    small = build_model("mlp", num_classes=5, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="classes do not match the model's output size"):
        evaluate(small, digits.test, device="cpu")


def test_time_inference_records_the_procedure(cnn, digits):
    t = time_inference(cnn, digits.test, batch_size=64, n_warmup=1, n_batches=5, device="cpu")
    assert t.device == "cpu" and t.batch_size == 64 and t.n_batches == 5 and t.threads == torch.get_num_threads()
    assert 0 < t.median_ms <= t.p95_ms
    assert t.ms_per_example == pytest.approx(t.median_ms / 64)
    assert t.examples_per_s == pytest.approx(64_000 / t.median_ms)
    assert set(t.metrics()) == {"infer_median_ms", "infer_p95_ms", "infer_ms_per_example", "infer_examples_per_s"}
    tiny = eval_subset(digits.test, 20)
    assert time_inference(cnn, tiny, batch_size=256, n_warmup=0, n_batches=2, device="cpu").batch_size == 20


@pytest.mark.slow  # ResNet-18 at 224x224; the file-dataset loader is also tested below on small images
def test_imagenet_path_generated_folder_random_weights(tmp_path):
    """The real ImageNet code path: synset ImageFolder + eval transform + weights from a file."""
    classes = [f"n{i:08d}" for i in (1440764, 1443537, 1484850, 1491361)]
    make_image_folder(tmp_path / "val", classes, per_class=2, size=(320, 260))
    bundle = load_dataset("imagenet", root=tmp_path / "val", expected_classes=4)
    torch.manual_seed(0)
    weights = tmp_path / RESNET18_IMAGENET_FILE
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = load_pretrained_resnet18(weights)
    try:
        r = evaluate(model, bundle.test, batch_size=4, device="cpu")
        assert isinstance(r, EvalResult) and r.n == 8 and r.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert 0 <= r.top1 <= r.top5 <= 1 and np.isfinite(r.loss)
        again = evaluate(model, bundle.test, batch_size=8, device="cpu")
        assert np.array_equal(r.preds, again.preds) and r.loss == pytest.approx(again.loss, rel=1e-5)
    finally:  # stop the persistent decoding workers now (as a trial does), not in a later test's garbage collection
        close_loaders(bundle.test)


# --------------------------------------------------------------------------- in-memory fast path, predict_many


def _models(in_channels: int = 1, image_size: int = 8, n: int = 3) -> dict[str, torch.nn.Module]:
    out = {}
    for i, name in enumerate(["cnn", "mlp", "cnn"][:n]):
        torch.manual_seed(i)
        out[f"{name}{i}"] = build_model(name, num_classes=10, in_channels=in_channels, image_size=image_size)
    return out


def test_predict_on_tensor_images_equals_predict_on_a_plain_tensor_dataset(cnn, digits):
    x, y = digits.test[:]
    plain = TensorDataset(x.clone(), y.clone())
    for bs in (64, 500):
        a, ta = predict(cnn, digits.test, batch_size=bs, device="cpu")
        b, tb = predict(cnn, plain, batch_size=bs, device="cpu")
        assert torch.equal(a, b) and torch.equal(ta, tb)
    with torch.inference_mode():  # and both equal the model on the whole batch
        assert torch.allclose(a, cnn(x), atol=1e-5)


def test_predict_many_equals_separate_predicts_exactly(digits):
    models = _models()
    for m in models.values():
        m.train()  # the flags are restored
    many = predict_many(models, digits.test, batch_size=100, device="cpu")
    assert list(many) == list(models)
    for name, m in models.items():
        one = predict(m, digits.test, batch_size=100, device="cpu")
        assert torch.equal(many[name][0], one[0]) and torch.equal(many[name][1], one[1])
        assert m.training
    assert not torch.equal(many["cnn0"][0], many["cnn2"][0])
    sub = eval_subset(digits.test, 50, seed=1)  # a subset made by take: same path
    many = predict_many(models, sub, batch_size=16, device="cpu")
    assert torch.equal(many["mlp1"][0], predict(models["mlp1"], sub, batch_size=16, device="cpu")[0])
    with pytest.raises(ValueError, match="at least one model"):
        predict_many({}, digits.test)


def test_evaluate_many_equals_separate_evaluations(digits):
    from wavesweep.evaluate import evaluate, evaluate_many

    models = _models()
    many = evaluate_many(models, digits.test, batch_size=64, device="cpu")
    for name, m in models.items():
        one = evaluate(m, digits.test, batch_size=64, device="cpu")
        assert many[name].metrics() == one.metrics() and np.array_equal(many[name].correct, one.correct), name


def test_predict_many_class_mismatch_names_it(digits):
    models = {"ok": _models(n=1)["cnn0"], "small": build_model("mlp", num_classes=5, in_channels=1, image_size=8)}
    with pytest.raises(ValueError, match="classes do not match the model's output size"):
        predict_many(models, digits.test, device="cpu")


@pytest.mark.parametrize("bad", [0, -1])
def test_a_batch_size_below_one_is_one_line_naming_it(cnn, digits, bad):
    """batch_size 0 ended in a ZeroDivisionError, -1 in torch's "split expects split_size be
    non-negative": neither says which argument is wrong."""
    plain = TensorDataset(*digits.test[:])
    for call in (lambda: predict(cnn, digits.test, batch_size=bad, device="cpu"),
                 lambda: predict(cnn, plain, batch_size=bad, device="cpu"),
                 lambda: list(evaluate_chunks(cnn, digits.test, n_chunks=2, batch_size=bad, device="cpu")),
                 lambda: time_inference(cnn, digits.test, batch_size=bad, n_batches=1, device="cpu")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^batch_size must be a positive int, got {bad}$"):
            call()


def test_labels_outside_the_logits_are_one_line_naming_the_label():
    """A negative label passed predict's class check (it looked at the largest label only) and then
    failed in metrics as torch's "index -1 is out of bounds for dimension 1"; metrics_from_logits
    given a label >= C failed the same way."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ds = TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 2, -1, 0, 1]))
    with pytest.raises(ValueError, match=r"label -1; labels must be class indices 0\.\.2"):
        predict(net, ds, device="cpu")
    with pytest.raises(ValueError, match=r"label -1; labels must be class indices 0\.\.3"):
        metrics_from_logits(torch.zeros(3, 4), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="label 5 but the model outputs 4 logits"):
        metrics_from_logits(torch.zeros(3, 4), torch.tensor([0, 5, 2]))


def test_empty_sets_and_non_logit_outputs_are_one_line():
    """An empty dataset in evaluate_chunks ended in numpy's "number sections must be larger than 0",
    in time_inference in a ZeroDivisionError; a model giving (B,) outputs in an IndexError."""
    net = torch.nn.Linear(4, 3)
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="^cannot evaluate on an empty dataset$"):
        list(evaluate_chunks(net, empty, n_chunks=2, device="cpu"))
    with pytest.raises(ValueError, match="^cannot time inference on an empty dataset$"):
        time_inference(net, empty, device="cpu")
    flat = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))  # (B,) outputs
    ds = TensorDataset(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"model 'model' gives outputs of shape \(5,\) for 5 examples"):
        predict(flat, ds, device="cpu")


def test_file_dataset_predict_many_and_chunks_share_one_loader(tmp_path):
    make_image_folder(tmp_path / "val", ["n00000001", "n00000002", "n00000003"], per_class=4, size=(48, 40))
    ds = load_dataset("imagenet", root=tmp_path / "val", expected_classes=3, image_size=32).test
    models = _models(in_channels=3, image_size=32, n=2)
    try:
        many = predict_many(models, ds, batch_size=5, device="cpu", num_workers=1)
        ref = torch.stack([ds[i][0] for i in range(len(ds))])  # decoded item by item, no workers
        for name, m in models.items():
            with torch.inference_mode():
                expected = m.eval()(ref)
            assert torch.allclose(many[name][0], expected, atol=1e-5)
            assert torch.equal(many[name][0], predict(m, ds, batch_size=5, device="cpu", num_workers=1)[0])
        assert many["cnn0"][1].tolist() == [0] * 4 + [1] * 4 + [2] * 4
        parts = list(evaluate_chunks(models["cnn0"], ds, n_chunks=3, batch_size=5, device="cpu"))
        assert [p.result.n for p in parts] == [4, 8, 12] and [p.n for p in parts] == [4, 4, 4]
        full = metrics_from_logits(*many["cnn0"])
        assert np.array_equal(parts[-1].result.preds, full.preds)
        sub = take(ds, np.array([11, 2, 7]))
        assert isinstance(sub, Subset)
        lg, tg = predict(models["cnn0"], sub, batch_size=5, device="cpu", num_workers=1)
        assert tg.tolist() == [2, 0, 1] and torch.equal(lg, many["cnn0"][0][[11, 2, 7]])
        # a pass abandoned half-way (time_inference takes the first batches) leaves the loader usable
        time_inference(models["cnn0"], ds, batch_size=5, n_warmup=0, n_batches=1, device="cpu")
        assert torch.equal(predict(models["cnn0"], ds, batch_size=5, device="cpu")[0], many["cnn0"][0])
        # every pass above with num_workers=1 went through one persistent loader (the passes
        # without num_workers used the machine's default)
        assert {k[1] for k in ds._wavesweep_eval_loaders} <= {1, default_num_workers()}
        assert len([k for k in ds._wavesweep_eval_loaders if k == (5, 1, False)]) == 1
    finally:
        close_loaders(ds)


def test_time_inference_on_tensor_images_times_the_same_inputs(cnn, digits):
    t = time_inference(cnn, digits.test, batch_size=100, n_warmup=0, n_batches=4, device="cpu")
    assert t.batch_size == 100 and t.n_batches == 4 and t.median_ms > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_cpu(digits):
    models = _models(n=2)
    cpu = predict_many(models, digits.test, batch_size=64, device="cpu")
    gpu = predict_many(models, digits.test, batch_size=64, device="cuda")
    assert str(next(iter(digits.test._copies))) == "cuda:0"  # moved once, cached on the dataset
    for k in models:
        torch.testing.assert_close(gpu[k][0], cpu[k][0], rtol=1e-4, atol=1e-4)
        assert torch.equal(gpu[k][1], cpu[k][1]) and gpu[k][0].device.type == "cpu"
    again = predict(models["cnn0"], digits.test, batch_size=64, device="cuda")
    assert torch.equal(again[0], gpu["cnn0"][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_dataset_is_copied_once_while_unchanged():
    """A float TensorDataset on the CPU goes to the GPU once: the next pass reuses the copy; an
    in-place change of the tensor makes a fresh copy (the predictions follow the new values);
    close_loaders drops it."""
    from wavesweep.data import DEVICE_COPY_ATTR

    torch.manual_seed(0)
    model = _models(n=1)["cnn0"].eval()
    x, y = torch.randn(50, 1, 8, 8), torch.arange(50) % 10
    ds = TensorDataset(x, y)
    first = predict(model, ds, batch_size=16, device="cuda")[0]
    copy = ds.__dict__[DEVICE_COPY_ATTR][1]
    assert copy.device.type == "cuda" and torch.equal(copy.cpu(), x)
    again = predict(model, ds, batch_size=16, device="cuda")[0]
    assert ds.__dict__[DEVICE_COPY_ATTR][1] is copy and torch.equal(again, first)
    x.mul_(2)  # in place: the cached copy is stale
    changed = predict(model, ds, batch_size=16, device="cuda")[0]
    assert torch.equal(ds.__dict__[DEVICE_COPY_ATTR][1].cpu(), x)
    with torch.inference_mode():
        torch.testing.assert_close(changed, model.cuda()(x.cuda()).cpu(), rtol=1e-4, atol=1e-4)
    close_loaders(ds)
    assert DEVICE_COPY_ATTR not in ds.__dict__


def test_nan_logits_rank_as_argmax_and_topk_rank_them():
    """NaN logits (a fine-tuning that diverged) rank above every number, as argmax and topk rank
    them: a model whose logits are all NaN scored top-5 = 1.0 (every target ranked first) while
    its top-1 was chance. Oracle: membership in ``torch.topk`` (NaN largest) where nothing ties,
    and the target's position under (NaN first, -logit, index) where everything does."""
    rng = np.random.default_rng(2)
    n, c = 500, 12
    logits = torch.from_numpy(rng.normal(size=(n, c)).astype(np.float32))
    rows = np.flatnonzero(rng.random(n) < 0.6)
    logits[rows, rng.integers(0, c, size=rows.size)] = float("nan")  # at most one NaN per row: no ties
    y = torch.from_numpy(rng.integers(0, c, size=n))
    r = metrics_from_logits(logits, y)
    assert r.top5 == (logits.topk(5, dim=1).indices == y[:, None]).any(1).double().mean().item()
    assert np.array_equal(r.correct, (logits.argmax(1) == y).numpy()) and r.top5 >= r.top1
    collapsed = metrics_from_logits(torch.full((100, 10), float("nan")), torch.arange(100) % 10)
    assert (collapsed.top1, collapsed.top5) == (0.1, 0.5)  # argmax picks class 0; ranks are the class indices


def test_precision_recall_f1_is_sklearns_bit_for_bit():
    """The bincount form of the per-label scores equals scikit-learn's
    ``precision_recall_fscore_support(..., average=None, zero_division=0)`` exactly (``==``):
    absent classes, labels never predicted, predictions outside the label set, a single label."""
    from sklearn.metrics import precision_recall_fscore_support

    from wavesweep.evaluate import precision_recall_f1

    rng = np.random.default_rng(7)
    cases = []
    for n, c in [(300, 10), (50, 1000), (1000, 3), (7, 5), (1, 4)]:
        y = rng.integers(0, c, size=n)
        pred = np.where(rng.random(n) < 0.5, y, rng.integers(0, c, size=n))
        cases.append((y, pred, c))
    y = rng.integers(0, 4, size=200)
    cases.append((y, np.full(200, 9), 12))  # every prediction outside the labels present
    cases.append((np.full(30, 2), np.full(30, 2), 3))  # one label, all right
    for y, pred, c in cases:
        labels = np.unique(y)
        mine = precision_recall_f1(y, pred, labels, c)
        oracle = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
        for a, b in zip(mine, oracle):
            assert a.shape == b.shape and np.array_equal(a, b), (a, b)


def test_target_rank_equals_its_definition_on_every_row():
    """The two-comparison rank (ties and NaN rows sent to the full rule) equals the full rule on
    every row: no ties, ties everywhere, NaN logits and NaN targets, infinities, signed zeros."""
    from wavesweep.evaluate import _target_rank, _target_rank_full

    rng = np.random.default_rng(3)
    n, c = 600, 16
    cases = [rng.normal(size=(n, c)), rng.integers(0, 3, size=(n, c)).astype(float)]
    mixed = rng.normal(size=(n, c))
    mixed[rng.random((n, c)) < 0.05] = np.nan
    mixed[rng.random((n, c)) < 0.05] = np.inf
    mixed[rng.random((n, c)) < 0.05] = -np.inf
    mixed[rng.random((n, c)) < 0.05] = 0.0
    mixed[rng.random((n, c)) < 0.05] = -0.0
    cases += [mixed, np.full((n, c), np.nan)]
    y = torch.from_numpy(rng.integers(0, c, size=n))
    for a in cases:
        logits = torch.from_numpy(a.astype(np.float32))
        fast = _target_rank(logits, y, logits.argmax(1))
        assert torch.equal(fast, _target_rank_full(logits, y))
    assert torch.equal(_target_rank_full(torch.full((1, 4), float("nan")), torch.tensor([2])), torch.tensor([2]))


def _device_or_skip(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return device


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_metrics_scored_on_the_device_equal_the_hosts(device):
    """``evaluate_many`` scores an accelerator's logits where they are: every metric equals the
    host's scoring of the same logits (the loss to float tolerance), ties and NaN rows included.
    With a NaN logit in some rows the mean cross-entropy is NaN wherever it is computed (it was
    compared with ``pytest.approx(nan)``, which no NaN equals: a correct implementation failed), so
    the loss is compared on the same logits without the NaNs too, where it is a number. The CPU
    case runs the same comparison host against host (the test's own logic, on any machine)."""
    dev = _device_or_skip(device)
    rng = np.random.default_rng(4)
    clean = torch.from_numpy(rng.integers(0, 4, size=(2000, 100)).astype(np.float32))
    nan = clean.clone()
    nan[::7, 3] = float("nan")
    y = torch.from_numpy(rng.integers(0, 100, size=2000))
    for logits in (nan, clean):
        host, on_dev = metrics_from_logits(logits, y), metrics_from_logits(logits.to(dev), y.to(dev))
        for k, v in host.metrics().items():
            if k == "loss":
                assert on_dev.loss == pytest.approx(v, rel=1e-6, nan_ok=True), k
            else:
                assert on_dev.metrics()[k] == v, k
        assert all(np.array_equal(getattr(host, a), getattr(on_dev, a)) for a in ("correct", "preds", "targets"))
    assert np.isnan(metrics_from_logits(nan, y).loss) and np.isfinite(metrics_from_logits(clean, y).loss)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_chunks_score_on_the_device_as_evaluate_many(cnn, digits, monkeypatch, device):
    """evaluate_chunks scores its logits on the device, as evaluate_many does (a trial's dwt result
    comes from the chunks, the baselines' from evaluate_many): every scoring of the chunks gets
    logits on the device (the host's and the device's losses differ by rounding alone, so no loss
    tolerance can tell where they were scored), and the last chunk's result equals a device scoring
    of the whole set's logits, the loss to the tolerance of the CPU test of the chunks (the chunks
    batch the examples otherwise: 90 a pass against 256 + 104, and a GPU may pick other kernels
    for other batch sizes). TF32 off: cuDNN's default rounds conv inputs to 10 mantissa bits."""
    import wavesweep.evaluate as E

    dev = torch.device(_device_or_skip(device))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    scored_on: list[torch.device] = []
    real = E.metrics_from_logits

    def spy(logits, targets):
        scored_on.append(logits.device)
        return real(logits, targets)

    monkeypatch.setattr(E, "metrics_from_logits", spy)
    model = copy.deepcopy(cnn)
    last = list(evaluate_chunks(model, digits.test, n_chunks=4, device=dev))[-1].result
    assert len(scored_on) == 4 and all(d.type == dev.type for d in scored_on), scored_on
    logits, targets = predict(model, digits.test, device=dev)
    direct = real(logits.to(dev), targets)
    assert last.metrics() == pytest.approx(direct.metrics(), abs=1e-5)
    assert np.array_equal(last.correct, direct.correct) and last.top1 == direct.top1 and last.top5 == direct.top5


def test_evaluate_many_waits_for_the_device_per_model_not_per_batch():
    """The scoring is on the logits' device with no host sync per batch: counted on CPU tensors with
    a dispatch mode recording the operators that wait for a CUDA device (a scalar read, ``nonzero``'s
    size, ``is_nonzero`` of an ``if``), the same count for 2 batches as for 20 (on CUDA: the one
    ``nonzero`` of the tie rows and the one copy of the results per model; the label checks read
    host tensors)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    waits = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2"}

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in waits:
                self.seen[name] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(1000, 1, 8, 8), torch.arange(1000) % 10)
    models = _models(n=2)
    counts = []
    for bs in (500, 50):
        with Count() as c:
            evaluate_many(models, ds, batch_size=bs, device="cpu")
        counts.append(c.seen)
    assert counts[0] == counts[1], counts
    assert counts[0]["nonzero"] == 2, counts[0]  # the tie rows' one, per model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_evaluated_and_timed_in_its_own_dtype(digits, dtype):
    """A float16 or bfloat16 model (the README: given to ``trial.run_trial`` in Python, it computes
    in its own dtype) failed its first evaluation on every registered dataset: the float32 batches
    reached its float16 weights ("Input type (torch.FloatTensor) and weight type
    (torch.HalfTensor) should be the same"), in predict, evaluate_many and time_inference alike.
    Oracle: the model on each batch cast to its dtype, ``model(x.to(dtype))``."""
    models = _models(n=2)
    half = copy.deepcopy(models["cnn0"]).to(dtype).eval()
    x, y = digits.test[:]
    logits, targets = predict(half, digits.test, batch_size=64, device="cpu")
    with torch.inference_mode():
        expected = torch.cat([half(xb.to(dtype)).float() for xb in x.split(64)])
    assert logits.dtype == torch.float32 and torch.equal(logits, expected) and torch.equal(targets, y)
    # beside float32 models in one pass: each gets its own dtype, and the same numbers as alone
    many = evaluate_many({"half": half, **models}, digits.test, batch_size=64, device="cpu")
    for name, m in {"half": half, **models}.items():
        assert many[name].metrics() == evaluate(m, digits.test, batch_size=64, device="cpu").metrics(), name
    assert many["half"].metrics() == metrics_from_logits(expected, y).metrics()
    assert all(p.dtype == dtype for p in half.parameters())
    t = time_inference(half, digits.test, batch_size=64, n_warmup=1, n_batches=2, device="cpu")
    assert t.batch_size == 64 and t.n_batches == 2 and t.median_ms > 0


def test_a_float64_model_is_scored_in_float64(digits):
    """A float64 model's logits were rounded to float32 before scoring: its loss was float32's,
    and logits that differ below float32's spacing tied (top-1 then took the lower class). They
    stay float64 now. Oracle: the model on float64 batches, and sklearn's log loss of their softmax."""
    model = copy.deepcopy(_models(n=1)["cnn0"]).double().eval()
    x, y = digits.test[:]
    logits, targets = predict(model, digits.test, batch_size=64, device="cpu")
    with torch.inference_mode():
        expected = torch.cat([model(xb.double()) for xb in x.split(64)])
    assert logits.dtype == torch.float64 and torch.equal(logits, expected) and torch.equal(targets, y)
    r = evaluate(model, digits.test, batch_size=64, device="cpu")
    oracle = _sklearn_oracle(expected.numpy(), y.numpy())
    assert r.loss == pytest.approx(oracle["loss"], rel=1e-12, abs=0)
    assert r.top1 == oracle["top1"] and r.top5 == oracle["top5"]
    # ties below float32's spacing: float64 tells the two classes apart
    close = torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    assert metrics_from_logits(close, torch.tensor([1])).top1 == 1.0
