"""Recovery after pruning, the same for every method: BatchNorm re-estimation and
mask-preserving fine-tuning (in the wavelet domain for dwt).

Pruning leaves BatchNorm running statistics describing the *unpruned* network; comparing
methods one-shot mostly compares how stale those statistics are. Every method of a trial
gets exactly the same recovery here: the same training examples, in the same batches and
order (:func:`training_batches` is a pure function of the dataset, batch size and seed),
the same step budget, optimizer and schedule.

* ``none``: nothing (the seed study's one-shot protocol).
* ``bn``: :func:`reestimate_bn` -- every BatchNorm layer's running mean and variance become
  the cumulative average (not an exponential one) of the per-batch statistics of its inputs
  over ``batches`` training batches, in train mode for the BatchNorm layers only (dropout and
  everything else stay in eval mode), without gradients. Weights are untouched.
* ``finetune``: :func:`finetune`, then ``bn`` on the final weights. :func:`finetune`: ``steps``
  optimizer steps of cross-entropy on training batches with each method's pruning held exactly. magnitude/random: the gradient of
  every zeroed weight is masked and the weight is written back to +0.0 after each step, so it
  stays bitwise +0.0. dwt: each target weight is parametrised as ``W = IDWT(c * m)``
  (:mod:`wavesweep.wavelets_torch`, in the layer's own layout, wavelet, mode and effective
  level) and only the kept coefficients ``c[m]`` train; the coefficient mask, coefficient
  sparsity and stored bytes do not change and the result's ``coeffs`` become the fine-tuned
  ones (so the compressed checkpoint stores them). Parameters that are not pruned (biases,
  BatchNorm affine, the classifier) train the same way for all three methods; a frozen one
  (``requires_grad`` False: a pruned weight or dwt's coefficients too) stays as it is for every
  method. Fine-tuning
  trains the BatchNorm layers in train mode, as PyTorch does, which replaces their running
  statistics by an exponential average of its last batches under weights still changing; the
  re-estimation after it gives the final weights their cumulative statistics.

  A fine-tuning that diverges (a NaN or infinite training loss at some step, or NaN or infinite
  weights after the last one) raises :class:`FinetuneDiverged`, the same for every method, naming
  the method, the step and the remedy (a lower ``finetune_lr``): a model with NaN weights is never
  scored (its NaN logits would read as a top-1 of one class's share, its loss as ``nan``).

Pure PyTorch: nothing here knows MLflow or Optuna.
"""

from __future__ import annotations


import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from wavesweep.data import TensorImages, seeded_batches
from wavesweep.evaluate import input_dtype
from wavesweep.failures import one_value_per_channel
from wavesweep.pruning import PruneResult
from wavesweep.prune_record import defer_host_copy
from wavesweep.names import check_choice

log = logging.getLogger(__name__)

RECOVERIES: tuple[str, ...] = ("none", "bn", "finetune")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
#: the largest finetune_lr: far above any learning rate that fine-tunes (a step of AdamW moves a
#: weight by up to about lr); above it a float32 optimizer step overflows (lr 1e300 stopped the
#: trial in AdamW with "value cannot be converted to type float without overflow")
MAX_FINETUNE_LR = 1e3

__all__ = [
    "RECOVERIES",
    "OPTIMIZERS",
    "SCHEDULES",
    "MAX_FINETUNE_LR",
    "RecoverySettings",
    "RecoveryReport",
    "FinetuneDiverged",
    "batchnorm_layers",
    "training_batches",
    "epoch_batches",
    "BN_GROUP_BYTES",
    "groups_by_default",
    "bn_group",
    "reestimate_bn",
    "finetune",
    "recover",
]


@dataclass(frozen=True)
class RecoverySettings:
    """How a pruned model is recovered; identical for every method of a trial.

    ``batches``: BatchNorm re-estimation batches, at most one pass over the training split
    (:func:`epoch_batches`). ``steps``: fine-tuning optimizer steps.
    ``batch_size``: examples per training batch (both stages). ``lr``: (peak) learning rate.
    ``seed``: the order of the training examples.
    """

    recovery: str = "bn"
    batches: int = 50
    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("recovery", self.recovery, RECOVERIES)
        check_choice("finetune optimizer", self.optimizer, OPTIMIZERS)
        check_choice("finetune schedule", self.schedule, SCHEDULES)
        for name, value in (("recovery_batches", self.batches), ("finetune_steps", self.steps),
                            ("recovery_batch_size", self.batch_size)):  # fmt: skip
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not (isinstance(self.lr, (int, float, np.floating)) and not isinstance(self.lr, bool)
                and 0 < self.lr <= MAX_FINETUNE_LR):  # NaN fails the comparison too
            raise ValueError(f"finetune_lr={self.lr!r} must be a number in (0, {MAX_FINETUNE_LR:g}]")


