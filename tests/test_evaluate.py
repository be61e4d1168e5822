"""Evaluation: metrics against scikit-learn, determinism, chunks, devices, timing,
and the ImageNet path on a generated folder with random weights from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score, top_k_accuracy_score

from tests.test_data import make_image_folder
from wavesweep.data import dataset_targets, eval_subset, load_dataset
from wavesweep.evaluate import (
    EvalResult,
    evaluate,
    evaluate_chunks,
    metrics_from_logits,
    predict,
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
    assert np.array_equal(a.targets, digits.test.tensors[1].numpy())
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


def test_imagenet_path_generated_folder_random_weights(tmp_path):
    """The real ImageNet code path: synset ImageFolder + eval transform + weights from a file."""
    classes = [f"n{i:08d}" for i in (1440764, 1443537, 1484850, 1491361)]
    make_image_folder(tmp_path / "val", classes, per_class=2, size=(320, 260))
    bundle = load_dataset("imagenet", root=tmp_path / "val", expected_classes=4)
    torch.manual_seed(0)
    weights = tmp_path / RESNET18_IMAGENET_FILE
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = load_pretrained_resnet18(weights)
    r = evaluate(model, bundle.test, batch_size=4, device="cpu")
    assert isinstance(r, EvalResult) and r.n == 8 and r.targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert 0 <= r.top1 <= r.top5 <= 1 and np.isfinite(r.loss)
    again = evaluate(model, bundle.test, batch_size=8, device="cpu")
    assert np.array_equal(r.preds, again.preds) and r.loss == pytest.approx(again.loss, rel=1e-5)
