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
* ``finetune``: ``bn``, then :func:`finetune`: ``steps`` optimizer steps of cross-entropy on
  training batches with each method's pruning held exactly. magnitude/random: the gradient of
  every zeroed weight is masked and the weight is written back to +0.0 after each step, so it
  stays bitwise +0.0. dwt: each target weight is parametrised as ``W = IDWT(c * m)``
  (:mod:`wavesweep.wavelets_torch`, in the layer's own layout, wavelet, mode and effective
  level) and only the kept coefficients ``c[m]`` train; the coefficient mask, coefficient
  sparsity and stored bytes do not change and the result's ``coeffs`` become the fine-tuned
  ones (so the compressed checkpoint stores them). Parameters that are not pruned (biases,
  BatchNorm affine, the classifier) train the same way for all three methods.

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
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from wavesweep.data import TensorImages
from wavesweep.pruning import PruneResult
from wavesweep.names import check_choice

log = logging.getLogger(__name__)

RECOVERIES: tuple[str, ...] = ("none", "bn", "finetune")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")

__all__ = [
    "RECOVERIES",
    "OPTIMIZERS",
    "SCHEDULES",
    "RecoverySettings",
    "RecoveryReport",
    "batchnorm_layers",
    "training_batches",
    "BN_GROUP_ELEMENTS",
    "bn_group",
    "reestimate_bn",
    "finetune",
    "recover",
]