class FinetuneDiverged(ValueError):
    """Fine-tuning gave a NaN or infinite training loss or weights (one line: the method, the step,
    the remedy). A ValueError: the remedy is a setting (exit code 2, the trial's runs FAILED, an
    Optuna trial FAIL)."""


@dataclass
class RecoveryReport:
    """What recovery did to one model: which stages ran, on how many batches, how long it took."""

    recovery: str
    bn_layers: int = 0
    bn_batches: int = 0
    finetune_steps: int = 0
    final_train_loss: float = float("nan")
    seconds: float = 0.0
    note: str = ""

    def metrics(self) -> dict[str, float]:
        return {
            "recovery_seconds": self.seconds,
            "recovery_bn_layers": float(self.bn_layers),
            "recovery_bn_batches": float(self.bn_batches),
            "recovery_finetune_steps": float(self.finetune_steps),
            **({"recovery_train_loss": self.final_train_loss} if self.finetune_steps else {}),
        }


# --------------------------------------------------------------------------- data


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (1-D, 2-D, 3-D, sync) that keeps running statistics, in module order."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


#: :func:`training_batches` of in-memory images prepares batches in chunks of at most this many
#: bytes of float32 input (digits: all 22 of a default re-estimation at once; CIFAR-10: 42 batches)
TRAIN_CHUNK_BYTES = 32 << 20


