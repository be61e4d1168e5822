"""Named datasets: the embedded default (``digits``), ImageNet-1k val, any ImageFolder,
MNIST and CIFAR-10 from local files. Nothing here downloads anything.

Every loader returns a :class:`DatasetBundle`; ``bundle.test`` is the evaluation split.
Evaluation subsets (:func:`eval_subset`) and chunked evaluation
(``wavesweep.evaluate.evaluate_chunks``) share one ordering, :func:`stratified_order`,
so any prefix of it is (close to) class-proportional.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from wavesweep.registry import Registry

log = logging.getLogger(__name__)

#: name -> ``builder(root: Path | None, seed: int, image_size: int | None, **options) -> DatasetBundle``
DATASETS: Registry[Callable[..., "DatasetBundle"]] = Registry("dataset")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SYNSET = re.compile(r"^n\d{8}$")


@dataclass
class DatasetBundle:
    """One dataset, ready for training and evaluation.

    ``train`` is None where the dataset has only an evaluation split (imagenet: val).
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


def data_root() -> Path:
    """Default data root: env ``WAVESWEEP_DATA`` or ``~/.cache/wavesweep/data``."""
    env = os.environ.get("WAVESWEEP_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wavesweep" / "data"


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    image_size: int | None = None,
    **options: Any,
) -> DatasetBundle:
    """Load dataset ``name`` (see ``DATASETS.names()``).

    ``root``: where its files live (default: ``data_root()/<name>``; digits needs none).
    ``seed``: the train/test split seed where the split is ours (digits).
    ``image_size``: side length of the square images where configurable (imagefolder).
    ``options``: passed to the builder (e.g. ``expected_classes`` for imagenet).
    """
    builder = DATASETS.get(name)
    return builder(None if root is None else Path(root).expanduser(), seed, image_size, **options)


# --------------------------------------------------------------------------- targets and order


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Integer labels of every item of ``dataset`` as int64 (N,), without loading images
    where the dataset knows them (TensorDataset, ImageFolder, MNIST, CIFAR, Subset of those)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy().astype(np.int64)
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
    ``len(dataset)``: the whole dataset. A TensorDataset gives a TensorDataset."""
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"eval limit must be a non-negative int or None, got {limit!r}")
    if not limit or limit >= len(dataset):
        return dataset
    idx = np.sort(stratified_order(dataset_targets(dataset), seed)[:limit])
    return take(dataset, idx)


def take(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """``dataset`` restricted to ``indices`` (in that order); a TensorDataset is sliced
    into a new TensorDataset so the fast loader path still applies."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(dataset, TensorDataset):
        t = torch.from_numpy(indices)
        return TensorDataset(*(x[t] for x in dataset.tensors))
    return Subset(dataset, indices.tolist())


# --------------------------------------------------------------------------- loaders


