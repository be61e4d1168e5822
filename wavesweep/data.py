"""Named datasets: the registry (:data:`DATASETS`), the bundle every source returns, the
in-memory images, one evaluation ordering and the loaders. The sources themselves (the
embedded default ``digits``, the MNIST family from local IDX files, CIFAR-10 from its python
batches, ImageNet-1k val and any ImageFolder) are in :mod:`wavesweep.data_sources`, imported
at the end of this module so that ``DATASETS`` always holds them. Nothing downloads anything.

Every source returns a :class:`DatasetBundle`; ``bundle.test`` is the evaluation split.
The small sets (digits, MNIST family, CIFAR-10) are held in memory as
:class:`TensorImages`: uint8 images plus their normalisation, applied per batch on
whatever device the batch is on. The file sets (ImageNet, ImageFolder) decode images in
DataLoader worker processes: :func:`eval_batches` for evaluation, :func:`seeded_batches` (recovery)
and :func:`make_loader` (training) for training batches, whose random transforms are seeded per
example (:class:`SeededItems`) so that the batches do not depend on the worker count.

The registry carries each dataset's shape (:class:`DatasetSpec`), so a model can be built
for a dataset without reading it (:func:`dataset_shape`).

Evaluation subsets (:func:`eval_subset`) and chunked evaluation
(``wavesweep.evaluate.evaluate_chunks``) share one ordering, :func:`stratified_order`,
so any prefix of it is (close to) class-proportional.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from wavesweep.names import Registry

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder and its shape.

    ``builder(root: Path | None, seed: int, image_size: int | None, **options) -> DatasetBundle``.
    ``num_classes`` None: counted from the files (imagefolder). ``image_size`` is the fixed
    side length, or the default one where ``resizable`` (the file sets, resized on load).
    """

    name: str
    builder: Callable[..., "DatasetBundle"]
    num_classes: int | None
    in_channels: int
    image_size: int
    resizable: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> "DatasetBundle":
        return self.builder(*args, **kwargs)

    def size(self, image_size: int | None) -> int:
        """The side length a load with ``image_size`` gives; ValueError where it is fixed and differs."""
        if image_size is None:
            return self.image_size
        if not self.resizable and image_size != self.image_size:
            s = self.image_size
            raise ValueError(f"{self.name} images are {s}x{s}; image_size={image_size!r} is not supported")
        return int(image_size)


