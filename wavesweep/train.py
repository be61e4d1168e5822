"""Base models: pretrained (ResNet-18 on ImageNet), from a checkpoint file, or trained here
once and cached, keyed by (model, dataset, seed, training config).

Cache files are written to a temporary name and renamed when complete, under an fcntl
file lock, so several processes asking for the same base model train it once and never
see a half-written file. MLflow model URIs are resolved by ``wavesweep.tracking``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import json
import logging
import math
import numbers
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from wavesweep.config import PRETRAINED_BASES
from wavesweep.data import (DatasetBundle, TensorImages, data_fingerprint, dataset_shape, load_dataset, loader_position,
                            make_loader, set_loader_position, stopping_workers)
from wavesweep.evaluate import evaluate, resolve_device
from wavesweep.models import (
    MODELS,
    build_loaded,
    build_model,
    check_num_classes,
    load_pretrained_resnet18,
    read_weights,
    resnet18_imagenet_path,
    weights_file,
)
from wavesweep.failures import one_value_per_channel
from wavesweep.fileio import atomic_write, file_lock
from wavesweep import store
from wavesweep.names import check_choice


log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
#: autocast dtype while training: auto = bf16 on a CUDA device with native bf16, else off
AMPS = ("auto", "bf16", "off")
#: memory format of 4-D weights and inputs while training: auto = on for CUDA, off on CPU
CHANNELS_LAST = ("auto", "on", "off")
#: the training step as one CUDA graph (AdamW on CUDA only; see TrainConfig and train_model)
CUDA_GRAPHS = ("auto", "off", "on")
#: TrainConfig.momentum's default: the only value accepted where nothing reads it (adamw; sgd with onecycle)
MOMENTUM = 0.9
#: eager steps (real ones, on a side stream) before the training step is captured, as PyTorch's
#: "whole-network capture" recipe does: lazy initialisation (optimizer state, cuDNN, cuBLAS) first
GRAPH_WARMUP_STEPS = 3
#: the running loss is read from the device (a host sync on CUDA) once per this many steps
LOSS_READ_EVERY = 50
#: a training given a resume file saves its state there at the end of an epoch once this many
#: seconds have passed since it started or last saved (ResNet-18 with AdamW: a 135 MB file)
RESUME_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class TrainConfig:
    """How a base model is trained. ``lr`` is the peak learning rate (onecycle) or the
    initial one (cosine, constant). ``optimizer``: ``adamw`` (PyTorch's AdamW) or ``sgd`` (SGD
    with Nesterov momentum ``momentum``, in (0, 1)). ``seed`` seeds weights init and data order; the
    ``seed`` of :func:`get_base_model` replaces it (and also picks the data split).

    ``amp`` (auto, bf16, off) and ``channels_last`` (auto, on, off) are accelerator settings;
    ``auto`` means bf16 autocast and channels-last on CUDA, neither on CPU: CPU training stays
    float32 and bit-identical to training before these settings existed (same weights, same
    cache keys); most CPUs have no native bf16 (set ``amp="bf16"`` explicitly on one that has).
    :meth:`resolved` turns them into what runs on a device; the trained model is always
    returned in float32, contiguous format.

    ``cuda_graphs`` (auto, off, on): each full-size training step (forward, loss, backward,
    AdamW step) captured once as a CUDA graph and replayed, so the host launches one graph
    instead of hundreds of kernels a step (see :func:`train_model`). CUDA and AdamW only:
    ``auto`` is on for AdamW on a CUDA device, off elsewhere (so CPU training and its cache keys
    are unchanged). A captured step reads its learning rate from a tensor the schedule fills, but
    AdamW's betas are floats baked into the graph (PyTorch's tensor betas convert to a number, a
    host sync, inside the step): so graphed training holds beta1 at 0.9 where OneCycleLR would
    cycle it between 0.95 and 0.85. A different recipe, hence its own cache key. Measured on an
    H200 (2026-11-27, ``bench/bench_train.py --recipe``): ResNet-18's 10 Fashion-MNIST epochs in
    25.3 s against 90.5 s eager, test top-1 0.9412 against 0.9402."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    momentum: float = MOMENTUM  # sgd with schedule cosine or constant only (onecycle cycles it: 0.95 -> 0.85 -> 0.95)
    label_smoothing: float = 0.0
    seed: int = 0
    amp: str = "auto"
    channels_last: str = "auto"
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        # ints and bools first: True is an int to Python, and 1 and 1.0 must be one config (one cache key)
        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))  # a NumPy integer too: JSON (the cache key) takes ints
        for name in ("lr", "weight_decay", "momentum", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # lr=1 and lr=1.0 train the same weights: one key
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("amp", self.amp, AMPS)
        check_choice("channels_last", self.channels_last, CHANNELS_LAST)
        check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        if self.cuda_graphs == "on" and self.optimizer != "adamw":
            raise ValueError(f"cuda_graphs='on' needs optimizer 'adamw' (its capturable form), got optimizer {self.optimizer!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        # a momentum nothing reads would be recorded (train_info, the cache key) as if it had trained
        if self.momentum != MOMENTUM and self.optimizer != "sgd":
            raise ValueError(f"momentum={self.momentum!r} is used by optimizer 'sgd' only, not {self.optimizer!r}; "
                             f"valid: optimizer='sgd', or momentum={MOMENTUM}")  # fmt: skip
        if self.momentum != MOMENTUM and self.schedule == "onecycle":
            raise ValueError(f"momentum={self.momentum!r} is not used with schedule 'onecycle', which cycles SGD's "
                             f"momentum from 0.95 to 0.85 and back (OneCycleLR); valid: schedule 'cosine' or "
                             f"'constant', or momentum={MOMENTUM}")  # fmt: skip
        if self.optimizer == "sgd" and not 0 < self.momentum < 1:  # Nesterov momentum (see _optimizer)
            raise ValueError(f"momentum must be in (0, 1) for optimizer 'sgd' (Nesterov momentum), got {self.momentum!r}")

    def resolved(self, device: str | torch.device = "auto") -> TrainConfig:
        """This config with ``amp`` in (bf16, off) and ``channels_last`` in (on, off) as they
        run on ``device`` (``"auto"``: CUDA when available). ``auto`` resolves to bf16 only on a
        CUDA device with native bf16 (Ampere and later; emulated bf16 is slower than float32),
        and channels-last on any CUDA device; on CPU both resolve to off. Explicit values are
        kept on every device (bf16 autocast also runs on CPU). ``cuda_graphs`` ``auto`` resolves
        to on for AdamW on a CUDA device, else off; an explicit value is kept (``on`` anywhere
        but CUDA is a ValueError in :func:`train_model`)."""
        on_cuda = _device_type(device) == "cuda"
        amp = self.amp
        if amp == "auto":
            amp = "bf16" if on_cuda and _native_cuda_bf16() else "off"
        channels_last = self.channels_last
        if channels_last == "auto":
            channels_last = "on" if on_cuda else "off"
        cuda_graphs = self.cuda_graphs
        if cuda_graphs == "auto":
            cuda_graphs = "on" if on_cuda and self.optimizer == "adamw" else "off"
        return dataclasses.replace(self, amp=amp, channels_last=channels_last, cuda_graphs=cuda_graphs)

    def digest(self, device: str | torch.device = "auto") -> str:
        """12 hex chars of sha256 over the config as sorted JSON: the cache key part.

        ``amp``, ``channels_last`` and ``cuda_graphs`` enter *resolved* for ``device`` (see
        :meth:`resolved`), so a model trained with bf16 autocast never shares a key with a float32
        one, and only when they are not off: a float32, contiguous, eager config (every default
        config on CPU) hashes exactly as configs did before these fields existed, so cached base
        models and their recorded checksums stay valid."""
        return config_digest(asdict(self.resolved(device)))


def config_digest(config: dict[str, Any]) -> str:
    """:meth:`TrainConfig.digest` of a resolved config as a dict (``asdict``, or the ``config`` a
    cached model's ``train_info`` records: an accelerator setting it lacks, from before the
    setting existed, was off)."""
    d = dict(config)
    for key in ("amp", "channels_last", "cuda_graphs"):
        if d.get(key, "off") == "off":
            d.pop(key, None)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _device_type(device: str | torch.device) -> str:
    """"cuda" or "cpu" for a device spec, without requiring the device to exist (a cache key
    may be computed where the model is only loaded); :func:`resolve_device` validates."""
    if isinstance(device, torch.device):
        return device.type
    d = str(device).strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if d.startswith("cuda") else "cpu"


def _native_cuda_bf16() -> bool:
    """Whether the current CUDA device computes bf16 natively (compute capability >= 8.0)."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation and no emulation
        return bool(torch.cuda.is_bf16_supported())


#: (model, dataset) -> default config: resnet18 >= 95 % top-1 in < 60 s, cnn >= 95 % in < 15 s on a
#: 2-core CPU (measured by bench/bench_eval.py)
_DEFAULTS: dict[tuple[str, str], TrainConfig] = {
    ("resnet18", "digits"): TrainConfig(epochs=3, batch_size=32, lr=2e-3, weight_decay=5e-4),
    ("cnn", "digits"): TrainConfig(epochs=10, batch_size=64, lr=1e-2, weight_decay=5e-4),
    ("mlp", "digits"): TrainConfig(epochs=30, batch_size=64, lr=3e-3, weight_decay=1e-4),
    # Fashion-MNIST: the small CNN in minutes on a 2-core CPU (about 0.9 top-1); ResNet-18 keeps the
    # generic 10-epoch recipe (a GPU job).
    ("cnn", "fashion-mnist"): TrainConfig(epochs=2, batch_size=128, lr=3e-3, weight_decay=5e-4),
}


def default_train_config(model_name: str, dataset_name: str) -> TrainConfig:
    """The tuned config for (model, dataset) where one exists, else a generic AdamW +
    one-cycle schedule (10 epochs) — adequate for mnist/cifar10/imagefolder starts."""
    MODELS.get(model_name)
    from wavesweep.data import DATASETS

    DATASETS.get(dataset_name)
    return _DEFAULTS.get((model_name, dataset_name), TrainConfig())


def cache_dir() -> Path:
    """Env ``WAVESWEEP_CACHE`` or ``~/.cache/wavesweep`` (:func:`wavesweep.store.cache_dir`)."""
    return store.cache_dir()


@dataclass
class BaseModel:
    """A base model ready for pruning.

    ``model``: in eval mode, on CPU. ``source``: "trained" (cached here), "pretrained"
    (ImageNet weights), "checkpoint" (a user file) or "mlflow" (an MLflow model URI, see
    ``uri``). ``path``: the weights file (for "mlflow": the state dict cached from the URI).
    ``checksum``: sha256 hex of the bytes of that weights file as stored on disk, so a
    reviewer can ``sha256sum`` it. ``build_kwargs``: num_classes, in_channels, image_size
    for :func:`wavesweep.models.build_model`. ``train_info``: test accuracy, seconds,
    epochs, config (empty for pretrained/checkpoint files without wavesweep metadata).
    ``uri``: for weights given as an MLflow URI, that URI resolved to a fixed version
    (``models:/NAME@alias`` -> ``models:/NAME/3``); empty otherwise.
    """

    model: nn.Module
    model_name: str
    dataset_name: str
    seed: int
    source: str
    path: Path
    checksum: str
    build_kwargs: dict[str, int]
    train_info: dict[str, Any] = field(default_factory=dict)
    uri: str = ""
    warnings: tuple[str, ...] = ()  # about this base for this run (a trial records them with its own)

    def skeleton(self) -> nn.Module:
        """A freshly initialised model of the same architecture (eval mode, CPU)."""
        return build_model(self.model_name, **self.build_kwargs).eval()



def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- training


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """``config``'s optimizer over ``params``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=True)


def _scheduler(opt: torch.optim.Optimizer, config: TrainConfig, steps: int, *, cycle_momentum: bool = True) -> Any:
    """``config``'s learning-rate schedule over ``steps`` optimizer steps (None: constant)."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps,
                                                   cycle_momentum=cycle_momentum)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return None


def _capturable_adamw(params, config: TrainConfig, device: torch.device, **kwargs) -> torch.optim.Optimizer:
    """AdamW whose learning rate is a tensor on ``device`` (a CUDA graph's replay reads it there;
    :class:`_ScheduleFeed` writes each step's value into it) and whose step runs without the host
    (``capturable``). Its betas stay floats: PyTorch's capturable step turns tensor betas into
    numbers (``_foreach_lerp_``'s weight, ``_foreach_pow``'s base), which waits for the device and
    breaks a capture. ``kwargs`` (tests): ``capturable``/``foreach`` for the CPU, where the
    capturable form does not run."""
    kwargs = {"capturable": True, "foreach": True, **kwargs}
    return torch.optim.AdamW(params, lr=torch.tensor(float(config.lr), device=device),
                             weight_decay=config.weight_decay, **kwargs)


class _ScheduleFeed:
    """``config``'s learning-rate schedule for an optimizer whose ``lr`` is a tensor.

    PyTorch's schedulers write floats into a param group, which a captured step never sees. So
    the schedule runs on a shadow AdamW of one CPU parameter that never has a gradient, with
    PyTorch's own scheduler (OneCycleLR without its momentum cycling: see
    :class:`TrainConfig`), and after each step its ``lr`` is written into the real optimizer's
    tensor (``fill_``: no host sync). The values are the scheduler's, step for step (test:
    against the scheduler on a plain AdamW)."""

    def __init__(self, opt: torch.optim.Optimizer, config: TrainConfig, steps: int) -> None:
        self.opt = opt
        self.shadow = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=config.lr,
                                        weight_decay=config.weight_decay)
        self.sched = _scheduler(self.shadow, config, steps, cycle_momentum=False)
        self._feed()

    def _feed(self) -> None:
        lr = self.shadow.param_groups[0]["lr"]
        for group in self.opt.param_groups:
            group["lr"].fill_(lr)

    def step(self) -> None:
        """After each optimizer step, as ``scheduler.step()`` would be called."""
        if self.sched is not None:
            self.shadow.step()  # no gradient: nothing changes, but the scheduler sees a step was taken
            self.sched.step()
            self._feed()

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (its shadow optimizer's and scheduler's state)."""
        return {"shadow": self.shadow.state_dict(), "sched": None if self.sched is None else self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to the position :meth:`state_dict` gave, and that step's ``lr`` into the optimizer."""
        self.shadow.load_state_dict(state["shadow"])
        if self.sched is not None:
            self.sched.load_state_dict(state["sched"])
        self._feed()


class _GraphedStep:
    """One training step (forward, loss, backward, optimizer step) captured as a CUDA graph,
    replayed on each full-size batch copied into its static input (PyTorch's "whole-network
    capture"). The parameters, gradients, optimizer state, BatchNorm buffers and the ``lr``
    tensor are the model's and optimizer's own, so eager steps may run in between (a
    short last batch of an epoch: its gradients are zeroed in place, not dropped)."""

    def __init__(self, graph, x, y, loss) -> None:
        self.graph, self.x, self.y, self.loss = graph, x, y, loss

    @classmethod
    def capture(cls, x: torch.Tensor, y: torch.Tensor, forward_loss, opt: torch.optim.Optimizer) -> _GraphedStep:
        """The step for batches shaped as ``(x, y)``, captured (not run: :meth:`replay` runs it).
        A model or optimizer that cannot be captured (an operation that waits for the host, say)
        is a RuntimeError naming the first error: no eager fallback, since a failed capture can
        leave the allocator feeding a private pool (seen on an H200: out of memory soon after).

        The capture is ``thread_local``: only this thread's calls are checked. In PyTorch's default
        ``global`` mode a CUDA call from any other thread breaks it, and a file dataset's DataLoader
        pins each prefetched batch in its own thread meanwhile (``cudaHostAlloc``, ``cudaEventQuery``;
        ``torch.cuda.graph`` empties the pinned-memory cache just before capturing): the capture
        would fail, or not, by the timing of that thread. That thread never touches the capture
        stream, so nothing it does belongs in the graph."""
        static_x, static_y = x.clone(), y.clone()
        opt.zero_grad(set_to_none=True)  # the graph's backward makes its own gradients, then refills them
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(x.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = forward_loss(static_x, static_y, cache_enabled=False)
                loss.backward()
                opt.step()
        except Exception as exc:  # noqa: BLE001 - any capture failure, named by its first cause
            first = exc
            while first.__context__ is not None and first.__context__ is not first:
                first = first.__context__
            text = (str(first).strip().splitlines() or [""])[0]
            raise RuntimeError(f"cuda_graphs='on': the training step could not be captured as a CUDA graph "
                               f"({type(first).__name__}: {text}); use cuda_graphs='off'") from exc
        # the static loss without its autograd graph: kept, that graph would keep the capture's
        # AccumulateGrad nodes alive, and an eager step between replays (a short last batch) would
        # feed them gradients made on another stream (PyTorch warns: a sync, seen on an H200)
        return cls(graph, static_x, static_y, loss.detach())

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on ``(x, y)``; its loss (the graph's output, valid until the next replay)."""
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss


def train_model(
    model: nn.Module,
    bundle: DatasetBundle,
    config: TrainConfig,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    resume: str | os.PathLike | None = None,
    resume_key: str = "",
) -> dict[str, Any]:
    """Train ``model`` in place on ``bundle.train`` and evaluate on ``bundle.test``.

    Deterministic for a given config on a given device: weights are initialised by the
    caller after ``torch.manual_seed(config.seed)``, the data order comes from a generator
    seeded with ``config.seed``. ``config.amp``/``config.channels_last`` are resolved for the
    device (:meth:`TrainConfig.resolved`): bf16 autocast wraps the forward pass and the loss
    (no gradient scaler: bf16 has float32's range), channels-last converts the 4-D weights
    and each 4-D input batch. Returns train_info (test_top1, test_loss, seconds, epochs,
    final train loss: an exponential moving average, device, the resolved config). The
    model ends in eval mode on CPU, float32, in contiguous memory format (checkpoints and
    state dicts have the usual layout whatever ran). Weights or buffers that end NaN or infinite
    (a diverged training) are a ValueError naming the tensor and the lr.

    ``resume``: a file that keeps the training's state between epochs (weights, optimizer and
    schedule state, the data order's generator, the random state, the running loss, the epochs
    and seconds done), written atomically at the end of an epoch once
    :data:`RESUME_EVERY_SECONDS` have passed since the last write (a write that fails, a full
    disk, is a log line: the training goes on without keeping its state). A training stopped (Ctrl-C,
    SIGTERM, a lost machine) and started again with the same file, ``resume_key``, config,
    device type and model resumes after the last saved epoch, into the same weights on CPU as
    a training never stopped (test: bit for bit). A file of another key, config or device, or
    one that cannot be read, is removed with a log line and the training starts afresh. A
    training that diverges removes the file (resumed, it would diverge again); any other error
    leaves it. The caller removes the file once the trained model is kept (:func:`get_base_model` does);
    ``train_info["resumed_at_epoch"]`` says where it resumed (0: from the start) and
    ``seconds`` counts the epochs done before the stop too.
    """
    if bundle.train is None:
        raise ValueError(f"dataset {bundle.name!r} has no train split; use pretrained weights or a checkpoint")
    check_num_classes(model, bundle.num_classes, dataset=bundle.name)
    dev = resolve_device(device)
    config = config.resolved(dev)
    if config.cuda_graphs == "on" and dev.type != "cuda":
        raise ValueError(f"cuda_graphs='on' needs a CUDA device; training runs on {dev} (use cuda_graphs='off')")
    channels_last = config.channels_last == "on"
    _seed_everything(config.seed)
    # In-memory images go to the device once; each batch is then gathered and normalised there
    # (the same order and values as on the CPU: the shuffle comes from the same CPU generator).
    train_set = bundle.train.to(dev) if isinstance(bundle.train, TensorImages) else bundle.train
    # A last batch of one example cannot train a BatchNorm layer that sees one value per channel
    # (ResNet-18's last ones, on 1x1 maps): as torchvision's recipes do with drop_last, that one
    # example is left out of each epoch (a different one each epoch; the shuffle is unchanged).
    n_train = len(train_set)
    drop_last = n_train % config.batch_size == 1 and n_train > 1 and _has_batchnorm(model)
    if drop_last:
        log.warning("training set of %d examples in batches of %d leaves a last batch of 1, which BatchNorm "
                    "cannot train on: that example is left out of each epoch",
                    n_train, config.batch_size)
    # A file dataset is decoded by worker processes (data.default_num_workers), its random
    # transforms seeded per example (config.seed, the example's position in the run): the same
    # weights whatever the worker count.
    loader = make_loader(train_set, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                         drop_last=drop_last, pin_memory=dev.type == "cuda")
    steps = len(loader) * config.epochs
    model.to(dev).train()
    if channels_last:  # before the optimizer is built: it holds the parameters as they are now
        model.to(memory_format=torch.channels_last)
    graphs = config.cuda_graphs == "on"
    if graphs:  # lr and betas live on the device, where a replayed step reads them
        opt: torch.optim.Optimizer = _capturable_adamw(model.parameters(), config, dev)
        feed: _ScheduleFeed | None = _ScheduleFeed(opt, config, steps)
        sched = None
    else:
        opt = _optimizer(model.parameters(), config)
        sched, feed = _scheduler(opt, config, steps), None
    kept_at = Path(resume) if resume is not None else None
    # the model's class and its tensors' names and shapes: another architecture of the same class
    # (an MLP of other widths) is another training, not a state to load
    shapes = hashlib.sha256(json.dumps([(k, list(v.shape)) for k, v in model.state_dict().items()]).encode()).hexdigest()[:16]
    identity = {"key": str(resume_key), "config": asdict(config), "device": dev.type,
                "model": type(model).__name__, "shapes": shapes, "steps": steps}
    saved = _read_resume(kept_at, identity) if kept_at is not None else None
    start_epoch, done_seconds = 0, 0.0
    if saved is not None:
        _restore_training(saved, model, opt, sched, feed)
        set_loader_position(loader, saved["loader"])
        torch.set_rng_state(saved["rng_cpu"])
        if dev.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], dev)
        start_epoch, done_seconds = int(saved["epoch"]), float(saved["seconds"])
        log.info("resuming the training of %s on %s after epoch %d of %d (state kept in %s)",
                 type(model).__name__, bundle.name, start_epoch, config.epochs, kept_at)

    def autocast(cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        if config.amp == "bf16":  # no weight cache while a graph is captured (PyTorch's rule)
            return torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()  # not autocast(enabled=False): exactly the float32 path

    def forward_loss(x: torch.Tensor, y: torch.Tensor, cache_enabled: bool = True) -> torch.Tensor:
        with autocast(cache_enabled):
            return F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)

    def eager_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = forward_loss(x, y)
        if graph is not None:  # the graph's gradients stay where it reads them: zeroed, not dropped
            torch._foreach_zero_([p.grad for p in model.parameters() if p.grad is not None])
        else:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()  # not its autograd graph: a capture must not meet this step's nodes

    non_blocking = dev.type == "cuda"
    if dev.type == "cuda":  # the model's copy and channels-last conversion are not training time
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    # Exponential moving average of the loss, kept on the device: ``loss.item()`` every step
    # would make the host wait for the GPU each step. Read every LOSS_READ_EVERY steps and at
    # the end of each epoch (the bar's loss updates that often).
    ema: torch.Tensor | None = None
    running = float("nan")
    step = 0
    graph: _GraphedStep | None = None
    graph_steps = 0
    if saved is not None:
        step, graph_steps, running = int(saved["step"]), int(saved["graph_steps"]), float(saved["running"])
        if saved["ema"] is not None:
            ema = torch.tensor(saved["ema"], dtype=torch.float32, device=dev)
    first_step = step  # a resumed training warms up before capturing again, as a new one does
    side = torch.cuda.Stream(dev) if graphs else None
    bar = tqdm(total=steps, initial=step, desc=f"train {type(model).__name__} on {bundle.name}", disable=not progress)
    last_save = t0
    keeping = kept_at is not None  # False once a write of the state failed
    # a file dataset's decoding workers (kept across epochs) stop with the training, or its failure
    with one_value_per_channel("batch_size", config.batch_size, model, examples=n_train), stopping_workers(loader):
        for epoch in range(start_epoch, config.epochs):
            for x, y in loader:
                x, y = x.to(dev, non_blocking=non_blocking), torch.as_tensor(y).to(dev, non_blocking=non_blocking)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                full = x.shape[0] == config.batch_size
                if graph is not None and full:
                    loss = graph.replay(x, y)
                    graph_steps += 1
                elif graphs and full and step - first_step >= GRAPH_WARMUP_STEPS:
                    loss = lv = None  # no earlier step's autograd nodes alive while capturing
                    graph = _GraphedStep.capture(x, y, forward_loss, opt)
                    loss = graph.replay(x, y)
                    graph_steps += 1
                elif graphs and graph is None:  # the warm-up: real steps, on a side stream
                    side.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(side):
                        loss = eager_step(x, y)
                    torch.cuda.current_stream(dev).wait_stream(side)
                else:  # CPU, graphs off, or a short last batch of an epoch
                    loss = eager_step(x, y)
                if sched is not None:
                    sched.step()
                if feed is not None:
                    feed.step()
                lv = loss.detach().float()
                ema = lv.clone() if ema is None else ema.mul_(0.9).add_(lv, alpha=0.1)
                step += 1
                bar.update(1)
                if step % LOSS_READ_EVERY == 0:
                    running = ema.item()
                    bar.set_postfix(epoch=epoch + 1, loss=f"{running:.3f}", refresh=False)
            if ema is not None:
                running = ema.item()
                bar.set_postfix(epoch=epoch + 1, loss=f"{running:.3f}", refresh=False)
            now = time.perf_counter()
            if not progress:  # no bar (a study's trials): one line an epoch, so a long training is seen to advance
                left = (now - t0) / (epoch + 1 - start_epoch) * (config.epochs - epoch - 1)
                log.info("training %s on %s: epoch %d of %d done, train loss %.4f, %.0f s so far%s",
                         type(model).__name__, bundle.name, epoch + 1, config.epochs, running, done_seconds + now - t0,
                         f", about {left:.0f} s left" if epoch + 1 < config.epochs else "")  # fmt: skip
            if keeping and epoch + 1 < config.epochs and now - last_save >= RESUME_EVERY_SECONDS:
                try:
                    _save_resume(kept_at, identity, {
                        "epoch": epoch + 1, "step": step, "graph_steps": graph_steps, "running": running,
                        "ema": None if ema is None else float(ema.item()), "seconds": done_seconds + now - t0,
                        "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "schedule": (sched.state_dict() if sched is not None
                                     else feed.state_dict() if feed is not None else None),
                        "loader": loader_position(loader), "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                    })
                except OSError as exc:  # a full disk: the state is a safeguard, not the training's result
                    keeping = False  # each try would fill the disk again; a kept earlier state stays valid
                    log.warning("training state after epoch %d not kept (%s: %s): the training goes on without "
                                "keeping its state", epoch + 1, type(exc).__name__, exc)
                last_save = time.perf_counter()
    bar.close()
    if dev.type == "cuda":  # the clock stops when the GPU has finished, not when it was asked
        torch.cuda.synchronize(dev)
    seconds = done_seconds + time.perf_counter() - t0
    model.eval()
    # A diverged training (lr too high) is not a base model: cached, it was refused on loading as a
    # damaged file, trained again into the same NaN weights, and the error named the cache file.
    bad = next((k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        if kept_at is not None:  # resumed, it would diverge again: not a state to resume from
            kept_at.unlink(missing_ok=True)
        raise ValueError(f"training {type(model).__name__} on {bundle.name} diverged: tensor {bad!r} holds NaN or infinite "
                         f"values after {config.epochs} epoch(s) (train loss {running:.4g}) with lr={config.lr!r}; "
                         "use a lower lr")  # fmt: skip
    result = evaluate(model, bundle.test, device=dev)
    model.cpu()
    if channels_last:  # the usual layout for state dicts and checkpoints
        model.to(memory_format=torch.contiguous_format)
    info = {
        "test_top1": result.top1,
        "test_loss": result.loss,
        "seconds": seconds,
        "epochs": config.epochs,
        "train_loss": running,
        "device": str(dev),
        "n_train": len(bundle.train),
        "dropped_per_epoch": int(drop_last),
        "n_test": result.n,
        "graph_steps": graph_steps,
        "resumed_at_epoch": start_epoch,
        "config": asdict(config),
    }
    log.info("trained %s on %s: top1 %.4f in %.1f s", type(model).__name__, bundle.name, result.top1, seconds)
    return info


def _restore_training(saved: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                      feed: _ScheduleFeed | None) -> None:
    """Weights, optimizer and schedule back to a kept state (:func:`_save_resume`'s). A graphed
    step's optimizer keeps its own ``lr`` tensors, which the captured step reads on the device
    (``load_state_dict`` would put the kept ones, on the CPU, in their place); the feed fills them."""
    model.load_state_dict(saved["model"])
    lrs = [group["lr"] for group in opt.param_groups]
    opt.load_state_dict(saved["optimizer"])
    if feed is not None:
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        feed.load_state_dict(saved["schedule"])
    elif sched is not None:
        sched.load_state_dict(saved["schedule"])


def _save_resume(path: Path, identity: dict[str, Any], state: dict[str, Any]) -> None:
    """Write a training's state (:func:`train_model`'s ``resume``) atomically: tensors on the CPU,
    readable with ``weights_only=True``."""
    def host(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu()
        if isinstance(x, dict):
            return {k: host(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(host(v) for v in x)
        return x

    with atomic_write(path) as fh:
        torch.save({"identity": json.dumps(identity, sort_keys=True), **host(state)}, fh)
    log.info("training state after epoch %d kept in %s", state["epoch"], path)


def _read_resume(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The state :func:`_save_resume` kept in ``path`` for a training of ``identity``; None (the
    training starts afresh) where there is none, or it is of another training or unreadable:
    such a file is removed, with a log line saying why."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        theirs = json.loads(saved["identity"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file: a fresh start, not an error
        why = f"it cannot be read ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
    else:
        if theirs == json.loads(json.dumps(identity, sort_keys=True)):
            return saved
        differ = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        why = f"it is the state of another training (it differs in: {', '.join(differ)})"
    log.warning("training state %s is not used, %s: training from the start", path, why)
    path.unlink(missing_ok=True)
    return None


def resume_path(path: Path) -> Path:
    """Where the training of the base model cached at ``path`` keeps its state until it is done."""
    return path.with_name(path.stem + ".resume.pt")


# --------------------------------------------------------------------------- cache


def cache_path(model_name: str, dataset_name: str, seed: int, config: TrainConfig,
               root: str | os.PathLike | None = None, data: str = "") -> Path:
    """``<cache>/models/<model>-<dataset>-seed<seed>-<config digest>[-<data>].pt``; ``data`` is
    the dataset's :func:`~wavesweep.data.data_fingerprint` (another copy of a dataset, with
    other labels or files, trains its own model)."""
    base = Path(root).expanduser() if root is not None else cache_dir()
    return base / "models" / f"{model_name}-{dataset_name}-seed{seed}-{config.digest()}{'-' + data if data else ''}.pt"


def get_base_model(
    model_name: str,
    dataset_name: str,
    *,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    train_config: TrainConfig | None = None,
    progress: bool = True,
    image_size: int | None = None,
    bundle: DatasetBundle | None = None,
) -> BaseModel:
    """The base model for (model, dataset, seed).

    - ``weights`` a file path: that checkpoint (a state dict, or wavesweep's
      ``{"state_dict", "meta"}`` file), loaded with ``weights_only=True`` into a model
      built for the dataset's shape; a mismatch is a ValueError naming it. A wavesweep base model
      trained on another seed's split of the dataset (digits), or a trial's checkpoint whose model was, is
      logged as a warning.
    - resnet18 + imagenet: the IMAGENET1K_V1 weights from the local torch hub cache.
    - otherwise: the cached trained model for (model, dataset, seed, config digest),
      trained once on ``device`` if absent (under a file lock, written atomically), and trained
      again, with a warning, if the cached file cannot be read (truncated, overwritten) or holds the
      model of another entry (its recorded model, dataset, seed or data fingerprint differ).
    ``train_config`` defaults to :func:`default_train_config`; its seed is replaced by ``seed``.
    ``bundle``: the dataset already loaded (``load_dataset(dataset_name, root=data_root,
    seed=seed, image_size=image_size)``), else it is loaded here: the cache key holds its
    fingerprint.
    """
    MODELS.get(model_name)
    from wavesweep.data import DATASETS

    DATASETS.get(dataset_name)
    if weights is not None and str(weights).split(":", 1)[0] in ("models", "runs", "mlflow-artifacts"):
        raise ValueError(f"weights {str(weights)!r} is an MLflow URI; load it with wavesweep.tracking")

    if weights is not None:
        path = weights_file(weights)
        shape = dataset_shape(dataset_name, root=data_root, image_size=image_size)
        model, meta, checksum = _load_hashed(model_name, path, lambda meta: shape)  # NaN/inf refused there
        _check_trained_on(meta, dataset_name, path)
        other = _other_split(meta, dataset_name, seed, path)
        return BaseModel(model, model_name, dataset_name, seed, "checkpoint", path, checksum, shape,
                         meta.get("train_info", {}), warnings=(other,) if other else ())

    if (model_name, dataset_name) in PRETRAINED_BASES:  # resnet18 + imagenet, the one pretrained pair
        path = resnet18_imagenet_path(None)
        model = load_pretrained_resnet18(None)
        return BaseModel(model, model_name, dataset_name, seed, "pretrained", path, file_sha256(path),
                         {"num_classes": 1000, "in_channels": 3, "image_size": 224},
                         {"weights": "IMAGENET1K_V1"})

    config = train_config or default_train_config(model_name, dataset_name)
    config = dataclasses.replace(config, seed=seed)
    config = config.resolved(device)  # the cache key records the amp/channels-last that run
    if bundle is None:
        bundle = load_dataset(dataset_name, root=data_root, seed=seed, image_size=image_size)
    elif bundle.name != dataset_name:
        raise ValueError(f"bundle holds {bundle.name!r}, not {dataset_name!r}")
    fingerprint = data_fingerprint(bundle)
    path = cache_path(model_name, dataset_name, seed, config, cache_root, data=fingerprint)
    lock = path.with_suffix(".lock")
    damaged = None  # the signature of the cache file found unreadable (truncated, overwritten)
    while True:
        with file_lock(lock):
            if damaged is not None and path.is_file() and _file_signature(path) == damaged:
                path.unlink()  # still the damaged file, not one another process has trained meanwhile
            if not path.is_file():
                shape = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels,
                         "image_size": bundle.image_size}
                torch.manual_seed(seed)  # weight init
                model = build_model(model_name, **shape)
                kept = resume_path(path)
                # a write of the state killed midway (SIGKILL, a lost machine) leaves its temporary
                # file, never read (up to 135 MB); only this entry's training, under this lock, writes one
                for left in path.parent.glob(f".{glob.escape(kept.name)}.*.tmp"):
                    left.unlink(missing_ok=True)
                # a diverged training removes the kept state itself; any other error (an image file
                # that could not be read for a moment) leaves it to resume from
                log.info("no cached base model %s on %s (seed %d): training it (%d epochs on %s); cached for every later trial",
                         model_name, dataset_name, seed, config.epochs, _device_type(device))  # fmt: skip
                info = train_model(model, bundle, config, device=device, progress=progress,
                                   resume=kept, resume_key=path.name)
                meta = {"model_name": model_name, "dataset_name": dataset_name, "seed": seed,
                        "build_kwargs": shape, "train_info": info, "dataset_info": _jsonable(bundle.info),
                        "data_fingerprint": fingerprint}
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                # meta as a JSON string: loadable with weights_only=True
                with atomic_write(path) as fh:
                    torch.save({"state_dict": state, "meta": json.dumps(meta)}, fh)
                kept.unlink(missing_ok=True)  # the model is kept: its training state is not needed
                log.info("cached base model %s", path)
            else:
                log.info("using cached base model %s", path)
                # a process stopped between caching the model and removing its training's state
                resume_path(path).unlink(missing_ok=True)
            signature = _file_signature(path)
        try:
            model, meta, checksum = _load_hashed(model_name, path, lambda meta: meta["build_kwargs"])
            # a readable file of another key (another seed's model copied over this one) is not this entry
            want = {"model_name": model_name, "dataset_name": dataset_name, "seed": seed, "data_fingerprint": fingerprint}
            if other := {k: meta[k] for k, v in want.items() if k in meta and meta[k] != v}:
                raise ValueError(f"it holds a model of {other}, not of {({k: want[k] for k in other})}")
            # nor is one of another training config (the key's digest): another lr's model copied over it
            trained = (meta.get("train_info") or {}).get("config")
            if isinstance(trained, dict) and config_digest(trained) != config.digest():
                raise ValueError(f"it holds a model trained with config digest {config_digest(trained)}, "
                                 f"not {config.digest()}")
            break
        except (ValueError, KeyError) as exc:  # KeyError: a readable file without wavesweep's metadata
            if damaged is not None:  # trained again just now and still unreadable: not the cache's fault
                raise
            # A cache entry is wavesweep's own file: a damaged one is trained again (as deterministically
            # as training is on this device), not a usage error the user can only fix by deleting it.
            log.warning("cached base model %s cannot be used (%s): training it again", path, exc)
            damaged = signature
    return BaseModel(model, model_name, dataset_name, seed, "trained", path, checksum, meta["build_kwargs"],
                     meta.get("train_info", {}))


def _trained_on(meta: dict[str, Any]) -> str | None:
    """The dataset a wavesweep weights file records: a cached base model's ``dataset_name``, a
    compressed checkpoint's trial ``dataset``; None for a file that records none (any state dict)."""
    name = meta.get("dataset_name")
    if name is None:
        user = (meta.get("checkpoint") or {}).get("user")
        trial = user.get("trial") if isinstance(user, dict) else None
        name = trial.get("dataset") if isinstance(trial, dict) else None
    return name if isinstance(name, str) else None


def _check_trained_on(meta: dict[str, Any], dataset_name: str, path: Path) -> None:
    """A weights file wavesweep made for another dataset is a usage error: a model of the same
    architecture loads its weights (cnn on digits and on fashion-mnist: 1 channel, 10 classes,
    pooled to any image size), and the trial would record a base model of chance accuracy as
    ``dataset_name``'s."""
    trained = _trained_on(meta)
    if trained is not None and trained != dataset_name:
        raise ValueError(f"weights file {str(path)!r} holds a model for dataset {trained!r}, not {dataset_name!r}; "
                         f"valid: dataset={trained}, or weights made for {dataset_name}")  # fmt: skip


def _other_split(meta: dict[str, Any], dataset_name: str, seed: int, path: Path) -> str | None:
    """A warning (logged, and returned for the trial's record) when a weights file that wavesweep
    trained on ``dataset_name`` records a train/test split seed other than ``seed`` (digits: the
    split is drawn from the seed): most of this seed's test examples were then the weights'
    training examples (seeds 0 and 3: 290 of 360). A trial's compressed checkpoint (a ``.wsz`` file,
    or a model registered from a trial) records its trial: on a seeded split, its base model was
    trained on the trial seed's split when wavesweep trained it (no ``weights``), and a
    ``finetune`` recovery trained it on that split's training examples."""
    split_seed = None
    if meta.get("dataset_name") == dataset_name:
        split_seed = (meta.get("dataset_info") or {}).get("split_seed")
    elif _trained_on(meta) == dataset_name and "dataset_name" not in meta:  # a trial's checkpoint
        from wavesweep.replicates import SEEDED_SPLITS

        trial = meta["checkpoint"]["user"]["trial"]
        if dataset_name in SEEDED_SPLITS and (not trial.get("weights") or trial.get("recovery") == "finetune"):
            split_seed = trial.get("seed")
    if split_seed is None or split_seed == seed:
        return None
    text = (f"weights {path} were trained on the {dataset_name} split of seed {split_seed}, but this run evaluates the "
            f"split of seed {seed}: its test examples may be the weights' training examples (use seed {split_seed}, "
            "or let wavesweep train the base)")  # fmt: skip
    log.warning("%s", text)
    return text


def _load_hashed(model_name: str, path: Path, shape_of) -> tuple[nn.Module, dict[str, Any], str]:
    """``(model in eval mode, meta, sha256)`` of a weights file: read without running code from it
    (:func:`~wavesweep.models.read_weights`), the model built from ``shape_of(meta)`` holding the
    read state (no random init). The checksum is hashed in a thread meanwhile (hashlib releases
    the GIL), and only once per process while the file is unchanged (:func:`remembered_sha256`).
    From the third load of an unchanged file in a process the file is not read either: each gets a
    deep copy of the model kept from the second (:data:`_LOADED`)."""
    sig = _file_signature(path)
    with _LOADED_LOCK:
        again = (model_name, sig) in _LOADED
        kept = _LOADED.get((model_name, sig))
    if kept is not None and shape_of(kept[1]) == kept[3]:
        model, meta, checksum, _ = kept
        return copy.deepcopy(model), copy.deepcopy(meta), checksum
    with ThreadPoolExecutor(1, thread_name_prefix="wavesweep-sha256") as pool:
        checksum = pool.submit(remembered_sha256, path)
        state, meta = read_weights(path)
        shape = shape_of(meta)
        model = build_loaded(model_name, state, source=str(path), adopt=True, **shape).eval()  # state: read just now, ours
        checksum = checksum.result()
    if _file_signature(path) == sig:  # not rewritten while it was read
        with _LOADED_LOCK:
            _LOADED.clear()  # one model at a time: a study's trials load one base
            # the second load of a file keeps a copy for the next ones (the first does not: a
            # process that loads its base once, a single trial, pays no copy)
            _LOADED[(model_name, sig)] = (copy.deepcopy(model), copy.deepcopy(meta), checksum, shape) if again else None
    return model, meta, checksum


#: the last weights file :func:`_load_hashed` read, by (model name, file signature): None after its
#: first read, then ``(model, meta, sha256, build kwargs)``, never handed out (each later load gets
#: a deep copy). Every trial of a study (a worker runs its trials in one process) loads the same
#: base model: reading and checking the file again each time was most of a cached load (ResNet-18,
#: digits: ``bench/bench_speedups.py --only base_load``).
_LOADED: dict[tuple, tuple[nn.Module, dict[str, Any], str, dict[str, Any]] | None] = {}
_LOADED_LOCK = threading.Lock()


#: sha256 of the files this process has hashed, by file signature (:func:`_file_signature`).
#: Every trial of a study (a worker runs its trials in one process) loads the same base model;
#: hashing its file again each time was the slowest part of a cached load.
_CHECKSUMS: dict[tuple, str] = {}
_CHECKSUMS_MAX = 64
_CHECKSUMS_LOCK = threading.Lock()


def _file_signature(path: Path) -> tuple:
    """What identifies a file's bytes here without reading them: its resolved path, device, inode,
    size, and modification and status-change times in ns. The cache is written by an atomic rename
    (a new inode); any write changes the modification time, and the change time, which (unlike the
    modification time: ``touch -d``, ``cp -p``, ``rsync -t``) cannot be set back."""
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remembered_sha256(path: Path) -> str:
    """:func:`file_sha256`, hashed once per process while the file's signature
    (:func:`_file_signature`) is unchanged. Timing: ``bench/bench_speedups.py``; oracle:
    ``tests/test_train.py::test_a_base_model_file_loaded_again_in_the_process_is_not_hashed_again``."""
    sig = _file_signature(path)
    with _CHECKSUMS_LOCK:
        digest = _CHECKSUMS.get(sig)
    if digest is None:
        digest = file_sha256(path)
        if _file_signature(path) == sig:  # not rewritten while it was hashed
            with _CHECKSUMS_LOCK:
                if len(_CHECKSUMS) >= _CHECKSUMS_MAX:
                    _CHECKSUMS.clear()
                _CHECKSUMS[sig] = digest
    return digest


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in d.items()}