class _TensorBatches(Sampler):
    """Yields one index object per batch for a TensorDataset: a ``slice`` in sequential
    order (zero-copy views) or an index tensor when shuffled."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle:
            perm = torch.randperm(self.n, generator=self.generator)
            for i in range(0, self.n, self.batch_size):
                yield perm[i : i + self.batch_size]
        else:
            for i in range(0, self.n, self.batch_size):
                yield slice(i, min(i + self.batch_size, self.n))

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader yielding ``(x float32 (B, C, H, W), y int64 (B,))``.

    Shuffled order comes from a generator seeded with ``seed`` (the same seed gives the
    same order on every run; a new epoch of the same loader gives a new order).
    TensorDataset fast path: batches are sliced from the tensors in one indexing op
    instead of collating B items, so the loader costs next to nothing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(dataset, TensorDataset):
        sampler = _TensorBatches(len(dataset), batch_size, shuffle, seed)
        # batch_size=None: each sampler element is one whole batch, passed to dataset[...]
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------- datasets


@DATASETS.register("digits")
def _digits(root: Path | None, seed: int, image_size: int | None, test_fraction: float = 0.2) -> DatasetBundle:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes.

    Stratified split from ``seed``; pixels scaled to [0, 1] by /16 then standardised with
    the *train* split's scalar mean and std (no test statistics leak into training).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size not in (None, 8):
        raise ValueError(f"digits images are 8x8; image_size={image_size!r} is not supported")
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    mean = float(x[idx_train].mean())
    std = float(x[idx_train].std())
    xt = torch.from_numpy((x - mean) / std).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    yt = torch.from_numpy(y.astype(np.int64))
    ti, vi = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return DatasetBundle(
        name="digits",
        train=TensorDataset(xt[ti].contiguous(), yt[ti].contiguous()),
        test=TensorDataset(xt[vi].contiguous(), yt[vi].contiguous()),
        num_classes=10,
        in_channels=1,
        image_size=8,
        info={
            "root": "sklearn.datasets.load_digits (bundled)",
            "n_train": len(idx_train),
            "n_test": len(idx_test),
            "split_seed": seed,
            "test_fraction": test_fraction,
            "norm_mean": mean,
            "norm_std": std,
        },
    )


def _imagenet_eval_transform(image_size: int = 224):
    from torchvision import transforms as T

    resize = int(round(image_size * 256 / 224))  # 256 for 224, the standard ratio
    return T.Compose(
        [
            T.Resize(resize),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _class_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


_IMAGENET_LAYOUT = (
    "expected the ImageNet-1k validation set as an ImageFolder: a directory with 1000 "
    "class folders named by WordNet synset (n01440764/, n01443537/, ..., n15075141/), "
    "each holding that class's validation images (e.g. the layout produced by "
    "valprep.sh); pass it as root, or put it at $WAVESWEEP_DATA/imagenet/val"
)


@DATASETS.register("imagenet")
def _imagenet(
    root: Path | None, seed: int, image_size: int | None, expected_classes: int = 1000
) -> DatasetBundle:
    """ImageNet-1k val as an ImageFolder with the standard torchvision eval transform
    (resize 256, center crop 224, ImageNet normalisation). Classes are the sorted synset
    folders, i.e. the standard index order the pretrained weights use.

    ``expected_classes``: the number of synset folders required (1000 for ImageNet-1k;
    tests pass a small number to run the real code path on a generated tree).
    """
    from torchvision.datasets import ImageFolder

    size = image_size or 224
    path = root if root is not None else data_root() / "imagenet" / "val"
    if not path.is_dir():
        raise FileNotFoundError(f"imagenet: directory {str(path)!r} does not exist; {_IMAGENET_LAYOUT}")
    classes = _class_dirs(path)
    if (path / "val").is_dir() and not any(_SYNSET.match(c) for c in classes):
        # root given as the ImageNet top directory (train/, val/, ...)
        path = path / "val"
        classes = _class_dirs(path)
    bad = [c for c in classes if not _SYNSET.match(c)]
    if len(classes) != expected_classes or bad:
        what = f"{len(classes)} class folders" + (f", some not synset ids (e.g. {bad[0]!r})" if bad else "")
        raise ValueError(f"imagenet: malformed directory {str(path)!r}: found {what}; {_IMAGENET_LAYOUT}")
    try:
        test = ImageFolder(str(path), transform=_imagenet_eval_transform(size))
    except (FileNotFoundError, RuntimeError) as err:  # e.g. a class folder without images
        raise ValueError(f"imagenet: cannot read {str(path)!r}: {err}; {_IMAGENET_LAYOUT}") from err
    return DatasetBundle(
        name="imagenet",
        train=None,
        test=test,
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        info={"root": str(path), "n_train": 0, "n_test": len(test), "split_seed": None,
              "transform": f"resize {int(round(size * 256 / 224))}, center crop {size}, imagenet norm"},
    )


_IMAGEFOLDER_LAYOUT = (
    "expected an ImageFolder root with train/ and val/ subfolders, each holding one folder "
    "per class with that class's images (root/train/<class>/*.jpg, root/val/<class>/*.jpg); "
    "the same class folders in both"
)


@DATASETS.register("imagefolder")
def _imagefolder(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """Any user ImageFolder with train/ and val/ splits, square images of ``image_size``
    (default 224): eval transform = resize to size*256/224, center crop, ImageNet
    normalisation; train adds a seeded-by-torch random horizontal flip."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    size = image_size or 224
    path = root if root is not None else data_root() / "imagefolder"
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise FileNotFoundError(f"imagefolder: {str(path / split)!r} does not exist; {_IMAGEFOLDER_LAYOUT}")
    tr_classes, va_classes = _class_dirs(path / "train"), _class_dirs(path / "val")
    if tr_classes != va_classes or not tr_classes:
        raise ValueError(
            f"imagefolder: class folders differ or are missing under {str(path)!r} "
            f"(train: {len(tr_classes)}, val: {len(va_classes)}); {_IMAGEFOLDER_LAYOUT}"
        )
    eval_tf = _imagenet_eval_transform(size)
    train_tf = T.Compose([T.RandomHorizontalFlip(), eval_tf])
    try:
        train = ImageFolder(str(path / "train"), transform=train_tf)
        test = ImageFolder(str(path / "val"), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"imagefolder: cannot read {str(path)!r}: {err}; {_IMAGEFOLDER_LAYOUT}") from err
    return DatasetBundle(
        name="imagefolder",
        train=train,
        test=test,
        num_classes=len(tr_classes),
        in_channels=3,
        image_size=size,
        info={"root": str(path), "n_train": len(train), "n_test": len(test), "split_seed": None,
              "classes": len(tr_classes)},
    )