#: name -> :class:`DatasetSpec` (callable like its builder)
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(
    name: str, *, num_classes: int | None, in_channels: int, image_size: int, resizable: bool = False
) -> Callable[[Callable[..., "DatasetBundle"]], Callable[..., "DatasetBundle"]]:
    """Decorator: register ``builder`` under ``name`` with its shape."""

    def deco(builder: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        DATASETS.register(name)(DatasetSpec(name, builder, num_classes, in_channels, image_size, resizable))
        return builder

    return deco


@dataclass
class DatasetBundle:
    """One dataset, ready for training and evaluation.

    ``train`` is None where the dataset has only an evaluation split (imagenet: val without its train/).
    ``test`` is always the evaluation split. Items are ``(image float32 (C, H, W), label int)``.
    ``info`` holds loggable facts (root, split sizes, split seed, normalisation).
    """

    name: str
    train: Dataset | None
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    info: dict[str, Any] = field(default_factory=dict)


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, remembered on the tensor (or the tensor it is a view of: a
    study's trials share the decoded IDX tensors, so they are hashed once per process) while it
    is not modified in place (its version counter, shared with its views, is in the key)."""
    holder = t._base if t._base is not None else t
    key = (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
    memo = holder.__dict__.setdefault("_wavesweep_digests", {})
    if key not in memo:
        arr = t.detach().cpu().contiguous().numpy()
        memo[key] = hashlib.sha256(memoryview(arr).cast("B")).hexdigest()
    return memo[key]


def _file_size(path: str) -> int:
    """A file's size in bytes (links followed), -1 for a file that cannot be read (its decoding
    names it): in a file split's fingerprint, so an image replaced under the same name by another
    (re-extracted, regenerated, resized) is other data, while a copy of the folder elsewhere, or
    with other modification times, is the same data. One ``stat`` a file: the whole digest of
    ImageNet val's 50,000 files takes about 0.13 s (``bench/bench_speedups.py --only train_scan``,
    on this project's 2-core machine); the pixels are not hashed (6.4 GB a trial)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _relative_paths(ds: Any) -> list[str]:
    """Each sample's path under ``ds.root``, '/'-separated: a slice of the path where it starts
    with the root as given (the scans join names onto it: 0.5 s per 100,000 paths less than
    ``Path.relative_to``), else ``Path.relative_to`` (the same string)."""
    root = Path(ds.root)
    prefix = os.path.join(str(ds.root), "")
    sep = os.sep != "/"
    return [(f[len(prefix):].replace(os.sep, "/") if sep else f[len(prefix):]) if f.startswith(prefix)
            else Path(f).relative_to(root).as_posix() for f, _ in ds.samples]


def _split_digest(ds: Dataset | None) -> str:
    if ds is None:
        return "none"
    if isinstance(ds, TensorImages):
        return f"images:{tuple(ds.images.shape)}:{_tensor_digest(ds.images)}:{_tensor_digest(ds.targets)}:{ds.divisor!r}:{ds.mean!r}:{ds.std!r}"
    if hasattr(ds, "samples") and hasattr(ds, "root"):  # an image folder: its files, their sizes and labels
        listed = "\n".join(f"{rel}\t{y}\t{_file_size(f)}" for rel, (f, y) in zip(_relative_paths(ds), ds.samples))
        return f"files:{len(ds.samples)}:{hashlib.sha256(listed.encode()).hexdigest()}:{getattr(ds, 'transform', None)!r}"
    if isinstance(ds, TensorDataset):
        return "tensors:" + ":".join(_tensor_digest(t) for t in ds.tensors)
    raise TypeError(f"no fingerprint for a {type(ds).__name__} split")


#: how a file split's random training transforms draw (:class:`SeededItems`: seeded per example,
#: the same for any number of workers); part of a file training split's fingerprint, so a base model
#: trained when they drew from the main process's generator (before 2026-11-27) is trained again,
#: not reused as what the code trains now. In-memory splits have no random transforms: not in theirs.
FILE_TRAIN_RANDOMNESS = "per-example-seeded"


def data_fingerprint(bundle: DatasetBundle, *, splits: Sequence[str] = ("train", "test")) -> str:
    """A digest of the data a model is trained and evaluated on (16 hex characters): the pixels
    and labels of in-memory splits with their normalisation; for image folders (and a flat ImageNet
    val), every file's path under its split's folder, its size and its label, with the transform (a
    file replaced under the same name by another of exactly the same size is not seen). Part of the base-model cache key (both splits: a model trained on other
    data is another model), so another copy of a dataset with other labels, or other files,
    never reuses a model. ``splits``: the splits digested (with the dataset's name and shape),
    ``("train", "test")`` or ``("test",)`` (:func:`eval_fingerprint`)."""
    if not splits or any(s not in ("train", "test") for s in splits):
        raise ValueError(f"splits={tuple(splits)!r}; valid: ('train', 'test') or a part of it")
    digests = {s: _split_digest(getattr(bundle, s)) for s in splits}
    if digests.get("train", "").startswith("files:"):
        digests["train"] += f":{FILE_TRAIN_RANDOMNESS}"
    parts = [bundle.name, str(bundle.num_classes), str(bundle.in_channels), str(bundle.image_size), *digests.values()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def eval_fingerprint(bundle: DatasetBundle) -> str:
    """:func:`data_fingerprint` of the evaluation split alone: the base evaluation's cache key.
    A given model's logits depend on the evaluation examples (files, labels, transform), never on
    the training split, so adding, changing or removing ``train/`` keeps the cached logits, while
    any change to the evaluation examples is another key (the model is in the key by checksum).
    And it is cheap where the training split is huge: ImageNet's 1.28 M training files are not
    listed and stat'ed on every trial (3.2 s, ``bench/bench_speedups.py --only train_scan``; the
    50,000 val files about 0.13 s)."""
    return data_fingerprint(bundle, splits=("test",))


def make_bundle(name: str, train: Dataset | None, test: Dataset, info: dict[str, Any], *,
            num_classes: int | None = None, image_size: int | None = None) -> DatasetBundle:
    """A bundle whose shape comes from the registry (overridden where the files decide)."""
    spec = DATASETS.get(name)
    nc = num_classes if num_classes is not None else spec.num_classes
    assert nc is not None, name
    return DatasetBundle(name, train, test, nc, spec.in_channels, spec.size(image_size), info)


def data_root() -> Path:
    """Default data root: env ``WAVESWEEP_DATA`` or ``~/.cache/wavesweep/data``."""
    from wavesweep.models import expand_path  # an unknown ~user: a one-line ValueError, not a traceback

    env = os.environ.get("WAVESWEEP_DATA")
    return expand_path(env or "~/.cache/wavesweep/data", what="data root ($WAVESWEEP_DATA)" if env else "data root")


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    image_size: int | None = None,
    **options: Any,
) -> DatasetBundle:
    """Load dataset ``name`` (see ``DATASETS.names()``).

    ``root``: where its files live (default: ``data_root()/<name>``, then the dataset's
    system location, e.g. Debian's for fashion-mnist; digits needs none).
    ``seed``: the train/test split seed where the split is ours (digits).
    ``image_size``: side length of the square images where configurable (imagefolder, imagenet).
    ``options``: passed to the builder (e.g. ``expected_classes`` for imagenet).
    """
    from wavesweep.models import expand_path  # an unknown ~user: a one-line ValueError, not a traceback

    spec = DATASETS.get(name)
    return spec.builder(None if root is None else expand_path(root, what="data root"), seed, image_size, **options)


def dataset_shape(name: str, *, root: str | os.PathLike | None = None,
                  image_size: int | None = None) -> dict[str, int]:
    """``{num_classes, in_channels, image_size}`` of dataset ``name`` from the registry, without
    reading its images (imagefolder, whose class count is its folders', is loaded), for
    building a model to load weights into."""
    spec = DATASETS.get(name)
    size = spec.size(image_size)
    if spec.num_classes is None:
        b = load_dataset(name, root=root, image_size=image_size)
        return {"num_classes": b.num_classes, "in_channels": b.in_channels, "image_size": b.image_size}
    return {"num_classes": spec.num_classes, "in_channels": spec.in_channels, "image_size": size}


# --------------------------------------------------------------------------- in-memory images


class TensorImages(Dataset):
    """Images held as uint8 (N, C, H, W) with int64 labels (N,), normalised when read:
    ``x = (images / divisor - mean[c]) / std[c]`` in float32, one op per step on the whole
    batch (the exact sequence of torchvision's ``ToTensor`` + ``Normalize``, so the values
    are bit for bit what those transforms give).

    ``to(device)`` gives the same dataset with its tensors on ``device``, copied once and
    cached on this object; ``batch(index)`` normalises a whole batch on the tensors' device.
    ``dataset[i]`` (int) is ``(float32 (C, H, W), int label)`` like any image dataset;
    ``dataset[index]`` for a slice or an index array/tensor is a whole batch
    ``(float32 (B, C, H, W), int64 (B,))``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, divisor: float,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.dtype != torch.int64 or targets.shape != images.shape[:1]:
            raise ValueError(f"targets must be int64 ({images.shape[0]},), got {targets.dtype} {tuple(targets.shape)}")
        if targets.device != images.device:
            raise ValueError(f"images on {images.device} but targets on {targets.device}")
        c = images.shape[1]
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != c or len(std) != c or min(std) <= 0 or divisor <= 0:
            raise ValueError(f"need {c} means, {c} positive stds and a positive divisor; "
                             f"got mean {mean}, std {std}, divisor {divisor!r}")
        self.images, self.targets = images, targets
        self.divisor, self.mean, self.std = float(divisor), mean, std
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._copies: dict[str, TensorImages] = {}

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.targets.nbytes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"TensorImages(n={n}, shape=({c}, {h}, {w}), device={self.device}, divisor={self.divisor:g})"

    def _like(self, images: torch.Tensor, targets: torch.Tensor) -> TensorImages:
        return TensorImages(images, targets, divisor=self.divisor, mean=self.mean, std=self.std)

    def to(self, device: str | torch.device) -> TensorImages:
        """This dataset on ``device``: ``self`` if already there, else a copy made once and cached."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev == self.device:
            return self
        key = str(dev)
        if key not in self._copies:
            self._copies[key] = self._like(self.images.to(dev), self.targets.to(dev))
        return self._copies[key]

    def _norm_consts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(divisor, mean, std) as float32 (C, 1, 1) on ``device``: broadcast over (C, H, W) and
        (B, C, H, W). Tensors, not Python scalars: CUDA divides by a CPU scalar as a multiply
        by its reciprocal, which is not bit-identical to a division."""
        if device not in self._consts:
            c = len(self.mean)
            t = torch.tensor([[self.divisor] * c, self.mean, self.std], dtype=torch.float32)
            self._consts[device] = tuple(t.reshape(3, c, 1, 1).to(device).unbind(0))  # type: ignore[assignment]
        return self._consts[device]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) on any device -> ``(images / divisor - mean) / std`` float32 there,
        step by step as torchvision's ToTensor + Normalize."""
        div, mean, std = self._norm_consts(images.device)
        return images.to(torch.float32).div_(div).sub_(mean).div_(std)

    def batch(self, index: slice | torch.Tensor | np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32 (B, C, H, W), y int64 (B,))`` for ``index``, normalised on this device."""
        if not isinstance(index, slice):
            # a host index goes over without waiting for the device (as_tensor(..., device=) would
            # copy it and then synchronise the stream, queued work and all)
            index = torch.as_tensor(index, dtype=torch.int64)
            if index.device != self.device:  # non-blocking only from the host (to it, it would race)
                index = index.to(self.device, non_blocking=index.device.type == "cpu")
        return self.normalise(self.images[index]), self.targets[index]

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, Any]:
        if isinstance(index, (int, np.integer)):
            return self.normalise(self.images[index]), int(self.targets[index])
        return self.batch(index)

    def subset(self, indices: np.ndarray | torch.Tensor) -> TensorImages:
        """The items at ``indices`` (in that order), with every cached device copy indexed on
        its device too (no new host->device copy)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        out = self._like(self.images[idx.to(self.device)], self.targets[idx.to(self.device)])
        for key, copy in self._copies.items():
            di = idx.to(copy.device)
            out._copies[key] = copy._like(copy.images[di], copy.targets[di])
        return out


# --------------------------------------------------------------------------- targets and order


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Integer labels of every item of ``dataset`` as int64 (N,), without loading images
    where the dataset knows them (TensorImages, TensorDataset, ImageFolder, MNIST, CIFAR,
    Subset of those)."""
    if isinstance(dataset, TensorImages):
        return dataset.targets.cpu().numpy()
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].cpu().numpy().astype(np.int64)  # labels may live on a GPU
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    log.warning("dataset %s does not expose targets; reading every item", type(dataset).__name__)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def stratified_order(targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation of ``range(len(targets))`` whose every prefix is class-proportional.

    Within each class the examples are shuffled by ``seed``; the classes are then
    interleaved by giving the k-th of n examples of a class the key (k + u) / n
    (u uniform in [0, 1), one per class, so classes do not tie in lockstep) and sorting
    by key. A prefix of length L holds about L * n_c / N examples of class c.
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(targets), dtype=np.float64)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        keys[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    # stable sort; ties (equal keys) broken by index
    return np.lexsort((np.arange(len(targets)), keys))


def eval_subset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A deterministic, stratified subset of ``limit`` examples (the first ``limit`` of
    :func:`stratified_order`), kept in dataset order. ``limit`` None or 0, or ``limit`` >=
    ``len(dataset)``: the whole dataset. TensorImages/TensorDataset give the same kind."""
    idx = eval_subset_positions(dataset, limit, seed)
    return dataset if idx is None else take(dataset, idx)


def eval_subset_positions(dataset: Dataset, limit: int | None, seed: int = 0) -> np.ndarray | None:
    """The sorted positions in ``dataset`` that :func:`eval_subset` keeps; None for the whole
    dataset (``limit`` None or 0, or ``limit`` >= ``len(dataset)``)."""
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"eval limit must be a non-negative int or None, got {limit!r}")
    if not limit or limit >= len(dataset):
        return None
    return np.sort(stratified_order(dataset_targets(dataset), seed)[:limit])