@dataclass(frozen=True)
class RecoverySettings:
    """How a pruned model is recovered; identical for every method of a trial.

    ``batches``: BatchNorm re-estimation batches. ``steps``: fine-tuning optimizer steps.
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
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"finetune_lr={self.lr!r} must be a number > 0")


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


def training_batches(
    dataset: Dataset, *, batch_size: int, n: int, seed: int = 0, num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches ``(x, y)`` of a seeded stream over ``dataset``: a pure function
    of its arguments, so every method of a trial sees the same examples in the same order.

    Each epoch is a new permutation from one ``torch.Generator`` seeded with ``seed``; only
    full batches of ``batch_size`` are used (a BatchNorm layer in train mode cannot take a
    batch whose spatial output is one value per channel), unless the dataset is smaller than
    one batch, in which case each batch is the whole permuted dataset. An in-memory
    :class:`~wavesweep.data.TensorImages` is moved to ``device`` once and its batches are sliced
    and normalised there; other datasets yield CPU batches.
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
    if isinstance(dataset, TensorImages):  # on the device: one gather + normalisation per batch
        on_device = dataset.to(device)
        for _ in range(n):
            yield on_device.batch(next(indices))
        return
    if isinstance(dataset, TensorDataset):  # one indexing op per batch
        for _ in range(n):
            idx = next(indices)
            x, y = dataset[idx]
            yield x, torch.as_tensor(y)
        return
    order = [next(indices).tolist() for _ in range(n)]
    loader = DataLoader(dataset, batch_sampler=order, num_workers=num_workers)
    for x, y in loader:
        yield x, torch.as_tensor(y)


# --------------------------------------------------------------------------- BatchNorm


#: Grouped re-estimation (:func:`reestimate_bn` on an accelerator): at most this many input
#: elements per forward pass. A 64-batch of digits (8 px) has 4,096, so a default trial's 50
#: batches go through in one pass; 28 px: 50,176 (20 per pass); CIFAR's 32 px RGB: 196,608
#: (5); 224 px: 9.6 M (one: such a batch is work enough for a GPU). A stem that keeps the
#: resolution at 64 channels makes at most 256 MiB float32 activations of it.
BN_GROUP_ELEMENTS = 1 << 20


def bn_group(batch_shape: tuple[int, ...], device: torch.device | str) -> int:
    """How many training batches of ``batch_shape`` :func:`reestimate_bn` folds into one forward
    pass by default: 1 on CPU (compute-bound: grouping measured 0.84-1.19x there,
    ``bench/bench_recovery.py``); on an accelerator, where the small batches of a default trial
    leave the device waiting on kernel launches, as many as fit :data:`BN_GROUP_ELEMENTS`."""
    if torch.device(device).type == "cpu":
        return 1
    return max(1, BN_GROUP_ELEMENTS // max(1, math.prod(batch_shape)))


def _grouped_bn_forward(m: nn.modules.batchnorm._BatchNorm, state: dict, sums: dict):
    """A replacement ``forward`` for BatchNorm layer ``m`` while ``state["n"]`` batches of equal
    size go through the model as one: the group is folded into the channels
    (``(n*B, C, ...) -> (B, n*C, ...)``), so one ``F.batch_norm`` in train mode normalises every
    batch by its own mean and biased variance, exactly what ``n`` separate forward passes do (every
    other layer is in eval mode and acts per example). Each batch's mean and unbiased variance
    (what PyTorch's running statistics take) are added up in ``sums[m][n]``, per group size;
    the repeated affine parameters are made once per group size. Per call: the fold, the
    normalisation, two additions and the unfold, whatever ``n``."""
    per_n: dict[int, tuple] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, sp = state["n"], x.shape[1], x.shape[2:]
        b = x.shape[0] // n
        if n not in per_n:
            per_n[n] = (
                None if m.weight is None else m.weight.repeat(n),
                None if m.bias is None else m.bias.repeat(n),
                torch.zeros(n * c, dtype=m.running_mean.dtype, device=x.device),  # this call's batch means,
                torch.ones(n * c, dtype=m.running_var.dtype, device=x.device),  # and unbiased variances
            )
            sums[m][n] = [torch.zeros(n * c, dtype=m.running_mean.dtype, device=x.device),
                          torch.zeros(n * c, dtype=m.running_var.dtype, device=x.device), 0]  # fmt: skip
        w, bias, rm, rv = per_n[n]
        folded = x.reshape(n, b, c, *sp).transpose(0, 1).reshape(b, n * c, *sp)
        # momentum 1: rm and rv become this call's statistics (1 * new + 0 * old, exactly)
        y = F.batch_norm(folded, rm, rv, w, bias, True, 1.0, m.eps)
        acc = sums[m][n]
        acc[0].add_(rm)
        acc[1].add_(rv)
        acc[2] += n
        out = y.reshape(b, n, c, *sp).transpose(0, 1).reshape(x.shape)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    return forward


def _grouped(batches, group: int, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """Consecutive inputs of ``batches`` on ``device`` in lists of equal shape, each at most ``group`` long."""
    pending: list[torch.Tensor] = []
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
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
    model's mode and each layer's momentum are restored. Returns ``(layers, batches used)``;
    ``(0, 0)`` for a model without BatchNorm (nothing is consumed from ``batches``).

    ``group``: training batches per forward pass. 1: one forward pass per batch, PyTorch's own
    running-statistics update. ``n > 1``: up to ``n`` consecutive batches of equal shape go
    through the model at once, each BatchNorm layer normalising every batch by that batch's own
    statistics (:func:`_grouped_bn_forward`); the running statistics are the mean of the
    per-batch ones: the same numbers to float tolerance (tested against one pass per batch and
    against forward hooks), in fewer, larger forward passes. None (default): :func:`bn_group`,
    1 on CPU.
    """
    bns = batchnorm_layers(model)
    if not bns:
        return 0, 0
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"group must be an integer >= 1 (batches per forward pass), got {group!r}")
    dev = torch.device(device)
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError("BatchNorm re-estimation got no batches")
    stream = itertools.chain([first], stream)
    if group is None:
        group = bn_group(tuple(first[0].shape), dev)
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.to(dev)
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    used = 0
    sums: dict = {}
    own_forward = {m: m.__dict__.get("forward") for m in bns}  # an instance-level forward, put back after
    try:
        with torch.no_grad():
            if group == 1:
                for x, _ in stream:
                    # The cumulative average (running = mean over the batches seen) as PyTorch's
                    # momentum=None computes it, factor 1 / batches seen, but given as a Python float:
                    # momentum=None reads it from the num_batches_tracked tensor, a host sync per
                    # layer and batch (3000 per default trial, a GPU left waiting). Same numbers.
                    for m in bns:
                        m.momentum = 1.0 / float(used + 1)
                    model(x.to(dev, non_blocking=True))
                    used += 1
            else:
                state = {"n": 1}
                sums = {m: {} for m in bns}  # per layer: {group size: [sum of means, sum of variances, batches]}
                for m in bns:
                    m.forward = _grouped_bn_forward(m, state, sums)
                for xs in _grouped(stream, group, dev):
                    state["n"] = len(xs)
                    model(torch.cat(xs) if len(xs) > 1 else xs[0])
                    used += len(xs)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            if own_forward[m] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own_forward[m]
        model.train(was_training)
    for m, by_n in sums.items():
        calls = sum(acc[2] for acc in by_n.values())
        if calls:  # a layer the forward pass never reached keeps its reset statistics, as with one pass per batch
            c = m.running_mean.numel()
            m.running_mean.copy_(sum(acc[0].view(n, c).sum(0) for n, acc in by_n.items()) / calls)
            m.running_var.copy_(sum(acc[1].view(n, c).sum(0) for n, acc in by_n.items()) / calls)
            m.num_batches_tracked.fill_(calls)
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
    takes the same steps in all."""

    def __init__(self, keep: torch.Tensor, structure) -> None:
        from wavesweep import filterbank, wavelets_torch

        super().__init__()
        self.structure = structure
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
            return dense.from_rows(flat.reshape(dense.rows_of(self.structure), -1), self.structure)
        return wavelets_torch.from_positions_major(flat, self.structure) if self.positions_major else flat.clone()

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        from wavesweep import dense, wavelets_torch

        s = self._scale
        if s is None or s.dtype != coeffs.dtype or s.device != coeffs.device:
            s = self._scale = self.mask.to(device=coeffs.device, dtype=coeffs.dtype)
        if self.order == "rows":
            return dense.reconstruct(coeffs, self.structure, keep=s, rows=True).to(coeffs.dtype)
        return wavelets_torch.reconstruct(coeffs, self.structure, keep=s, positions_major=self.positions_major)


def _modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _optimizer(params, settings: RecoverySettings) -> torch.optim.Optimizer:
    # No weight decay: it would act on coefficients for dwt and on weights for the others.
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=0.0)


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
    DWT. Returns ``(steps taken, last training loss)``; the model ends in eval mode.
    """
    model = result.model
    model.to(device)
    modules = _modules_by_name(model)
    dev = torch.device(device)
    masked: list[tuple[nn.Parameter, torch.Tensor]] = []  # magnitude/random: (weight, bool keep)
    dwt_layers = []
    for lp in result.layers:
        m = modules[lp.name]
        if lp.coeffs is not None:  # dwt: train the kept coefficients
            keep = torch.from_numpy(np.asarray(lp.keep, dtype=bool)).to(dev)
            coeffs = torch.from_numpy(np.ascontiguousarray(lp.coeffs)).to(dev)
            order = list(m._parameters)  # removing the parametrisation re-adds weight last: keep the order
            ww = WaveletWeight(keep, lp.structure)
            parametrize.register_parametrization(m, "weight", ww, unsafe=True)
            orig = m.parametrizations.weight.original
            with torch.no_grad():
                orig.data = ww.to_param(coeffs)
            dwt_layers.append((lp, m, ww.mask, order))  # the keep mask in the original's order
        else:
            keep = torch.from_numpy(np.asarray(lp.keep, dtype=bool)).reshape(m.weight.shape).to(dev)
            masked.append((m.weight, keep))
    hooks = [w.register_hook(lambda g, k=k: g * k) for w, k in masked]
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], settings)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps) if settings.schedule == "cosine" else None
    model.train()
    losses = []
    steps = 0
    # Every method's fine-tuning starts from the same random state (dropout masks, any other
    # randomness in the model's forward): torch's generators seeded with settings.seed inside a
    # fork, so the caller's random state is left as it was.
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            for x, y in tqdm(batches, total=settings.steps, desc=f"finetune {result.method}", leave=False,
                             disable=not progress):  # fmt: skip
                loss = F.cross_entropy(model(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                with torch.no_grad():
                    for w, k in masked:
                        w.masked_fill_(~k, 0)  # exactly +0.0 where pruned
                    for _, m, k, _ in dwt_layers:
                        m.parametrizations.weight.original.masked_fill_(~k, 0)
                losses.append(loss.detach())
                steps += 1
    finally:
        for h in hooks:
            h.remove()
        for lp, m, _, order in dwt_layers:
            with torch.no_grad():
                c = m.parametrizations.weight[0].from_param(m.parametrizations.weight.original.detach())
                lp.coeffs = c.cpu().numpy().astype(lp.coeffs.dtype, copy=True)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            for name in order:  # state-dict order as before fine-tuning
                m._parameters[name] = m._parameters.pop(name)
        model.eval()
    return steps, float(losses[-1]) if losses else float("nan")


# --------------------------------------------------------------------------- one entry point


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
    t0 = time.perf_counter()
    bns = batchnorm_layers(result.model)
    if bns:
        batches = training_batches(train_set, batch_size=settings.batch_size, n=settings.batches, seed=settings.seed,
                                   device=device)  # fmt: skip
        report.bn_layers, report.bn_batches = reestimate_bn(result.model, batches, device=device)
    else:
        report.note = f"{type(result.model).__name__} has no BatchNorm layers: BatchNorm re-estimation skipped"
    if settings.recovery == "finetune":
        # a second stream (seed + 1) so fine-tuning does not start on the re-estimation batches
        batches = training_batches(train_set, batch_size=settings.batch_size, n=settings.steps, seed=settings.seed + 1,
                                   device=device)  # fmt: skip
        report.finetune_steps, report.final_train_loss = finetune(
            result, batches, settings, device=device, progress=progress
        )
    report.seconds = time.perf_counter() - t0
    return report