def _torchvision_files(name: str, cls_name: str, root: Path | None, files_hint: str,
                       mean: tuple, std: tuple, num_classes: int, in_channels: int, size: int,
                       image_size: int | None) -> DatasetBundle:
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    if image_size not in (None, size):
        raise ValueError(f"{name} images are {size}x{size}; image_size={image_size!r} is not supported")
    path = root if root is not None else data_root() / name
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    cls = getattr(tvd, cls_name)
    try:
        train = cls(str(path), train=True, download=False, transform=tf)
        test = cls(str(path), train=False, download=False, transform=tf)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        raise FileNotFoundError(
            f"{name}: files not found under {str(path)!r} ({err}); wavesweep never downloads at "
            f"run time: put torchvision's {cls_name} files there ({files_hint}) or pass root"
        ) from err
    return DatasetBundle(
        name=name, train=train, test=test, num_classes=num_classes, in_channels=in_channels,
        image_size=size,
        info={"root": str(path), "n_train": len(train), "n_test": len(test), "split_seed": None,
              "split": "official train/test"},
    )


@DATASETS.register("mnist")
def _mnist(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """torchvision MNIST from local files (``download=False``), official split."""
    return _torchvision_files("mnist", "MNIST", root, "root/MNIST/raw/train-images-idx3-ubyte, ...",
                              (0.1307,), (0.3081,), 10, 1, 28, image_size)


@DATASETS.register("cifar10")
def _cifar10(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """torchvision CIFAR-10 from local files (``download=False``), official split."""
    return _torchvision_files("cifar10", "CIFAR10", root, "root/cifar-10-batches-py/data_batch_1, ...",
                              (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, 3, 32, image_size)


def dataset_shape(name: str, *, root: str | os.PathLike | None = None,
                  image_size: int | None = None) -> dict[str, int]:
    """``{num_classes, in_channels, image_size}`` of dataset ``name`` without reading its
    images (imagefolder counts its class folders), for building a model to load weights into."""
    fixed = {
        "digits": (10, 1, 8),
        "mnist": (10, 1, 28),
        "cifar10": (10, 3, 32),
        "imagenet": (1000, 3, image_size or 224),
    }
    DATASETS.get(name)  # unknown names: the registry's error
    if name in fixed:
        c, ch, s = fixed[name]
        return {"num_classes": c, "in_channels": ch, "image_size": s}
    b = load_dataset(name, root=root, image_size=image_size)
    return {"num_classes": b.num_classes, "in_channels": b.in_channels, "image_size": b.image_size}
