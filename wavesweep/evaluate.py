"""Evaluation on the same examples for every model: accuracy, top-5, loss, F1/recall/
precision (scikit-learn), the per-example correctness vector, and inference timing.

Knows nothing of MLflow or Optuna: :func:`evaluate_chunks` yields partial results that a
study may report to a pruner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from wavesweep.data import dataset_targets, make_loader, stratified_order, take

log = logging.getLogger(__name__)

_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; ``"cpu"``; ``"cuda"``; ``"cuda:N"``.
    ValueError for anything else, RuntimeError if CUDA is asked for but unavailable."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"unknown device {device!r}; valid: {_DEVICE_CHOICES}")
    d = device.strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        dev = torch.device(d)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    raise ValueError(f"unknown device {device!r}; valid: {_DEVICE_CHOICES}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, tolerating modules that forbid it.

    A model loaded from a ``pt2`` (``torch.export``) MLflow model raises NotImplementedError on
    ``eval()``/``train()``; it was exported in eval mode and stays so.
    """
    try:
        model.train(training)
    except NotImplementedError:
        pass


def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 CPU (N, C) and targets int64 CPU (N,) over ``dataset`` in its order,
    under ``torch.inference_mode``. The model is moved to ``device`` (``nn.Module.to`` is
    in place) and put in eval mode; its train/eval flag is restored afterwards."""
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev)
    _set_mode(model, False)
    logits, targets = [], []
    non_blocking = dev.type == "cuda"
    try:
        with torch.inference_mode():
            loader = make_loader(dataset, batch_size=batch_size)
            for x, y in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
                out = model(x.to(dev, non_blocking=non_blocking))
                logits.append(out.float())  # stays on device: no sync per batch
                targets.append(torch.as_tensor(y))
    finally:
        _set_mode(model, was_training)
    if not logits:
        raise ValueError("cannot evaluate on an empty dataset")
    lg = torch.cat(logits).cpu()
    tg = torch.cat(targets).to(torch.int64).cpu()
    if tg.numel() and int(tg.max()) >= lg.shape[1]:
        raise ValueError(
            f"dataset has label {int(tg.max())} but the model outputs {lg.shape[1]} logits; "
            "the dataset's classes do not match the model's output size"
        )
    return lg, tg


@dataclass
class EvalResult:
    """Metrics over ``n`` examples. ``correct``/``preds``/``targets`` are per example, in the
    dataset's order, so paired statistics between methods line up example by example."""

    n: int
    top1: float
    top5: float
    loss: float
    f1_macro: float
    recall_macro: float
    precision_macro: float
    f1_weighted: float
    correct: np.ndarray  # bool (N,)
    preds: np.ndarray  # int64 (N,)
    targets: np.ndarray  # int64 (N,)

    def metrics(self) -> dict[str, float]:
        """The scalar metrics, in [0, 1] except ``loss`` (mean cross-entropy, nats)."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "f1_macro": self.f1_macro,
            "recall_macro": self.recall_macro,
            "precision_macro": self.precision_macro,
            "f1_weighted": self.f1_weighted,
        }


def metrics_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> EvalResult:
    """All metrics from logits (N, C) and integer targets (N,).

    top-5 is top-min(5, C). F1/recall/precision are scikit-learn's
    ``precision_recall_fscore_support`` with ``zero_division=0`` over the labels present
    in ``targets`` (np.unique(targets)): on an evaluation subset of a 1000-class set,
    classes with no example would otherwise count as 0 and drag the macro means down;
    the label set depends only on the examples, so it is the same for every model
    evaluated on them. (For digits every class is present: identical to labels=range(C).)
    """
    from sklearn.metrics import precision_recall_fscore_support

    logits = torch.as_tensor(logits).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().to(torch.int64).cpu()
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"need logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    n, c = logits.shape
    if n == 0:
        raise ValueError("cannot compute metrics on zero examples")
    k = min(5, c)
    preds = logits.argmax(dim=1)  # (N,)
    correct = preds == targets
    topk = logits.topk(k, dim=1).indices  # (N, k)
    top5 = (topk == targets[:, None]).any(dim=1).float().mean().item()
    loss = F.cross_entropy(logits, targets).item()
    y_true, y_pred = targets.numpy(), preds.numpy()
    labels = np.unique(y_true)
    # one per-class call; macro = unweighted mean, weighted = support-weighted mean over
    # ``labels`` (what sklearn's average="macro"/"weighted" compute), at half the cost
    p, r, f, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    weights = support / support.sum()
    return EvalResult(
        n=n,
        top1=correct.float().mean().item(),
        top5=top5,
        loss=loss,
        f1_macro=float(f.mean()),
        recall_macro=float(r.mean()),
        precision_macro=float(p.mean()),
        f1_weighted=float((f * weights).sum()),
        correct=correct.numpy().astype(bool),
        preds=y_pred.astype(np.int64),
        targets=y_true.astype(np.int64),
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> EvalResult:
    """:func:`predict` then :func:`metrics_from_logits` over the whole ``dataset``."""
    logits, targets = predict(model, dataset, batch_size=batch_size, device=device, progress=progress)
    return metrics_from_logits(logits, targets)


class Chunk(NamedTuple):
    """One step of :func:`evaluate_chunks`."""

    step: int  # 0-based chunk index
    result: EvalResult  # cumulative: every example seen so far, in dataset order
    n: int  # examples in this chunk
    correct: int  # of them, top-1 correct


def evaluate_chunks(
    model: nn.Module,
    dataset: Dataset,
    *,
    n_chunks: int,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = False,
) -> Iterator[Chunk]:
    """Evaluate in ``n_chunks`` pieces, yielding after each the cumulative result with the
    chunk's own size and top-1 correct count (a :class:`Chunk`).

    The examples are visited in :func:`wavesweep.data.stratified_order` (seeded by
    ``seed``), cut into ``n_chunks`` nearly equal consecutive pieces, so every partial
    result is over a class-proportional sample and its accuracy is representative (a
    study can report it to an Optuna pruner). Each yielded result has its per-example
    arrays in dataset order of the examples seen so far; the last one covers the whole
    dataset and equals :func:`evaluate` (up to float rounding of the loss from different
    batch composition).
    """
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    order = stratified_order(dataset_targets(dataset), seed)
    pieces = [p for p in np.array_split(order, min(n_chunks, len(order))) if len(p)]
    seen_idx: list[np.ndarray] = []
    seen_logits: list[torch.Tensor] = []
    seen_targets: list[torch.Tensor] = []
    for step, piece in enumerate(tqdm(pieces, desc="chunks", leave=False, disable=not progress)):
        piece = np.sort(piece)  # dataset order inside a chunk: sequential reads
        lg, tg = predict(model, take(dataset, piece), batch_size=batch_size, device=device)
        seen_idx.append(piece)
        seen_logits.append(lg)
        seen_targets.append(tg)
        idx = np.concatenate(seen_idx)
        back = torch.from_numpy(np.argsort(idx, kind="stable"))  # back to dataset order
        result = metrics_from_logits(torch.cat(seen_logits)[back], torch.cat(seen_targets)[back])
        yield Chunk(step, result, len(piece), int((lg.argmax(1) == tg).sum()))


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-batch inference latency of one model, by :func:`time_inference`."""

    device: str
    batch_size: int
    threads: int
    n_warmup: int
    n_batches: int
    median_ms: float  # per batch
    p95_ms: float  # per batch
    ms_per_example: float  # median_ms / batch_size
    examples_per_s: float  # batch_size / median seconds

    def metrics(self) -> dict[str, float]:
        return {
            "infer_median_ms": self.median_ms,
            "infer_p95_ms": self.p95_ms,
            "infer_ms_per_example": self.ms_per_example,
            "infer_examples_per_s": self.examples_per_s,
        }


