"""Evaluation on the same examples for every model: accuracy, top-5, loss, F1/recall/
precision (scikit-learn), the per-example correctness vector, and inference timing.

Knows nothing of MLflow or Optuna: :func:`evaluate_chunks` yields partial results that a
study may report to a pruner. :func:`predict_many` feeds several models from one pass over
the data; in-memory datasets stay on the device between calls (:func:`input_batches`).
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
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from wavesweep.data import DEVICE_COPY_ATTR, TensorImages, dataset_targets, eval_batches, stratified_order, take

log = logging.getLogger(__name__)

_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


#: On a CPU a trial's conv models compute in channels-last memory format (NHWC): oneDNN's
#: convolutions run 1.2-2.0x faster there than in the contiguous format (ResNet-18 and the cnn,
#: 8-32 px, batches of 64-256, eval and train mode; ``bench/bench_speedups.py --only
#: channels_last``; at 224 px, batch 8: ResNet-50 1.23x, ViT-B/16, one conv, 1.02x). The values
#: are the same; the logits differ from a contiguous model's by float
#: rounding (about 1e-6). Off (False): every model as it comes.
CPU_CHANNELS_LAST = True
#: The same on a CUDA device: off until measured on a GPU (``bench/bench_speedups.py --only
#: channels_last`` times it on every device it finds, ``bench/gpu_checks.sh layout`` on a GPU
#: machine). A trial run with it on gives the contiguous trial's prunings and predictions
#: (``tests/test_trial.py``, its CUDA case).
CUDA_CHANNELS_LAST = False


def compute_layout(model: nn.Module, device: torch.device) -> str:
    """Put ``model`` in the memory format a trial computes it in on ``device``, in place (its
    values unchanged), and return that format's name: ``"channels_last"`` for a model with a 4-D
    parameter (a convolution) on a CPU while :data:`CPU_CHANNELS_LAST` is on (on a CUDA device
    while :data:`CUDA_CHANNELS_LAST` is), else ``"contiguous"`` (the model as it is). Every copy
    of the model (the pruned ones) inherits it, so the base and the three methods compute alike."""
    on = {"cpu": CPU_CHANNELS_LAST, "cuda": CUDA_CHANNELS_LAST}.get(device.type, False)
    if not (on and any(p.dim() == 4 for p in model.parameters())):
        return "contiguous"
    model.to(memory_format=torch.channels_last)
    return "channels_last"


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


# --------------------------------------------------------------------------- batches

# Share of the free CUDA memory an in-memory dataset may take when it is copied to the GPU
# whole; a larger one is streamed batch by batch from pinned memory instead.
_DEVICE_DATA_FRACTION = 0.25


def _fits_on(dev: torch.device, nbytes: int) -> bool:
    if dev.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(dev)
    return nbytes <= _DEVICE_DATA_FRACTION * free


def _stream(x: torch.Tensor, dev: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of CPU tensor ``x`` on ``dev``: pinned and copied without blocking on CUDA."""
    for i in range(0, x.shape[0], batch_size):
        b = x[i : i + batch_size]
        yield b.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else b