def take(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """``dataset`` restricted to ``indices`` (in that order); TensorImages and TensorDataset
    are sliced into the same kind so their fast paths still apply."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(dataset, TensorImages):
        return dataset.subset(indices)
    if isinstance(dataset, TensorDataset):
        t = torch.from_numpy(indices)
        return TensorDataset(*(x[t] for x in dataset.tensors))
    return Subset(dataset, indices.tolist())


# --------------------------------------------------------------------------- loaders


class _TensorBatches(Sampler):
    """Yields one index object per batch for an in-memory dataset: a ``slice`` in sequential
    order (zero-copy views) or an index tensor when shuffled."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        # DataLoader's drop_last: the incomplete last batch is left out (the permutation is drawn
        # over all n, so which examples are left out changes from epoch to epoch)
        self.end = n - n % batch_size if drop_last else n

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle:
            perm = torch.randperm(self.n, generator=self.generator)
            for i in range(0, self.end, self.batch_size):
                yield perm[i : min(i + self.batch_size, self.end)]
        else:
            for i in range(0, self.end, self.batch_size):
                yield slice(i, min(i + self.batch_size, self.end))

    def __len__(self) -> int:
        return (self.end + self.batch_size - 1) // self.batch_size


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(x float32 (B, C, H, W), y int64 (B,))``, for training.

    Shuffled order comes from a generator seeded with ``seed`` (the same seed gives the
    same order on every run; a new epoch of the same loader gives a new order).
    TensorImages/TensorDataset fast path: batches are sliced (and normalised) in one op
    instead of collating B items, so the loader costs next to nothing.

    Any other dataset (image files) is decoded by ``num_workers`` worker processes (default
    :func:`default_num_workers`; 0: in this process), pinned when ``pin_memory``, kept across
    epochs (``persistent_workers``: :func:`shutdown_workers` stops them). Its random transforms
    draw from generators seeded per example (:class:`SeededItems`, stream seed ``seed``, the
    position ``epoch * len(dataset) + k`` of the k-th example of each epoch's order), so the
    batches are the same whatever the worker count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(dataset, (TensorDataset, TensorImages)):
        sampler = _TensorBatches(len(dataset), batch_size, shuffle, seed, drop_last)
        # batch_size=None: each sampler element is one whole batch, passed to dataset[...]
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    return DataLoader(
        SeededItems(dataset),
        batch_sampler=_SeededEpochs(len(dataset), batch_size, shuffle, seed, drop_last),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator(),  # its workers' seeds (unused) not drawn from the global generator
    )


def item_seed(seed: int, position: int) -> int:
    """The seed of the random draws of the example at ``position`` of the stream seeded ``seed``:
    63 bits of the BLAKE2b digest of both (any integers, negative included; neighbouring seeds and
    positions give unrelated seeds)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(position)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededItems(Dataset):
    """``dataset`` read by key ``(seed, position, index)``: ``dataset[index]`` with torch's CPU
    generator, Python's ``random`` and NumPy's global generator seeded from
    :func:`item_seed(seed, position) <item_seed>` while it is read, and put back as they were after.

    Random transforms (a flip, a random crop) draw from those global generators; a DataLoader
    worker has its own, seeded from its worker id. Seeded per example instead, an item is a pure
    function of its key: the same in the main process or in any worker, for any number of workers.
    (Only the CPU generator: torch.manual_seed would reseed the caller's CUDA generators too.)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        import random

        seed, position, index = key
        s = item_seed(seed, position)
        gen = torch.default_generator
        saved = gen.get_state(), random.getstate(), np.random.get_state()
        try:
            gen.manual_seed(s)
            random.seed(s)
            np.random.seed(s % (1 << 32))
            return self.dataset[index]
        finally:
            gen.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class _SeededEpochs(Sampler):
    """:func:`make_loader`'s batches of :class:`SeededItems` keys ``(seed, position, index)``,
    epoch after epoch: the order as :class:`_TensorBatches` draws it (a permutation per epoch
    from a generator seeded with ``seed`` when shuffled), position ``epoch * n + k`` for the k-th
    example of an epoch."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.end = n - n % batch_size if drop_last else n
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # counted when the epoch starts, not when iter() is called: a DataLoader calls it twice
        # for its first epoch and reads the second
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else range(self.n)
        start = epoch * self.n
        for i in range(0, self.end, self.batch_size):
            yield [(self.seed, start + k, order[k]) for k in range(i, min(i + self.batch_size, self.end))]

    def __len__(self) -> int:
        return (self.end + self.batch_size - 1) // self.batch_size


def loader_position(loader: DataLoader) -> dict[str, Any]:
    """Where :func:`make_loader`'s ``loader`` stands between epochs: its shuffle generator's state
    and (file datasets) the number of epochs it has started. :func:`set_loader_position` on a
    loader made with the same arguments makes its next epoch the one this loader would give next
    (the same order, the same per-example draws): how an interrupted training resumes."""
    sampler = loader.batch_sampler if isinstance(loader.batch_sampler, _SeededEpochs) else loader.sampler
    if not isinstance(sampler, (_TensorBatches, _SeededEpochs)):
        raise TypeError(f"not a make_loader loader: its sampler is a {type(sampler).__name__}")
    return {"generator": sampler.generator.get_state(), "epoch": getattr(sampler, "epoch", 0)}


def set_loader_position(loader: DataLoader, position: dict[str, Any]) -> None:
    """Put ``loader`` (from :func:`make_loader`, before its next epoch starts) at ``position``
    (:func:`loader_position`)."""
    sampler = loader.batch_sampler if isinstance(loader.batch_sampler, _SeededEpochs) else loader.sampler
    if not isinstance(sampler, (_TensorBatches, _SeededEpochs)):
        raise TypeError(f"not a make_loader loader: its sampler is a {type(sampler).__name__}")
    sampler.generator.set_state(position["generator"])
    if isinstance(sampler, _SeededEpochs):
        sampler.epoch = int(position["epoch"])


def shutdown_workers(loader: DataLoader) -> None:
    """Stop the (persistent) worker processes of ``loader`` now, not when it is collected."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


@contextlib.contextmanager
def stopping_workers(loader: DataLoader) -> Iterator[DataLoader]:
    """``with stopping_workers(loader):`` -- :func:`shutdown_workers` when the block ends, however."""
    try:
        yield loader
    finally:
        shutdown_workers(loader)


def default_num_workers() -> int:
    """Decoding worker processes for file datasets: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class _IndexBatches(Sampler):
    """Batches of indices into a dataset; the indices are set before each pass, so one
    persistent-worker loader serves every subset of the dataset (see :func:`eval_batches`)."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.indices: list[int] | None = None  # None: all, in order

    def __iter__(self) -> Iterator[list[int]]:
        idx = range(self.n) if self.indices is None else self.indices
        for i in range(0, len(idx), self.batch_size):
            yield list(idx[i : i + self.batch_size])

    def __len__(self) -> int:
        n = self.n if self.indices is None else len(self.indices)
        return (n + self.batch_size - 1) // self.batch_size


_LOADERS_ATTR = "_wavesweep_eval_loaders"
#: where evaluate caches a TensorDataset's input tensor on the device: (key, tensor)
DEVICE_COPY_ATTR = "_wavesweep_device_copy"


class _LoaderCache(dict):
    """The loaders cached on a dataset (:func:`eval_batches`). Pickles as empty, so a worker
    process started by spawn/forkserver receives the dataset without them."""

    def __reduce__(self) -> tuple[type, tuple]:
        return (_LoaderCache, ())


class _Unowned(Dataset):
    """``base`` read through a weak reference: the DataLoader that :func:`eval_batches` and
    :func:`seeded_batches` cache on ``base`` does not hold ``base`` alive, so the two make no
    reference cycle. Dropped, the dataset is freed at once with its loaders, whose worker
    processes torch then stops at once. In a cycle they were left to the garbage collector,
    which finalises the loader's queues before the loader: torch's shutdown message was never
    sent and it waited its 5 s join timeout per worker (2 workers: 10.6 s per dropped dataset).
    A worker started by fork reads the same ``base``; pickled (spawn, forkserver) it is ``base``."""

    def __init__(self, base: Dataset) -> None:
        self._ref = weakref.ref(base)

    def _base(self) -> Dataset:
        base = self._ref()
        if base is None:  # a pass runs over a dataset its caller holds: not reached
            raise RuntimeError("the dataset of this loader was freed")
        return base

    def __len__(self) -> int:
        return len(self._base())  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        return self._base()[index]

    def __reduce__(self) -> tuple[Callable[[Dataset], Dataset], tuple[Dataset]]:
        return (_identity, (self._base(),))


def _one_pass(loader: DataLoader) -> Iterator[Any]:
    """The batches of ``loader``'s (persistent-worker) pass. One that fails (a worker's error,
    re-raised here) stops the workers before the error goes on: the error's traceback holds the
    dataset in a reference cycle, and the garbage collector, which frees it, finalises the
    loader's queues first (torch then waited 5 s per worker to stop them). The next pass starts
    new workers."""
    try:
        yield from loader
    except Exception:
        shutdown_workers(loader)
        raise


def _identity(dataset: Dataset) -> Dataset:
    """``dataset`` itself (what an :class:`_Unowned` unpickles to in a spawned worker)."""
    return dataset


def _unwrap(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """``(base dataset, indices into it)`` of a (nested) Subset; indices None for a plain dataset."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        inner = list(dataset.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def eval_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x float32 (B, C, H, W), y int64 (B,))`` over a file dataset (or a Subset of one)
    in its order, decoded by ``num_workers`` worker processes (default
    :func:`default_num_workers`), pinned when ``pin_memory`` (for non-blocking copies to CUDA).

    The DataLoader is made once per (base dataset, batch size, workers, pinning) with
    ``persistent_workers`` and cached on the base dataset: every model of a trial, and
    every chunk (Subset) of its evaluation set, reuses the same worker processes.
    :func:`close_loaders` shuts them down. Not reentrant: finish one pass before the next.
    """
    base, indices = _unwrap(dataset)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    key = (batch_size, workers, bool(pin_memory))
    loaders = base.__dict__.setdefault(_LOADERS_ATTR, _LoaderCache())
    if key not in loaders:
        sampler = _IndexBatches(len(base), batch_size)
        loader = DataLoader(_Unowned(base), batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                            persistent_workers=workers > 0)  # fmt: skip
        loaders[key] = (loader, sampler)
    loader, sampler = loaders[key]
    sampler.indices = indices
    yield from _one_pass(loader)


class _KeyBatches(Sampler):
    """Batches of :class:`SeededItems` keys, set before each pass (see :func:`seeded_batches`)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def seeded_batches(
    dataset: Dataset,
    batches: Sequence[Sequence[int]],
    *,
    seed: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(x, y)`` for each batch of indices into ``dataset`` (a file dataset or a Subset of one),
    the example at position k of the whole sequence (counted over the batches, from 0) read as
    :class:`SeededItems` key ``(seed, k, index)``: its random transforms are a pure function of
    ``seed`` and k, whatever the worker count. Decoded by ``num_workers`` worker processes
    (default :func:`default_num_workers`), pinned when ``pin_memory``.

    As :func:`eval_batches`, the DataLoader is made once per (base dataset, workers, pinning)
    with ``persistent_workers`` and cached on the base dataset (the seed travels in the keys), so
    every method of a trial reads its recovery batches from the same worker processes;
    :func:`close_loaders` shuts them down. Not reentrant: finish one pass before the next.
    """
    base, indices = _unwrap(dataset)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    key = ("seeded", workers, bool(pin_memory))
    loaders = base.__dict__.setdefault(_LOADERS_ATTR, _LoaderCache())
    if key not in loaders:
        sampler = _KeyBatches()
        # its own generator: a DataLoader draws its workers' seeds (unused here) from the global one
        # otherwise, at every pass, workers or not (the caller's random state would move)
        loader = DataLoader(SeededItems(_Unowned(base)), batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                            persistent_workers=workers > 0, generator=torch.Generator())  # fmt: skip
        loaders[key] = (loader, sampler)
    loader, sampler = loaders[key]
    keys, position = [], 0
    for batch in batches:
        keys.append([(seed, position + j, int(i) if indices is None else indices[int(i)]) for j, i in enumerate(batch)])
        position += len(batch)
    sampler.batches = keys
    yield from _one_pass(loader)


def close_loaders(dataset: Dataset) -> None:
    """Shut down the worker processes of the loaders :func:`eval_batches` and
    :func:`seeded_batches` cached on ``dataset``, and drop the device copy the evaluation cached on
    a TensorDataset."""
    base, _ = _unwrap(dataset)
    base.__dict__.pop(DEVICE_COPY_ATTR, None)  # a TensorDataset's cached device copy (evaluate)
    for loader, _ in base.__dict__.pop(_LOADERS_ATTR, {}).values():
        shutdown_workers(loader)


# The sources register themselves into DATASETS on import; importing them here (last, once
# everything they use is defined) means that whoever imports this module sees every dataset.
import wavesweep.data_sources  # noqa: E402,F401