_TIMING_POOL_BYTES = 256 * 2**20  # cap on the distinct input batches held in memory


def time_inference(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    n_warmup: int = 3,
    n_batches: int = 20,
    device: str | torch.device = "auto",
) -> Timing:
    """Per-batch latency of ``model(x)``: ``n_warmup`` untimed batches, then ``n_batches``
    timed ones, each under ``torch.inference_mode`` with the wall clock read after a CUDA
    synchronize when on CUDA. Inputs are the dataset's first full batches, moved to the
    device beforehand (at most 256 MiB of them, reused cyclically), so data loading is not
    timed and every model sees the same inputs. If the dataset is smaller than
    ``batch_size``, the batch is the whole dataset and that size is recorded."""
    if n_batches < 1 or n_warmup < 0:
        raise ValueError(f"need n_batches >= 1 and n_warmup >= 0, got {n_batches}, {n_warmup}")
    dev = resolve_device(device)
    bs = min(batch_size, len(dataset))
    pool: list[torch.Tensor] = []
    for x, _ in make_loader(dataset, batch_size=bs):
        if x.shape[0] != bs:
            break
        pool.append(x.to(dev))
        if len(pool) >= n_batches or (len(pool) + 1) * x.numel() * x.element_size() > _TIMING_POOL_BYTES:
            break
    was_training = model.training
    model.to(dev)
    _set_mode(model, False)
    times: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(n_warmup):
                model(pool[i % len(pool)])
            _sync(dev)
            for i in range(n_batches):
                x = pool[i % len(pool)]
                t0 = time.perf_counter()
                model(x)
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        _set_mode(model, was_training)
    med = float(np.median(times))
    return Timing(
        device=str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        batch_size=bs,
        threads=torch.get_num_threads(),
        n_warmup=n_warmup,
        n_batches=n_batches,
        median_ms=med,
        p95_ms=float(np.percentile(times, 95)),
        ms_per_example=med / bs,
        examples_per_s=bs / (med / 1000.0),
    )