def input_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x float32 (B, C, H, W) on device, y int64 (B,) on CPU)`` over ``dataset`` in its order.

    - :class:`~wavesweep.data.TensorImages`: its uint8 tensors are moved to ``device`` once
      (the copy is cached on the dataset, so the next model, the next call and any subset
      made by ``take`` reuse it), batches are sliced and normalised there: no per-batch
      host->device copy, no per-batch synchronisation.
    - TensorDataset: the input tensor is moved to ``device`` once and the copy cached on the
      dataset (reused while the tensor is unchanged: same storage, no in-place change since;
      :func:`wavesweep.data.close_loaders` drops it), or streamed from pinned memory when it
      would not fit; then sliced.
    - anything else (ImageFolder, ImageNet): decoded by worker processes through one
      persistent loader cached on the dataset (:func:`wavesweep.data.eval_batches`),
      pinned and copied without blocking on CUDA.
    Either kind of dataset that is too large for a quarter of the free GPU memory is streamed.
    """
    if isinstance(dataset, TensorImages):
        y_cpu = dataset.targets.cpu()  # once: a per-batch .cpu() of device labels would sync
        if dataset.device == device or _fits_on(device, dataset.nbytes):
            ds = dataset.to(device)
            xs = (ds.batch(slice(i, i + batch_size))[0] for i in range(0, len(ds), batch_size))
        else:
            xs = (dataset.normalise(xb) for xb in _stream(dataset.images, device, batch_size))
        yield from zip(xs, y_cpu.split(batch_size))
        return
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0], torch.as_tensor(dataset.tensors[1])
        if x.device == device:
            xs: Iterator[torch.Tensor] = iter(x.split(batch_size))
        elif _fits_on(device, x.nbytes):
            xs = iter(_device_copy(dataset, x, device).split(batch_size))
        else:
            xs = _stream(x, device, batch_size)
        yield from zip(xs, y.split(batch_size))
        return
    cuda = device.type == "cuda"
    for x, y in eval_batches(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=cuda):
        yield x.to(device, non_blocking=cuda), torch.as_tensor(y)


def _device_copy(dataset: TensorDataset, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``, copied once per dataset while ``x`` is unchanged (its storage and its
    version counter, which every in-place change bumps); the next model and call reuse it."""
    key = (str(device), x.data_ptr(), x._version, tuple(x.shape), x.dtype)
    cached = dataset.__dict__.get(DEVICE_COPY_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    dataset.__dict__.pop(DEVICE_COPY_ATTR, None)  # the old copy first: never two on the device
    copy = x.to(device)
    dataset.__dict__[DEVICE_COPY_ATTR] = (key, copy)
    return copy


def _check_batch_size(batch_size: int) -> None:
    """One-line ValueError for a batch size that is not a positive int (0 or a negative one would
    otherwise end in a ZeroDivisionError, or in torch's "split_size be non-negative")."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_classes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """ValueError unless every label indexes a logit (0 <= label < C): a label outside that range
    would otherwise be scored (predict) and then fail in a bare index error (metrics)."""
    if not targets.numel():
        return
    lo, hi, c = int(targets.min()), int(targets.max()), logits.shape[1]
    if lo < 0:
        raise ValueError(f"dataset has label {lo}; labels must be class indices 0..{c - 1} "
                         f"(the model outputs {c} logits)")
    if hi >= c:
        raise ValueError(
            f"dataset has label {hi} but the model outputs {c} logits; "
            "the dataset's classes do not match the model's output size"
        )


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype ``model`` computes in: its first floating parameter's (or buffer's);
    None for a model with neither (its input is passed as it is). A float16 or bfloat16 model is
    given the (float32) batches rounded to its dtype, as ``model.half()(x.half())``."""
    return next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)