def training_batches(
    dataset: Dataset, *, batch_size: int, n: int, seed: int = 0, num_workers: int | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches ``(x, y)`` of a seeded stream over ``dataset``: a pure function
    of its arguments, so every method of a trial sees the same examples in the same order.

    Each epoch is a new permutation from one ``torch.Generator`` seeded with ``seed``; only
    full batches of ``batch_size`` are used (a BatchNorm layer in train mode cannot take a
    batch whose spatial output is one value per channel), unless the dataset is smaller than
    one batch, in which case each batch is the whole permuted dataset. An in-memory
    :class:`~wavesweep.data.TensorImages` is moved to ``device`` once and its batches are gathered
    and normalised there, up to :data:`TRAIN_CHUNK_BYTES` of them at a time (each batch a view
    of its chunk); other datasets yield CPU batches.

    Any other dataset (image files) is decoded by ``num_workers`` worker processes (default
    :func:`~wavesweep.data.default_num_workers`; 0: in this process), into pinned memory when
    ``device`` is CUDA, by a loader kept on the dataset for the next call
    (:func:`~wavesweep.data.seeded_batches`; :func:`~wavesweep.data.close_loaders` stops its
    workers). Its random transforms draw from generators seeded with (``seed``, the example's
    position in the stream), so the batches are the same for any number of workers, and the
    first ``n`` batches are a prefix of the first ``n + 1``.
    """
    size = len(dataset)
    if size == 0:
        raise ValueError("cannot recover on an empty training split")
    bs = min(batch_size, size)
    gen = torch.Generator().manual_seed(seed)

    def index_batches() -> Iterator[torch.Tensor]:
        while True:
            perm = torch.randperm(size, generator=gen)
            for i in range(0, size - bs + 1, bs):
                yield perm[i : i + bs]

    indices = index_batches()
    if isinstance(dataset, TensorImages):
        # on the device, several batches at a time: their indices in one host-to-device copy, one
        # gather and one normalisation, each batch a slice of it (a few kernels for the chunk
        # instead of per batch: small batches leave a GPU waiting on launches). The same values.
        on_device = dataset.to(device)
        per_batch = bs * math.prod(dataset.images.shape[1:]) * 4  # float32 bytes of one batch
        chunk = max(1, TRAIN_CHUNK_BYTES // per_batch)
        left = n
        while left > 0:
            k = min(chunk, left)
            x, y = on_device.batch(torch.cat([next(indices) for _ in range(k)]))
            for j in range(k):
                yield x[j * bs : (j + 1) * bs], y[j * bs : (j + 1) * bs]
            left -= k
        return
    if isinstance(dataset, TensorDataset):  # one indexing op per batch
        for _ in range(n):
            idx = next(indices)
            x, y = dataset[idx]
            yield x, torch.as_tensor(y)
        return
    order = [next(indices).tolist() for _ in range(n)]
    pin = torch.device(device).type == "cuda"  # for the consumers' non-blocking copies to the device
    for x, y in seeded_batches(dataset, order, seed=seed, num_workers=num_workers, pin_memory=pin):
        yield x, torch.as_tensor(y)


def epoch_batches(size: int, batch_size: int) -> int:
    """How many batches :func:`training_batches` makes of one pass over a split of ``size``
    examples: its full batches of ``batch_size`` (a split smaller than one batch: one batch, the
    whole split).

    BatchNorm re-estimation takes at most this many (:func:`recover`): the cumulative average over
    one pass weights every example seen once, PyTorch's ``torch.optim.swa_utils.update_bn``
    (one pass over its loader). More batches than a pass see examples again, unevenly, at the
    cost of more forward passes and no new information: digits' 1,437 training examples make 22
    batches of 64, and 50 batches of seed 0 saw 42 of them once, 1,027 twice and 368 three times.
    """
    return max(1, size // min(batch_size, size)) if size else 0


# --------------------------------------------------------------------------- BatchNorm


#: Grouped re-estimation (:func:`reestimate_bn` on an accelerator): the largest input of a
#: BatchNorm layer in one grouped forward pass, in bytes, measured on the first batch (which goes
#: through alone). ResNet-18 on digits: 1 MiB a batch, so a default trial's 22 batches (one pass over
#: digits' training split) go through in two passes; on 28 px images: 12.25 MiB (20 a pass); 224 px: 196 MiB (one a pass: such a
#: batch is work enough for a GPU). A grouped pass holds about four such tensors at its peak
#: (input, folded copy, output, unfolded copy).
BN_GROUP_BYTES = 256 << 20


def groups_by_default(device: torch.device | str) -> bool:
    """Whether :func:`reestimate_bn` groups batches by default on ``device``: on an accelerator,
    where the small batches of a default trial leave the device waiting on kernel launches; not
    on CPU, which is compute-bound (grouping measured 0.78-1.19x there, ``bench/bench_recovery.py``)."""
    return torch.device(device).type != "cpu"


def bn_group(largest_bn_input_bytes: int) -> int:
    """How many training batches a grouped :func:`reestimate_bn` folds into one forward pass by
    default, given the bytes of the largest BatchNorm input one batch makes: as many as keep that
    input within :data:`BN_GROUP_BYTES`, at least 1."""
    return max(1, BN_GROUP_BYTES // max(1, int(largest_bn_input_bytes)))


def _ungroupable(model: nn.Module) -> str | None:
    """Why ``model``'s batches cannot be grouped, or None. A BatchNorm layer without running
    statistics normalises by the statistics of whatever batch it gets, even in eval mode: in a
    grouped pass, of all the batches together. A BatchNorm class with its own ``forward`` (a frozen
    layer that always normalises by its stored statistics, say): a grouped pass replaces that
    forward by PyTorch's train-mode normalisation, so it would re-estimate what one pass per batch
    cannot."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            return f"BatchNorm layer {name!r} keeps no running statistics (track_running_stats=False)"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward not in _TORCH_BN_FORWARDS:
            return f"BatchNorm layer {name!r} has its own forward ({type(m).__name__})"
    return None


#: the ``forward`` of PyTorch's own BatchNorm classes (:func:`_ungroupable`)
_TORCH_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _grouped_bn_forward(m: nn.modules.batchnorm._BatchNorm, state: dict, sums: dict):
    """A replacement ``forward`` for BatchNorm layer ``m`` while ``state["n"]`` batches of equal
    size go through the model as one: the group is folded into the channels
    (``(n*B, C, ...) -> (B, n*C, ...)``), so one ``F.batch_norm`` in train mode normalises every
    batch by its own mean and biased variance, exactly what ``n`` separate forward passes do when
    every other layer acts on each example alone (eval mode; true of every model in
    :mod:`wavesweep.models`). Each batch's mean and unbiased variance (what PyTorch's running
    statistics take) are added up in ``sums[m][n]``, per group size; the repeated affine
    parameters are made once per group size; ``state["max_bytes"]`` keeps the largest input per
    batch seen. The sums are kept in float32 at least (a float16 layer's statistics are averaged
    there and stored in float16). Per call: the fold, the normalisation, two additions and the unfold."""
    per_n: dict[int, tuple] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, sp = state["n"], x.shape[1], x.shape[2:]
        b = x.shape[0] // n
        state["max_bytes"] = max(state["max_bytes"], x.numel() * x.element_size() // n)
        if n not in per_n:
            per_n[n] = (
                None if m.weight is None else m.weight.repeat(n),
                None if m.bias is None else m.bias.repeat(n),
                torch.zeros(n * c, dtype=m.running_mean.dtype, device=x.device),  # this call's batch means,
                torch.ones(n * c, dtype=m.running_var.dtype, device=x.device),  # and unbiased variances
            )
            # the sums in float32 at least: in a float16 layer's dtype, 50 batches of variance 1,311 or
            # more summed past float16's largest value (65,504) and the running variance became inf
            sum_dtype = torch.promote_types(m.running_var.dtype, torch.float32)
            sums[m][n] = [torch.zeros(n * c, dtype=sum_dtype, device=x.device),
                          torch.zeros(n * c, dtype=sum_dtype, device=x.device), 0]  # fmt: skip
        w, bias, rm, rv = per_n[n]
        folded = x.reshape(n, b, c, *sp).transpose(0, 1).reshape(b, n * c, *sp)
        # momentum 1: rm and rv become this call's statistics (1 * new + 0 * old, exactly)
        y = F.batch_norm(folded, rm, rv, w, bias, True, 1.0, m.eps)
        acc = sums[m][n]
        acc[0].add_(rm)
        acc[1].add_(rv)
        acc[2] += n
        out = y.reshape(b, n, c, *sp).transpose(0, 1).reshape(x.shape)
        for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if x.dim() == dims and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
                out = out.contiguous(memory_format=fmt)
        return out

    return forward


def _model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """A batch's input on ``device``, in the model's floating ``dtype`` (:func:`~wavesweep.evaluate.input_dtype`:
    a float16 or bfloat16 model gets its float32 batches rounded to its dtype, as in evaluation)."""
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        return x.to(device, dtype, non_blocking=True)
    return x.to(device, non_blocking=True)


def _grouped(batches, group: int, device: torch.device, dtype: torch.dtype | None = None) -> Iterator[list[torch.Tensor]]:
    """Consecutive inputs of ``batches`` on ``device`` (in ``dtype``: :func:`_model_input`) in lists
    of equal shape, each at most ``group`` long."""
    pending: list[torch.Tensor] = []
    for x, _ in batches:
        x = _model_input(x, device, dtype)
        if pending and (len(pending) == group or pending[0].shape != x.shape):
            yield pending
            pending = []
        pending.append(x)
    if pending:
        yield pending


def reestimate_bn(
    model: nn.Module, batches, *, device: torch.device | str = "cpu", group: int | None = None
) -> tuple[int, int]:
    """Re-estimate every BatchNorm layer's running mean and variance from ``batches``.

    The statistics are reset and recomputed as the cumulative (arithmetic) average of the
    per-batch mean and unbiased variance of each layer's input over the batches (PyTorch's
    ``momentum=None``), with only the BatchNorm layers in train mode and no gradients. The
    mode of every module and each layer's momentum are restored. Returns ``(layers, batches used)``;
    ``(0, 0)`` for a model without BatchNorm (nothing is consumed from ``batches``).

    ``group``: training batches per forward pass. 1: one forward pass per batch, PyTorch's own
    running-statistics update (a float16 or bfloat16 layer's per-batch statistics are instead
    summed in float32 and averaged at the end, as grouped passes do: PyTorch's update rounds the
    running average to the layer's dtype after every batch). ``n > 1``: up to ``n`` consecutive batches of equal shape go
    through the model at once, each BatchNorm layer normalising every batch by that batch's own
    statistics (:func:`_grouped_bn_forward`); the running statistics are the mean of the
    per-batch ones: the same numbers to float tolerance (tested against one pass per batch and
    against forward hooks), in fewer, larger forward passes. None (default): one pass per batch
    on CPU; on an accelerator (:func:`groups_by_default`) the first batch goes through alone and
    :func:`bn_group` of its largest BatchNorm input sets the group of the others. A model with a
    BatchNorm layer that keeps no running statistics, or whose class has its own ``forward``, is
    never grouped (``group > 1`` is an error for it). Every layer is put in train mode by setting
    its ``training`` flag (a layer whose ``train()`` keeps it in eval mode is re-estimated too); one
    whose forward keeps no statistics in train mode (normalising by its stored ones in any mode) is a
    one-line ValueError naming it.
    """
    bns = batchnorm_layers(model)
    if not bns:
        return 0, 0
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"group must be an integer >= 1 (batches per forward pass), got {group!r}")
    dev = torch.device(device)
    why = _ungroupable(model)
    if why is not None and group is not None and group > 1:
        raise ValueError(f"BatchNorm re-estimation cannot group batches (group={group}): {why}")
    # a float16/bfloat16 layer's batch statistics are summed in float32 (the grouped forward, one
    # batch a pass where no grouping is asked): PyTorch's own update rounds the running average to
    # the layer's dtype after every batch (a bfloat16 variance 3.5 % off after 50 batches, 11x its own rounding)
    half = any(m.running_var is not None and m.running_var.dtype in (torch.float16, torch.bfloat16) for m in bns)
    if half and why is None and (group == 1 or (group is None and not groups_by_default(dev))):
        group = 1
        per_batch = False
    else:
        per_batch = group == 1 or (group is None and (not groups_by_default(dev) or why is not None))
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError("BatchNorm re-estimation got no batches")
    dtype = input_dtype(model)  # a float16/bfloat16 model: its batches rounded to its dtype
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode, put back after
    momenta = [m.momentum for m in bns]
    own_forward = {m: m.__dict__.get("forward") for m in bns}  # an instance-level forward, put back after
    model.to(dev)
    model.eval()
    for m in bns:
        m.reset_running_stats()
        # set, not m.train(): a layer whose train() keeps it in eval mode would normalise by the reset
        # statistics and keep them (mean 0, variance 1); the grouped passes re-estimated it
        m.training = True
    used = 0
    sums: dict = {m: {} for m in bns}  # grouped: per layer {group size: [sum of means, sum of variances, batches]}
    hooks = []
    try:
        with torch.no_grad():
            if per_batch:
                # The cumulative average (running = mean over the calls seen) as PyTorch's
                # momentum=None computes it, factor 1 / calls seen, but given as a Python float:
                # momentum=None reads it from the num_batches_tracked tensor, a host sync per
                # layer and batch (3000 per default trial, a GPU left waiting). Same numbers. Set
                # before each call, so a layer called twice in a forward pass averages both calls.
                calls = {m: 0 for m in bns}

                def set_momentum(m, args):
                    calls[m] += 1
                    m.momentum = 1.0 / float(calls[m])

                hooks = [m.register_forward_pre_hook(set_momentum) for m in bns]
                for x, _ in itertools.chain([first], stream):
                    model(_model_input(x, dev, dtype))
                    used += 1
                # a layer whose forward ignores the mode (always its stored statistics) was left with the
                # reset ones, mean 0 and variance 1, in place of its own: a one-line error instead
                # (one wait for the device for every layer's count, not one per layer)
                called = [m for m in bns if calls[m]]
                if called and bool((untouched := torch.stack([m.num_batches_tracked for m in called]).eq(0)).any()):
                    m = called[int(untouched.nonzero()[0, 0])]
                    names = {mod: name for name, mod in model.named_modules()}
                    raise ValueError(
                        f"BatchNorm re-estimation: layer {names[m]!r} ({type(m).__name__}) kept no statistics in train "
                        f"mode (its forward normalises by its stored ones in any mode), so they cannot be re-estimated; "
                        f"use recovery=none"
                    )
            else:
                state = {"n": 1, "max_bytes": 0}
                for m in bns:
                    m.forward = _grouped_bn_forward(m, state, sums)

                def run(xs: list[torch.Tensor]) -> None:
                    nonlocal used
                    state["n"] = len(xs)
                    model(torch.cat(xs) if len(xs) > 1 else xs[0])
                    used += len(xs)

                if group is None:  # the first batch alone: its largest BatchNorm input sets the group
                    run([_model_input(first[0], dev, dtype)])
                    group, rest = bn_group(state["max_bytes"]), stream
                else:
                    rest = itertools.chain([first], stream)
                for xs in _grouped(rest, group, dev, dtype):
                    run(xs)
    finally:
        for h in hooks:
            h.remove()
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            if own_forward[m] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own_forward[m]
        for m, training in modes:
            m.training = training
    for m, by_n in sums.items():
        calls_seen = sum(acc[2] for acc in by_n.values())
        if calls_seen:  # a layer the forward pass never reached keeps its reset statistics, as with one pass per batch
            c = m.running_mean.numel()
            m.running_mean.copy_(sum(acc[0].view(n, c).sum(0) for n, acc in by_n.items()) / calls_seen)
            m.running_var.copy_(sum(acc[1].view(n, c).sum(0) for n, acc in by_n.items()) / calls_seen)
            m.num_batches_tracked.fill_(calls_seen)
    return len(bns), used


# --------------------------------------------------------------------------- fine-tuning


class WaveletWeight(nn.Module):
    """Parametrisation ``W = IDWT(c * m)`` of one target weight: the original tensor is the
    flat coefficient vector ``c`` (``structure.n_coeffs`` entries) and ``m`` the fixed keep mask;
    dropped coefficients get no gradient and stay 0.

    The original holds ``c`` in the order :meth:`to_param` gives (``mask`` too), ``order``: where
    the transform is one matrix product (:mod:`wavesweep.dense`, an accelerator), ``"rows"``
    (each row's coefficients side by side: a step is a mask multiply and one GEMM); where the
    synthesis runs on CPU, ``"positions_major"``
    (:func:`wavesweep.wavelets_torch.to_positions_major`, the order it reads and writes without a
    transpose per step); elsewhere ``"flat"``, the coefficient order of :mod:`wavesweep.wavelets`.
    :meth:`from_param` gives that order back. Each is a permutation, so an elementwise optimizer
    takes the same steps in all.

    ``dtype``: the weight's (None: the coefficients'). The coefficients keep the dtype the
    transform ran in (float32 for a float16 or bfloat16 weight), ``W`` is cast to the weight's,
    so the layer computes in its model's dtype and keeps it after fine-tuning. ``stride``: the
    weight's (None: the transform's own, contiguous): ``W`` is laid out as the weight was, so a
    model in channels-last format (:func:`~wavesweep.evaluate.compute_layout`) keeps it in its dwt
    layers, during fine-tuning and after, as its magnitude and random copies do in theirs."""

    def __init__(self, keep: torch.Tensor, structure, dtype: torch.dtype | None = None,
                 stride: tuple[int, ...] | None = None) -> None:  # fmt: skip
        from wavesweep import filterbank, wavelets_torch

        super().__init__()
        self.structure = structure
        self.dtype = dtype
        self.stride = None if stride is None else tuple(stride)
        if wavelets_torch.uses_dense(structure, keep.device):
            self.order = "rows"
        elif structure.level > 0 and filterbank.synthesis_backend(keep.device) == "gemm":
            self.order = "positions_major"
        else:
            self.order = "flat"
        self.register_buffer("mask", self.to_param(keep.to(torch.bool)), persistent=False)
        self._scale: torch.Tensor | None = None  # the mask as 0/1 in the coefficients' dtype, made once

    @property
    def positions_major(self) -> bool:
        return self.order == "positions_major"

    def to_param(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat coefficients (or a mask), coefficient order -> the original's order (a copy)."""
        from wavesweep import dense, wavelets_torch

        if self.order == "rows":
            return dense.to_rows(flat, self.structure).reshape(-1)
        return wavelets_torch.to_positions_major(flat, self.structure) if self.positions_major else flat.clone()

    def from_param(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_param` (a copy)."""
        from wavesweep import dense, wavelets_torch

        if self.order == "rows":
            # explicit row length (never -1): a layer without rows (a Linear of 0 outputs) has 0 of them
            rows = flat.reshape(dense.rows_of(self.structure), sum(dense.row_sizes(self.structure)))
            return dense.from_rows(rows, self.structure)
        return wavelets_torch.from_positions_major(flat, self.structure) if self.positions_major else flat.clone()

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        from wavesweep import dense, wavelets_torch

        s = self._scale
        if s is None or s.dtype != coeffs.dtype or s.device != coeffs.device:
            s = self._scale = self.mask.to(device=coeffs.device, dtype=coeffs.dtype)
        if self.order == "rows":
            w = dense.reconstruct(coeffs, self.structure, keep=s, rows=True)
        else:
            w = wavelets_torch.reconstruct(coeffs, self.structure, keep=s, positions_major=self.positions_major)
        w = w.to(self.dtype or coeffs.dtype)
        if self.stride is not None and w.stride() != self.stride:  # the weight's layout (one copy, differentiable)
            w = torch.empty_strided(w.shape, self.stride, dtype=w.dtype, device=w.device).copy_(w)
        return w


def _dense_stride(w: torch.Tensor) -> tuple[int, ...] | None:
    """``w``'s stride where ``w`` is dense in a memory format (contiguous, channels-last), else None."""
    formats = [torch.contiguous_format] + {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(w.dim(), [])
    return w.stride() if any(w.is_contiguous(memory_format=f) for f in formats) else None


def _modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


class _TiedWeight(nn.Module):
    """Parametrisation of another module's hold on a dwt layer's weight (an embedding tied to an
    output Linear): it reads the layer's own ``W = IDWT(c * m)``. The parametrised tensor is the
    coefficient vector itself (the layer's original), so without it the other module would
    compute with the coefficients as its weight during fine-tuning."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._layer = [layer]  # in a list: not a submodule (no second path to the layer's parameters)

    def forward(self, _coeffs: torch.Tensor) -> torch.Tensor:
        return self._layer[0].weight


def _holders(model: nn.Module, param: torch.Tensor, owner: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(module, name)`` of ``model`` but ``(owner, "weight")`` that holds ``param`` itself (tied weights)."""
    return [(mod, name) for mod in model.modules() for name, p in mod._parameters.items()
            if p is param and not (mod is owner and name == "weight")]  # fmt: skip


def _optimizer(params, settings: RecoverySettings) -> torch.optim.Optimizer:
    # No weight decay: it would act on coefficients for dwt and on weights for the others.
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=0.0)


def _torch_dtype(lp) -> torch.dtype:
    """The torch dtype of a dwt layer's recorded coefficients (no copy to the host)."""
    t = lp.device_record("coeffs")
    return t.dtype if t is not None else torch.from_numpy(np.empty(0, dtype=lp.coeffs.dtype)).dtype


def finetune(
    result: PruneResult,
    batches,
    settings: RecoverySettings,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[int, float]:
    """Fine-tune ``result.model`` in place on ``batches`` with its pruning held exactly.

    See the module docstring. For dwt the layers' ``coeffs`` are replaced by the fine-tuned
    kept coefficients (zeros where dropped, dtype unchanged) and the weights by their inverse
    DWT; another module tied to a dwt layer's weight (an embedding shared with an output Linear)
    reads that inverse DWT too, and shares the weight again afterwards. Returns ``(steps taken,
    last training loss)``; the model ends in eval mode. A NaN or infinite training loss (on CPU the
    loop stops there; on an accelerator it is found after the last step, without a sync per step)
    or parameter after the last step raises :class:`FinetuneDiverged`.
    """
    model = result.model
    model.to(device)
    # its float32 batches rounded to a float16/bfloat16 model's dtype, as in evaluation; read before
    # dwt's layers are parametrised (their coefficients, float32, would be the first parameter)
    dtype = input_dtype(model)
    modules = _modules_by_name(model)
    dev = torch.device(device)
    masked: list[tuple[nn.Parameter, torch.Tensor]] = []  # magnitude/random: (weight, bool keep)
    dwt_layers = []
    tied: list[tuple[nn.Module, str, list[str]]] = []  # (module, name, its parameter order): ties to a dwt weight
    for lp in result.layers:
        m = modules[lp.name]
        # the record where it lives (the device: no round trip), else host -> device without
        # waiting for the device (a blocking copy synchronises, per tensor)
        if lp.has_coeffs:  # dwt: train the kept coefficients
            keep, coeffs = lp.tensor("keep", dev), lp.tensor("coeffs", dev)
            order = list(m._parameters)  # removing the parametrisation re-adds weight last: keep the order
            holders = [(mod, name, list(mod._parameters)) for mod, name in _holders(model, m.weight, m)]
            ww = WaveletWeight(keep, lp.structure, dtype=m.weight.dtype, stride=_dense_stride(m.weight))
            parametrize.register_parametrization(m, "weight", ww, unsafe=True)
            orig = m.parametrizations.weight.original
            with torch.no_grad():
                orig.data = ww.to_param(coeffs)
            dwt_layers.append((lp, m, ww.mask, order))  # the keep mask in the original's order
            for mod, name, mod_order in holders:  # a module tied to this weight reads W too, not the coefficients
                parametrize.register_parametrization(mod, name, _TiedWeight(m), unsafe=True)
                tied.append((mod, name, mod_order))
        else:
            keep = lp.tensor("keep", dev).reshape(m.weight.shape)
            masked.append((m.weight, keep))
    # a frozen weight (requires_grad False) gets no gradient to mask and takes no step, as a frozen dwt
    # layer's coefficients (a hook on it raised "cannot register a hook on a tensor that doesn't require gradient")
    hooks = [w.register_hook(lambda g, k=k: g * k) for w, k in masked if w.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # A half-precision parameter (float16, bfloat16) steps in a float32 copy of itself, its master,
    # written back in its own dtype after each step: in float16 AdamW's eps (1e-8) is 0, so every
    # zero gradient (a pruned weight's, a dead unit's) gave 0/0 = NaN, and in either dtype an update
    # below half the spacing of the weight's values was lost. (dwt's coefficients are float32 already.)
    masters = [(p, p.detach().float().requires_grad_()) for p in trainable if p.dtype in (torch.float16, torch.bfloat16)]
    master_of = {id(p): m for p, m in masters}
    opt = _optimizer([master_of.get(id(p), p) for p in trainable], settings)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps) if settings.schedule == "cosine" else None
    model.train()
    losses = []
    steps = 0
    # Every method's fine-tuning starts from the same random state (dropout masks, any other
    # randomness in the model's forward): torch's generators seeded with settings.seed inside a
    # fork, so the caller's random state is left as it was.
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            _manual_seed(settings.seed, dev)
            for x, y in tqdm(batches, total=settings.steps, desc=f"finetune {result.method}", leave=False,
                             disable=not progress):  # fmt: skip
                loss = F.cross_entropy(model(_model_input(x, dev, dtype)), y.to(dev, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, m in masters:  # the gradient (masked by the hooks) to the master
                    m.grad, p.grad = (None if p.grad is None else p.grad.float()), None
                opt.step()
                if sched is not None:
                    sched.step()
                with torch.no_grad():
                    for w, k in masked:
                        master_of.get(id(w), w).masked_fill_(~k, 0)  # exactly +0.0 where pruned
                    for p, m in masters:
                        p.copy_(m)  # +0.0 stays +0.0
                    for _, m, k, _ in dwt_layers:
                        m.parametrizations.weight.original.masked_fill_(~k, 0)
                losses.append(loss.detach())
                steps += 1
                if dev.type == "cpu" and not torch.isfinite(loss):  # no device to wait for: stop at once
                    break
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():  # the fine-tuned coefficients, in the record's dtype
            tuned = [m.parametrizations.weight[0].from_param(m.parametrizations.weight.original.detach())
                     .to(_torch_dtype(lp)) for lp, m, _, _ in dwt_layers]  # fmt: skip (from_param: a copy)
        # to the record: left on the device (copied to the host in one transfer when the
        # checkpoint reads them); on CPU an array each
        defer_host_copy([lp for lp, _, _, _ in dwt_layers], [{"coeffs": c} for c in tuned])
        for mod, name, _ in tied:  # the tie back as it was: the layer's original, which becomes W below
            parametrize.remove_parametrizations(mod, name, leave_parametrized=False)
        for lp, m, _, order in dwt_layers:
            # the original (the same Parameter) becomes W in the weight's dtype: leave_parametrized=True
            # would set_() it, which cannot change its dtype (a bfloat16 weight, float32 coefficients)
            with torch.no_grad():
                w = m.weight
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight.data = w
        for m, order in [(m, order) for _, m, _, order in dwt_layers] + [(mod, order) for mod, _, order in tied]:
            for name in order:  # state-dict order as before fine-tuning
                m._parameters[name] = m._parameters.pop(name)
        model.eval()
    _check_finite(result, losses, settings)
    return steps, float(losses[-1]) if losses else float("nan")


def _check_finite(result: PruneResult, losses: list[torch.Tensor], settings: RecoverySettings) -> None:
    """:class:`FinetuneDiverged` at the first step whose training loss is NaN or infinite, else when
    a parameter is NaN or infinite after the last step (one host sync each when all is finite)."""
    remedy = f"lower finetune_lr (it is {settings.lr:g}, optimizer {settings.optimizer})"
    if losses:
        finite = torch.isfinite(torch.stack(losses))
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0, 0])
            raise FinetuneDiverged(f"{result.method}: fine-tuning diverged at step {k + 1} of {settings.steps} "
                                   f"(training loss {float(losses[k])}); {remedy}")  # fmt: skip
    params = [(n, p) for n, p in result.model.named_parameters() if p.is_floating_point()]
    if params:
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(p).all().to(params[0][1].device) for _, p in params])
        if not bool(ok.all()):
            name = next(n for (n, _), good in zip(params, ok.tolist()) if not good)
            raise FinetuneDiverged(f"{result.method}: fine-tuning diverged: parameter {name!r} is NaN or infinite after "
                                   f"step {len(losses)} of {settings.steps}; {remedy}")  # fmt: skip


# --------------------------------------------------------------------------- one entry point


def _manual_seed(seed: int, dev: torch.device) -> None:
    """Seed torch's CPU generator and ``dev``'s (a CUDA device's), the ones a ``fork_rng(devices=[dev])``
    saves and puts back. Not ``torch.manual_seed``: it seeds every CUDA device (and, before CUDA is
    initialised, queues that for later), so on a multi-GPU host the caller's random state on the
    other devices was left changed. The same draws on the trial's devices as ``torch.manual_seed``."""
    torch.default_generator.manual_seed(seed)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.manual_seed(seed)


def _sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA; elsewhere nothing is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recover(
    result: PruneResult,
    train_set: Dataset | None,
    settings: RecoverySettings,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> RecoveryReport:
    """Apply ``settings.recovery`` to ``result.model`` in place; return what was done.

    ``train_set`` is the *training* split (never the evaluation examples). Raises a one-line
    ``ValueError`` when a recovery that needs training data has none.
    """
    report = RecoveryReport(settings.recovery)
    if settings.recovery == "none":
        return report
    if train_set is None:
        raise ValueError(
            f"recovery={settings.recovery!r} needs the dataset's training split, which is not available "
            f"(e.g. an ImageNet validation folder alone); use recovery=none or a dataset with a train split"
        )
    dev = torch.device(device)
    if isinstance(train_set, TensorImages):
        # the split's one copy to the device (cached on the dataset, shared by the three methods)
        # before the clock: inside it, only the first method recovered (dwt) would count it
        train_set = train_set.to(dev)
    # The clock counts this model's recovery and nothing else: on CUDA the kernels run after they
    # are queued, so it starts once the device has finished what was queued before (another
    # method's work) and stops once it has finished this recovery (the BatchNorm re-estimation
    # never waits for the device: without the sync its time would be the time to queue it).
    _sync(dev)
    t0 = time.perf_counter()
    bns = batchnorm_layers(result.model)
    # Every method's recovery sees the same batches: a training split's random transforms
    # (imagefolder's flips) are seeded per example by training_batches (its seed and the example's
    # position), whatever the worker count. The global generators are seeded too, inside a fork (the
    # caller's random state is left as it was), for anything else that might draw from them.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), one_value_per_channel(
            "recovery_batch_size", settings.batch_size, result.model, examples=None if train_set is None else len(train_set)):
        if settings.recovery == "finetune":
            # Fine-tuning trains BatchNorm layers in train mode: their running statistics become an
            # exponential average of its last batches, under weights that were still changing. So
            # the re-estimation comes after it, on the final weights (before it, it would be
            # overwritten). Its own stream (seed + 1): not the re-estimation's batches.
            _manual_seed(settings.seed + 1, dev)
            batches = training_batches(train_set, batch_size=settings.batch_size, n=settings.steps,
                                       seed=settings.seed + 1, device=device)  # fmt: skip
            report.finetune_steps, report.final_train_loss = finetune(
                result, batches, settings, device=device, progress=progress
            )
        if bns:
            _manual_seed(settings.seed, dev)
            n = min(settings.batches, epoch_batches(len(train_set), settings.batch_size))  # one pass at most
            batches = training_batches(train_set, batch_size=settings.batch_size, n=n, seed=settings.seed, device=device)
            report.bn_layers, report.bn_batches = reestimate_bn(result.model, batches, device=device)
        else:  # a BatchNorm layer without running statistics normalises by each batch's own: nothing to re-estimate
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
            what = "BatchNorm layers that keep running statistics" if has_bn else "BatchNorm layers"
            report.note = f"{type(result.model).__name__} has no {what}: BatchNorm re-estimation skipped"
    _sync(dev)
    report.seconds = time.perf_counter() - t0
    return report