def _as_input(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` in ``dtype`` when both are floating and differ, else ``x`` itself."""
    return x if dtype is None or x.dtype == dtype or not x.is_floating_point() else x.to(dtype)


def _scoring_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Logits as they are scored: float64 stays float64 (a float64 model's loss and its ties are
    its own), anything else becomes float32 (float16/bfloat16 outputs, integer test doubles)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _bytes_to_move(model: nn.Module, dev: torch.device) -> int:
    """Bytes of ``model``'s parameters and buffers not yet on ``dev``'s kind of device."""
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()) if t.device.type != dev.type)


def _logits_many(
    models: dict[str, nn.Module],
    dataset: Dataset,
    *,
    batch_size: int,
    device: str | torch.device,
    progress: bool,
    num_workers: int | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({name: logits float32, float64 for a float64 model, (N, C) on the device}, targets int64
    CPU (N,))`` from one pass
    (:func:`predict_many`, which copies the logits to the host; :func:`evaluate_many` scores them
    where they are, so an accelerator's logits never cross to the host whole)."""
    if not models:
        raise ValueError("predict_many needs at least one model")
    _check_batch_size(batch_size)
    dev = resolve_device(device)
    if len(models) > 1 and not _fits_on(dev, sum(_bytes_to_move(m, dev) for m in models.values())):
        out, tg = {}, None
        for name, m in models.items():
            home = next(iter(m.parameters()), torch.empty(0)).device
            one, tg = _logits_many({name: m}, dataset, batch_size=batch_size, device=dev,
                                   progress=progress, num_workers=num_workers)
            out[name] = one[name]
            m.to(home)
        return out, tg
    was_training = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.to(dev)
        _set_mode(m, False)
    dtypes = {k: input_dtype(m) for k, m in models.items()}  # a float16/bfloat16 model: its batches cast once
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in models}
    targets: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            batches = input_batches(dataset, batch_size=batch_size, device=dev, num_workers=num_workers)
            n_batches = (len(dataset) + batch_size - 1) // batch_size
            for x, y in tqdm(batches, total=n_batches, desc="evaluate", leave=False, disable=not progress):
                cast: dict[torch.dtype | None, torch.Tensor] = {}  # per dtype, shared by the models in it
                for k, m in models.items():
                    if dtypes[k] not in cast:
                        cast[dtypes[k]] = _as_input(x, dtypes[k])
                    logits[k].append(_scoring_dtype(m(cast[dtypes[k]])))  # stays on device: no sync per batch
                targets.append(y)
    finally:
        for k, m in models.items():
            _set_mode(m, was_training[k])
    if not targets:
        raise ValueError("cannot evaluate on an empty dataset")
    tg = torch.cat(targets).to(torch.int64).cpu()
    out = {}
    for k in models:
        lg = torch.cat(logits[k])
        if lg.ndim != 2 or lg.shape[0] != tg.shape[0]:
            raise ValueError(f"model {k!r} gives outputs of shape {tuple(lg.shape)} for {tg.shape[0]} examples; "
                             "expected logits (examples, classes)")
        _check_classes(lg, tg)
        out[k] = lg
    return out, tg


def predict_many(
    models: dict[str, nn.Module],
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
    num_workers: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (logits float32 (float64 for a float64 model) CPU (N, C), targets int64 CPU (N,))}`` for every model, from
    ONE pass over ``dataset``: each batch is loaded (decoded, normalised) once and fed to
    every model, so a trial's base/magnitude/random models share the data cost. The
    logits equal separate :func:`predict` calls exactly (same batches, same ops). Where the
    models together would not fit in a quarter of the free GPU memory, the pass is made
    once per model instead (each model goes back to its device afterwards). Models are
    moved to ``device`` and put in eval mode; their train/eval flags are restored. The
    targets tensor is shared by all entries. Every model gets the same input tensor, which may
    be a view of the dataset's own storage: a model must not change its input in place (none
    of the registered architectures does; a first ``ReLU(inplace=True)`` would). A model in
    another floating dtype (float16, bfloat16: :func:`input_dtype`) gets the batch cast to it."""
    logits, tg = _logits_many(models, dataset, batch_size=batch_size, device=device, progress=progress,
                              num_workers=num_workers)
    return {k: (lg.cpu(), tg) for k, lg in logits.items()}  # one device->host copy per model


def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
    num_workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 (float64 for a float64 model) CPU (N, C) and targets int64 CPU (N,) over ``dataset`` in its order,
    under ``torch.inference_mode``. The model is moved to ``device`` (``nn.Module.to`` is
    in place) and put in eval mode; its train/eval flag is restored afterwards. Data comes
    from :func:`input_batches` (in-memory data stays on the device between calls)."""
    return predict_many({"model": model}, dataset, batch_size=batch_size, device=device,
                        progress=progress, num_workers=num_workers)["model"]


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


def _target_rank(logits: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """The target's rank (N,) among its row's logits under argmax's rule: classes above it, and
    equal ones with a lower index, count; NaN ranks above every number (as in argmax and topk),
    so a diverged model's NaN logits never put the target first.

    Two comparisons a row where nothing ties with the target (``>`` and ``>=`` agree but for the
    target itself); the rows where something does, or where a NaN is (argmax picks a row's NaN),
    are ranked by the full rule: 2 passes over (N, C) instead of 7 (:func:`_target_rank_full`
    is the oracle in the tests, on every row)."""
    tl = logits.gather(1, targets[:, None])
    gt = (logits > tl).sum(1)
    ge = (logits >= tl).sum(1)
    odd = (ge - gt != 1) | logits.gather(1, preds[:, None]).squeeze(1).isnan()
    rows = odd.nonzero().squeeze(1)
    if rows.numel():
        gt = gt.index_put((rows,), _target_rank_full(logits[rows], targets[rows]))
    return gt


def _target_rank_full(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`_target_rank` by its definition, over every element of every row."""
    c = logits.shape[1]
    tl = logits.gather(1, targets[:, None])
    nan, tl_nan = logits.isnan(), tl.isnan()
    above = (logits > tl) | (nan & ~tl_nan)
    equal = (logits == tl) | (nan & tl_nan)
    return above.sum(1) + (equal & (torch.arange(c, device=logits.device)[None] < targets[:, None])).sum(1)


def precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, n_classes: int):
    """Per-label precision, recall, F1 and support over ``labels``: scikit-learn's
    ``precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None,
    zero_division=0)`` bit for bit (the same counts, the same float64 divisions: tp / predicted,
    tp / true, 2 tp / (true + predicted), 0 where a denominator is 0; the test compares with ``==``),
    from three ``np.bincount`` calls instead of its validation and multilabel confusion matrix
    (1-2 ms a model, most of a small evaluation's metrics). Labels are ints in [0, n_classes)."""
    correct = y_true == y_pred
    tp = np.bincount(y_true[correct], minlength=n_classes)[labels]
    pred_sum = np.bincount(y_pred, minlength=n_classes)[labels]
    true_sum = np.bincount(y_true, minlength=n_classes)[labels]

    def divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        den = den.copy()
        zero = den == 0
        den[zero] = 1
        out = num / den
        out[zero] = 0.0
        return out

    precision = divide(tp, pred_sum)
    recall = divide(tp, true_sum)
    f1 = divide(2.0 * tp.astype(np.float64), 1.0 * true_sum.astype(np.float64) + pred_sum.astype(np.float64))
    return precision, recall, f1, true_sum


def metrics_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> EvalResult:
    """All metrics from logits (N, C) and integer targets (N,), computed where the logits are
    (on an accelerator only the per-example predictions and ranks come to the host, in one copy;
    finding the rows with ties or NaN, :func:`_target_rank`, waits for the device once more).

    top-5 is top-min(5, C). F1/recall/precision are scikit-learn's
    ``precision_recall_fscore_support`` with ``zero_division=0`` over the labels present
    in ``targets`` (np.unique(targets)): on an evaluation subset of a 1000-class set,
    classes with no example would otherwise count as 0 and drag the macro means down;
    the label set depends only on the examples, so it is the same for every model
    evaluated on them. (For digits every class is present: identical to labels=range(C).)
    """
    logits = torch.as_tensor(logits).detach()
    targets = torch.as_tensor(targets).detach().to(torch.int64)
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"need logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    n, c = logits.shape
    if n == 0:
        raise ValueError("cannot compute metrics on zero examples")
    y_true = targets.cpu()
    _check_classes(logits, y_true)
    logits = _scoring_dtype(logits)
    t = y_true.to(logits.device, non_blocking=True)
    k = min(5, c)
    preds = logits.argmax(dim=1)  # (N,): among equal logits the lowest class (torch's rule)
    # top-1 is rank 0 (= argmax), top-k rank < k, so an example right at top-1 is right at top-5
    # even where logits tie (topk's order among equal values is unspecified)
    in_topk = _target_rank(logits, t, preds) < k
    loss = F.cross_entropy(logits, t)
    # one device->host copy: predictions (exact in float64), top-k flags, the loss
    packed = torch.cat([preds.double(), in_topk.double(), loss.double().view(1)]).cpu()
    y_pred = packed[:n].to(torch.int64).numpy()
    y_true = y_true.numpy()
    correct = y_pred == y_true
    labels = np.unique(y_true)
    # macro = unweighted mean, weighted = support-weighted mean over ``labels`` (what sklearn's
    # average="macro"/"weighted" compute)
    p, r, f, support = precision_recall_f1(y_true, y_pred, labels, c)
    weights = support / support.sum()
    return EvalResult(
        n=n,
        top1=float(correct.mean(dtype=np.float64)),  # float64: the same number as the paired gap's
        top5=float(packed[n : 2 * n].numpy().mean(dtype=np.float64)),
        loss=float(packed[2 * n]),
        f1_macro=float(f.mean()),
        recall_macro=float(r.mean()),
        precision_macro=float(p.mean()),
        f1_weighted=float((f * weights).sum()),
        correct=correct,
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
    num_workers: int | None = None,
) -> EvalResult:
    """:func:`predict` then :func:`metrics_from_logits` over the whole ``dataset`` (scored on the
    device, as :func:`evaluate_many`)."""
    return evaluate_many({"model": model}, dataset, batch_size=batch_size, device=device, progress=progress,
                         num_workers=num_workers)["model"]


def evaluate_many(
    models: dict[str, nn.Module],
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = False,
    num_workers: int | None = None,
) -> dict[str, EvalResult]:
    """:func:`evaluate` of every model from one pass over ``dataset`` (:func:`predict_many`):
    exactly what separate :func:`evaluate` calls give. Each model's logits are scored where they
    were computed (:func:`metrics_from_logits`): on an accelerator they do not cross to the host."""
    logits, targets = _logits_many(models, dataset, batch_size=batch_size, device=device, progress=progress,
                                   num_workers=num_workers)
    return {name: metrics_from_logits(lg, targets) for name, lg in logits.items()}


class Chunk(NamedTuple):
    """One step of :func:`evaluate_chunks`."""

    step: int  # 0-based chunk index
    result: EvalResult  # cumulative: every example seen so far, in dataset order
    n: int  # examples in this chunk
    correct: int  # of them, top-1 correct


def chunk_pieces(targets: np.ndarray, n_chunks: int, seed: int = 0) -> list[np.ndarray]:
    """The examples (positions) of each of :func:`evaluate_chunks`'s chunks, in visiting order:
    :func:`wavesweep.data.stratified_order` of ``targets`` (seeded by ``seed``) cut into
    ``n_chunks`` nearly equal consecutive pieces (fewer when there are fewer examples)."""
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    order = stratified_order(np.asarray(targets), seed)
    if not len(order):
        raise ValueError("cannot evaluate on an empty dataset")
    return [p for p in np.array_split(order, min(n_chunks, len(order))) if len(p)]


def replay_chunks(preds: np.ndarray, targets: np.ndarray, n_classes: int, *, n_chunks: int, seed: int = 0) -> Iterator[Chunk]:
    """The :class:`Chunk` s :func:`evaluate_chunks` yielded for a model whose top-1 predictions over
    the examples (in dataset order) were ``preds``: a finished run's recorded predictions, given
    again to an early-stopping reporter without evaluating anything. Each chunk's step, size and
    correct count are :func:`evaluate_chunks`'s exactly, and so are its cumulative result's top-1,
    F1, recall, precision and per-example arrays (they depend on the predictions alone); top-5
    and the loss need the logits, which a run does not keep: they are NaN."""
    preds = np.asarray(preds, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    if preds.shape != targets.shape or preds.ndim != 1:
        raise ValueError(f"need predictions and targets of one length, got shapes {preds.shape} and {targets.shape}")
    seen = np.zeros(len(targets), dtype=bool)
    for step, piece in enumerate(chunk_pieces(targets, n_chunks, seed)):
        seen[piece] = True
        idx = np.flatnonzero(seen)  # dataset order, as evaluate_chunks' cumulative result
        y_true, y_pred = targets[idx], preds[idx]
        correct = y_true == y_pred
        p, r, f, support = precision_recall_f1(y_true, y_pred, np.unique(y_true), n_classes)
        result = EvalResult(
            n=len(idx), top1=float(correct.mean(dtype=np.float64)), top5=float("nan"), loss=float("nan"),
            f1_macro=float(f.mean()), recall_macro=float(r.mean()), precision_macro=float(p.mean()),
            f1_weighted=float((f * (support / support.sum())).sum()), correct=correct, preds=y_pred, targets=y_true,
        )  # fmt: skip
        yield Chunk(step, result, len(piece), int((preds[piece] == targets[piece]).sum()))


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
    _check_batch_size(batch_size)
    pieces = chunk_pieces(dataset_targets(dataset), n_chunks, seed)
    seen_idx: list[np.ndarray] = []
    seen_logits: list[torch.Tensor] = []
    seen_targets: list[torch.Tensor] = []
    for step, piece in enumerate(tqdm(pieces, desc="chunks", leave=False, disable=not progress)):
        piece = np.sort(piece)  # dataset order inside a chunk: sequential reads
        # the logits stay where they were computed and are scored there, as evaluate_many's are
        logits, tg = _logits_many({"model": model}, take(dataset, piece), batch_size=batch_size, device=device,
                                  progress=False, num_workers=None)
        lg = logits["model"]
        seen_idx.append(piece)
        seen_logits.append(lg)
        seen_targets.append(tg)
        idx = np.concatenate(seen_idx)
        back = torch.from_numpy(np.argsort(idx, kind="stable"))  # back to dataset order
        result = metrics_from_logits(torch.cat(seen_logits)[back.to(lg.device)], torch.cat(seen_targets)[back])
        yield Chunk(step, result, len(piece), int((lg.argmax(1).cpu() == tg).sum()))


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
    timed and every model sees the same inputs (in-memory data: sliced from the dataset's
    cached device copy; cast to a float16/bfloat16 model's dtype). If the dataset is smaller than
    ``batch_size``, the batch is the whole dataset and that size is recorded."""
    if n_batches < 1 or n_warmup < 0:
        raise ValueError(f"need n_batches >= 1 and n_warmup >= 0, got {n_batches}, {n_warmup}")
    _check_batch_size(batch_size)
    if len(dataset) == 0:
        raise ValueError("cannot time inference on an empty dataset")
    dev = resolve_device(device)
    bs = min(batch_size, len(dataset))
    pool: list[torch.Tensor] = []
    for x, _ in input_batches(dataset, batch_size=bs, device=dev):
        if x.shape[0] != bs:
            break
        pool.append(x)
        if len(pool) >= n_batches or (len(pool) + 1) * x.numel() * x.element_size() > _TIMING_POOL_BYTES:
            break
    was_training = model.training
    model.to(dev)
    _set_mode(model, False)
    dtype = input_dtype(model)  # a float16/bfloat16 model: its inputs cast beforehand, not timed
    pool = [_as_input(x, dtype) for x in pool]
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
