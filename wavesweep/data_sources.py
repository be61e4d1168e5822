"""The dataset sources, registered into :data:`wavesweep.data.DATASETS`: the embedded
default (``digits``), ImageNet-1k val (an ImageFolder, or flat with its label files:
:mod:`wavesweep.imagenet_val`) and any ImageFolder, the MNIST family (``mnist``,
``fashion-mnist``, ``kmnist``) from local IDX files (with the IDX reader and writer), and
CIFAR-10 from its python batches. Nothing here downloads anything.

Each builder returns a :class:`~wavesweep.data.DatasetBundle`; the registry, the bundle,
the in-memory :class:`~wavesweep.data.TensorImages`, the evaluation ordering and the
loaders live in :mod:`wavesweep.data`, which imports this module at its end so that every
user of ``DATASETS`` sees these entries.
"""

from __future__ import annotations

import functools
import gzip
import logging
import io
import math
import os
import pickle
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wavesweep.data import DATASETS, DatasetBundle, TensorImages, data_root, make_bundle, register_dataset
from wavesweep.fileio import atomic_write

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SYNSET = re.compile(r"^n\d{8}$")


# --------------------------------------------------------------------------- IDX files

# IDX ("ubyte") format: magic = 0x00 0x00 <type code> <ndim>, then ndim big-endian uint32
# dims, then the data, big-endian, C order. Type codes as in torchvision's reader.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in IDX file ``path`` (gzipped or not, told apart by content), native byte
    order, writable. Inverse of :func:`write_idx`. ValueError naming the file if it is not a
    well-formed IDX file (bad magic, truncated header, data size differing from the dims)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{str(path)!r}: corrupt gzip stream ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{str(path)!r}: not an IDX file: magic {raw[:4].hex() or '(empty)'}, expected 0000 then a type "
            "byte (08 uint8, 09 int8, 0b int16, 0c int32, 0d float32, 0e float64) and ndim >= 1"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(path)!r}: IDX header truncated ({len(raw)} bytes, {ndim} dims need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(path)!r}: IDX header says {dtype.newbyteorder('=').name} {tuple(dims)} ({expected} bytes) "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a copy: native order, writable


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64; ndim >= 1) as an IDX
    file, gzipped when ``path`` ends in ``.gz`` (mtime 0: same bytes every time), with
    :func:`~wavesweep.fileio.atomic_write`. Inverse of :func:`read_idx`; returns ``path``."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("=").str)
    if code is None or array.ndim < 1:
        raise ValueError(f"cannot write {array.dtype} array of ndim {array.ndim} as IDX; valid: "
                         "uint8, int8, int16, int32, float32, float64 with ndim >= 1")
    body = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body += np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if path.suffix == ".gz":
        body = gzip.compress(body, mtime=0)
    with atomic_write(path) as fh:
        fh.write(body)
    return path


@functools.lru_cache(maxsize=8)
def _idx_tensor(path: str, stamp: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Decoded IDX file, kept for repeated loads in one process (a study's trials); keyed by
    the file's ``(device, inode, size, mtime, ctime)`` so a replaced file is read again, also one of
    the same size whose mtime was set back to the old one (``cp -p``, ``rsync -t``, ``tar x`` of
    files with equal mtimes: the labels files of the MNIST family are all 60,008 or 10,008 bytes),
    which mtime and size alone took for the old file. Callers must not modify it in place."""
    return torch.from_numpy(read_idx(path))


def _read_idx_cached(path: Path) -> torch.Tensor:
    st = path.stat()
    return _idx_tensor(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))



# --------------------------------------------------------------------------- digits


@register_dataset("digits", num_classes=10, in_channels=1, image_size=8)
def _digits(root: Path | None, seed: int, image_size: int | None, test_fraction: float = 0.2) -> DatasetBundle:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes.

    Stratified split from ``seed``; pixels (0..16) scaled to [0, 1] by /16 then
    standardised with the *train* split's scalar mean and std (no test statistics leak
    into training). Held as uint8 0..16, divisor 16.
    """
    from wavesweep import splits  # scikit-learn's arrays, kept on disk: no import of it in a later process

    DATASETS.get("digits").size(image_size)
    if root is not None:
        log.warning("digits is bundled with scikit-learn: data root %s is not used", root)
    x, y = splits.load_digits()  # x float64 (1797, 64), integer values 0..16
    xf = x.astype(np.float32) / 16.0  # (1797, 64) in [0, 1]
    idx_train, idx_test = splits.train_test_split_indices(len(y), test_size=test_fraction, stratify=y, seed=seed)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    # The statistics exactly as before the uint8 storage (float32 numpy mean/std), so every
    # normalised value, and every recorded number, is unchanged.
    mean = float(xf[idx_train].mean())
    std = float(xf[idx_train].std())
    xt = torch.from_numpy(x.astype(np.uint8)).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8) uint8 0..16
    yt = torch.from_numpy(y.astype(np.int64))
    norm = dict(divisor=16.0, mean=(mean,), std=(std,))
    ti, vi = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return make_bundle(
        "digits",
        TensorImages(xt[ti].contiguous(), yt[ti].contiguous(), **norm),
        TensorImages(xt[vi].contiguous(), yt[vi].contiguous(), **norm),
        {
            "root": "sklearn.datasets.load_digits (bundled)",
            "n_train": len(idx_train),
            "n_test": len(idx_test),
            "split_seed": seed,
            "test_fraction": test_fraction,
            "norm_mean": mean,
            "norm_std": std,
        },
    )


# --------------------------------------------------------------------------- file datasets


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
    from wavesweep.image_files import class_dirs

    return class_dirs(path)


def _loose_images(path: Path) -> list[str]:
    """The names of the image files directly in ``path`` (not hidden), sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return sorted(e.name for e in os.scandir(path) if not e.name.startswith(".")
                  and has_file_allowed_extension(e.name, IMG_EXTENSIONS) and e.is_file())


_IMAGENET_LAYOUT = (
    "expected the ImageNet-1k validation set as an ImageFolder: a directory with 1000 "
    "class folders named by WordNet synset (n01440764/, n01443537/, ..., n15075141/), "
    "each holding that class's validation images (e.g. the layout produced by "
    "valprep.sh), or as distributed, flat: Kaggle's ILSVRC/Data/CLS-LOC/val/ with "
    "LOC_val_solution.csv and LOC_synset_mapping.txt, or image-net.org's ILSVRC2012_img_val/ "
    "with ILSVRC2012_devkit_t12/ (the images' folder or the folder above them; see the README); "
    "pass it as root, or put it at $WAVESWEEP_DATA/imagenet/val"
)


@register_dataset("imagenet", num_classes=1000, in_channels=3, image_size=224, resizable=True)
def _imagenet(
    root: Path | None, seed: int, image_size: int | None, expected_classes: int = 1000
) -> DatasetBundle:
    """ImageNet-1k: val (the evaluation split) with the standard torchvision eval transform
    (resize 256, center crop 224, ImageNet normalisation), and the training split where there is
    one (for recovery): the synset folders of ``train/`` beside the val images' folder
    (:func:`imagenet_train_dir`, checked by :func:`_imagenet_train`), with torchvision's training
    preset (random resized crop, horizontal flip, the same normalisation); none there, the bundle
    has no train split (``info["train_looked_for"]`` says where it was looked for). Val is read
    from either layout:

    - an ImageFolder of synset folders (``root``, or ``root/val`` when ``root`` has none);
      classes are the sorted synset folders, the standard index order the pretrained weights use;
    - flat, as Kaggle and image-net.org distribute it (where ``root`` has no synset folders): the
      images in one folder, labelled by Kaggle's ``LOC_val_solution.csv`` or image-net.org's
      devkit, found as :mod:`wavesweep.imagenet_val` says; classes are the sorted synsets, so an
      image gets the same label as in the ImageFolder.

    ``root`` None: ``$WAVESWEEP_DATA/imagenet/val``, or ``$WAVESWEEP_DATA/imagenet`` where there
    is no ``val/`` (a distribution's top folder). ``expected_classes``: the number of classes
    required (1000 for ImageNet-1k; tests pass a small number to run the real code path on a
    generated tree).
    """
    from wavesweep.image_files import ImageFiles, LabelledImageFiles
    from wavesweep.imagenet_val import flat_samples

    size = DATASETS.get("imagenet").size(image_size)
    if root is not None:
        path = root
    else:
        top = data_root() / "imagenet"
        path = top / "val" if (top / "val").is_dir() or not top.is_dir() else top
    if not path.is_dir():
        raise FileNotFoundError(f"imagenet: directory {str(path)!r} does not exist; {_IMAGENET_LAYOUT}")
    given, classes = path, _class_dirs(path)
    if (path / "val").is_dir() and not any(_SYNSET.match(c) for c in classes):
        # root given as the ImageNet top directory (train/, val/, ...)
        path = path / "val"
        classes = _class_dirs(path)
    info: dict[str, Any] = {}
    transform = _imagenet_eval_transform(size)
    # no synset folders: the flat layout, looked for from the folder given (which may be its top)
    flat = None if any(_SYNSET.match(c) for c in classes) else flat_samples(given, expected_classes)
    if flat is not None:  # the images in one folder, the labels in a file
        path, labels, samples = flat
        test = LabelledImageFiles(str(path), samples, list(labels.classes), transform=transform)
        classes, info = list(labels.classes), {"labels": str(labels.source)}
    else:
        bad = [c for c in classes if not _SYNSET.match(c)]
        if len(classes) != expected_classes or bad:
            what = f"{len(classes)} class folders" + (f", some not synset ids (e.g. {bad[0]!r})" if bad else "")
            raise ValueError(f"imagenet: malformed directory {str(path)!r}: found {what}; {_IMAGENET_LAYOUT}")
        loose = _loose_images(path)  # an ImageFolder leaves them out: the evaluation would be on the rest alone
        if loose:
            raise ValueError(f"imagenet: {str(path)!r} holds {len(loose)} images beside its {len(classes)} class folders "
                             f"(first {loose[0]!r}), in no class; expected every image in its synset folder "
                             "(did valprep.sh stop part way?)")
        try:
            test = ImageFiles(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as err:  # e.g. a class folder without images
            raise ValueError(f"imagenet: cannot read {str(path)!r}: {err}; {_IMAGENET_LAYOUT}") from err
    train, train_info = _imagenet_train(path, classes, size)
    return make_bundle(
        "imagenet", train, test,
        {"root": str(path), "n_train": 0 if train is None else len(train), "n_test": len(test), "split_seed": None,
         "transform": f"resize {int(round(size * 256 / 224))}, center crop {size}, imagenet norm", **info, **train_info},
        num_classes=len(classes), image_size=size,
    )


def _imagenet_train_transform(image_size: int = 224):
    """torchvision's ImageNet classification training preset at ``image_size``: random resized
    crop (scale 0.08-1, ratio 3/4-4/3), horizontal flip, the eval transform's normalisation."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_train_dir(val_dir: Path) -> Path:
    """Where ImageNet's training split is looked for, given the folder of the validation images:
    ``train/`` beside it. That is ``<top>/train`` for ``<top>/val`` (the ImageFolder, also when
    the val folder itself is the data root), Kaggle's ``ILSVRC/Data/CLS-LOC/train`` beside its
    ``.../CLS-LOC/val``, and ``<top>/train`` beside image-net.org's ``<top>/ILSVRC2012_img_val``
    (its train tar extracted per class, the usual layout). A folder given as ``.`` or ending in
    ``..`` (``--data-root .`` in the val folder) is made absolute first (``..`` resolved as in
    :func:`wavesweep.imagenet_val.label_dirs`): as written it has no parent (``Path('.').parent``
    is ``.``), and ``train/`` was looked for inside the val folder."""
    val_dir = Path(val_dir)
    if val_dir.name in ("", ".."):
        val_dir = Path(os.path.abspath(val_dir))
    return val_dir.parent / "train"


_IMAGENET_TRAIN_LAYOUT = (
    "expected ImageNet's training images as an ImageFolder: one folder per synset of the validation "
    "set (the same synsets, so the same labels), each holding that class's training images, as the "
    "train tar extracted per class (train/n01440764/n01440764_10026.JPEG)"
)


def _imagenet_train(val_dir: Path, classes: list[str], size: int) -> tuple[Any, dict[str, Any]]:
    """``(train split or None, its info)``: the ImageFolder at :func:`imagenet_train_dir`, whose
    class folders must be exactly ``classes`` (the validation set's synsets, sorted: class index =
    position, so a synset has one label in both splits), with the training transform
    (:func:`_imagenet_train_transform`). No such folder: None, and the info says where it was
    looked for (recovery needs it). A folder there that is not that split (another set of synsets,
    images beside the class folders, a class folder without images: an unrelated ``train/`` beside
    a val folder given alone, a train tar extracted part way) is not used either: the validation set
    is evaluated as without it (``recovery=none`` works), with a warning, and the info keeps the one
    line saying why (``train_unusable``), which a recovery that needs the split then stops with."""
    where = imagenet_train_dir(val_dir)
    if not where.is_dir():
        return None, {"train_looked_for": str(where)}
    try:
        train = _imagenet_train_folder(where, val_dir, classes, size)
    except ValueError as err:
        log.warning("%s: the training split is not used (recovery needs it)", err)
        return None, {"train_looked_for": str(where), "train_unusable": str(err)}
    return train, {"train_root": str(where), "train_transform": f"random resized crop {size}, horizontal flip, imagenet norm"}


def _imagenet_train_folder(where: Path, val_dir: Path, classes: list[str], size: int) -> Any:
    """The checks and the ImageFolder of :func:`_imagenet_train`: a one-line ValueError naming the
    folder and what was expected."""
    from wavesweep.image_files import ImageFiles

    q = repr(str(where))
    found = _class_dirs(where)
    if found != list(classes):
        only_tr = [c for c in found if c not in set(classes)]
        only_va = [c for c in classes if c not in set(found)]
        diff = "".join(f"; {len(o)} only in {s} (first {o[0]!r})"
                       for s, o in (("train/", only_tr), ("the validation set", only_va)) if o)
        raise ValueError(f"imagenet: training folder {q} holds {len(found)} class folders, not the {len(classes)} "
                         f"synsets of the validation set {str(val_dir)!r}{diff}; {_IMAGENET_TRAIN_LAYOUT}")
    if loose := _loose_images(where):  # an ImageFolder leaves them out: the split would be the rest alone
        raise ValueError(f"imagenet: training folder {q} holds {len(loose)} images beside its {len(found)} class folders "
                         f"(first {loose[0]!r}), in no class; {_IMAGENET_TRAIN_LAYOUT}")
    try:
        return ImageFiles(str(where), transform=_imagenet_train_transform(size))
    except (FileNotFoundError, RuntimeError) as err:  # a class folder without images
        raise ValueError(f"imagenet: cannot read training folder {q}: {err}; {_IMAGENET_TRAIN_LAYOUT}") from err


_IMAGEFOLDER_LAYOUT = (
    "expected an ImageFolder root with train/ and val/ subfolders, each holding one folder "
    "per class with that class's images (root/train/<class>/*.jpg, root/val/<class>/*.jpg); "
    "the same class folders in both"
)


@register_dataset("imagefolder", num_classes=None, in_channels=3, image_size=224, resizable=True)
def _imagefolder(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """Any user ImageFolder with train/ and val/ splits, square images of ``image_size``
    (default 224): eval transform = resize to size*256/224, center crop, ImageNet
    normalisation; train adds a seeded-by-torch random horizontal flip."""
    from torchvision import transforms as T

    from wavesweep.image_files import ImageFiles

    size = DATASETS.get("imagefolder").size(image_size)
    path = root if root is not None else data_root() / "imagefolder"
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise FileNotFoundError(f"imagefolder: {str(path / split)!r} does not exist; {_IMAGEFOLDER_LAYOUT}")
    tr_classes, va_classes = _class_dirs(path / "train"), _class_dirs(path / "val")
    if tr_classes != va_classes or not tr_classes:
        only_tr = [c for c in tr_classes if c not in va_classes]
        only_va = [c for c in va_classes if c not in tr_classes]
        diff = "".join(f"; {len(o)} only in {s}/ (first {o[0]!r})" for s, o in (("train", only_tr), ("val", only_va)) if o)
        raise ValueError(
            f"imagefolder: class folders differ or are missing under {str(path)!r} "
            f"(train: {len(tr_classes)}, val: {len(va_classes)}{diff}); {_IMAGEFOLDER_LAYOUT}"
        )
    for split in ("train", "val"):  # an ImageFolder leaves them out: the split would be the rest alone
        if loose := _loose_images(path / split):
            raise ValueError(f"imagefolder: {str(path / split)!r} holds {len(loose)} images beside its {len(tr_classes)} "
                             f"class folders (first {loose[0]!r}), in no class; {_IMAGEFOLDER_LAYOUT}")
    eval_tf = _imagenet_eval_transform(size)
    train_tf = T.Compose([T.RandomHorizontalFlip(), eval_tf])
    try:
        train = ImageFiles(str(path / "train"), transform=train_tf)
        test = ImageFiles(str(path / "val"), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"imagefolder: cannot read {str(path)!r}: {err}; {_IMAGEFOLDER_LAYOUT}") from err
    return make_bundle(
        "imagefolder", train, test,
        {"root": str(path), "n_train": len(train), "n_test": len(test), "split_seed": None,
         "classes": len(tr_classes)},
        num_classes=len(tr_classes), image_size=size,
    )


# --------------------------------------------------------------------------- MNIST family


@dataclass(frozen=True)
class _IdxSet:
    """One MNIST-family dataset: torchvision's class name (its ``<root>/<Class>/raw/``
    folder), normalisation, and where a system package puts it."""

    cls_name: str
    mean: float
    std: float
    system_dir: Path | None = None
    apt_package: str | None = None


_IDX_SETS = {
    "mnist": _IdxSet("MNIST", 0.1307, 0.3081),
    "fashion-mnist": _IdxSet("FashionMNIST", 0.2860, 0.3530, Path("/usr/share/datasets/fashion-mnist"),
                             "dataset-fashion-mnist"),
    "kmnist": _IdxSet("KMNIST", 0.1918, 0.3483),
}
#: split -> (images file, labels file), without ``.gz``; the same names for all three sets
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _candidate_dirs(name: str, sub: Sequence[str], root: Path | None, system_dir: Path | None) -> list[Path]:
    """Where to look, in order: ``root`` and ``root/<sub>`` if given; else the same under
    ``data_root()/<name>``, ``data_root()/<sub>`` (a root shared with torchvision), then the
    system directory."""
    if root is not None:
        return [root, *(root / s for s in sub)]
    base = data_root()
    dirs = [base / name, *(base / name / s for s in sub), *(base / s for s in sub)]
    if system_dir is not None:
        dirs.append(system_dir)
    return list(dict.fromkeys(dirs))


def _find_files(dirs: Sequence[Path], stems: Sequence[str], gz: bool) -> tuple[Path, dict[str, Path]] | None:
    """The first of ``dirs`` holding every stem (``stem`` preferred, ``stem.gz`` if ``gz``)."""
    for d in dirs:
        found = {}
        for s in stems:
            for p in (d / s, *([d / f"{s}.gz"] if gz else [])):
                if p.is_file():
                    found[s] = p
                    break
        if len(found) == len(stems):
            return d, found
    return None


def _missing(name: str, dirs: Sequence[Path], stems: Sequence[str], gz: bool, how: str) -> FileNotFoundError:
    """One-line error: where it looked, what is partly there, and what to do."""
    partial = ""
    for d in dirs:
        have = [s for s in stems if (d / s).is_file() or (gz and (d / f"{s}.gz").is_file())]
        if have:
            lacking = [s for s in stems if s not in have]
            partial = f" ({str(d)!r} has {', '.join(have)} but lacks {', '.join(lacking)})"
            break
    looked = ", ".join(repr(str(d)) for d in dirs)
    return FileNotFoundError(f"{name}: files not found under {looked}{partial}; wavesweep never downloads: {how}")


def _load_idx_set(name: str, root: Path | None, image_size: int | None) -> DatasetBundle:
    spec, s = DATASETS.get(name), _IDX_SETS[name]
    spec.size(image_size)
    stems = [f for pair in _IDX_FILES.values() for f in pair]
    dirs = _candidate_dirs(name, [f"{s.cls_name}/raw"], root, None if root is not None else s.system_dir)
    hit = _find_files(dirs, stems, gz=True)
    if hit is None:
        files = ", ".join(f"{f}[.gz]" for f in stems)
        how = f"put {files} (torchvision's {s.cls_name}/raw files) in one of them, or pass their folder with --data-root (data_root in a study spec)"
        if s.apt_package:
            how = f"install Debian's package (apt install {s.apt_package}), which is found without --data-root, or {how}"
        raise _missing(name, dirs, stems, True, how)
    where, paths = hit
    splits = {}
    for split, (img_stem, lab_stem) in _IDX_FILES.items():
        images, labels = _read_idx_cached(paths[img_stem]), _read_idx_cached(paths[lab_stem])
        size = spec.image_size
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (size, size):
            raise ValueError(f"{str(paths[img_stem])!r}: expected uint8 images (N, {size}, {size}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(f"{str(paths[lab_stem])!r}: expected {images.shape[0]} uint8 labels to match "
                             f"{paths[img_stem].name}, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and int(labels.max()) >= spec.num_classes:
            raise ValueError(f"{str(paths[lab_stem])!r}: label {int(labels.max())} outside 0..{spec.num_classes - 1}")
        splits[split] = TensorImages(images.unsqueeze(1), labels.to(torch.int64),  # (N, 1, 28, 28)
                                     divisor=255.0, mean=(s.mean,), std=(s.std,))
    return make_bundle(name, splits["train"], splits["test"], {
        "root": str(where), "n_train": len(splits["train"]), "n_test": len(splits["test"]),
        "split_seed": None, "split": "official train/test", "norm_mean": s.mean, "norm_std": s.std,
    })


@register_dataset("mnist", num_classes=10, in_channels=1, image_size=28)
def _mnist(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """MNIST from local IDX files (official split; mean 0.1307, std 0.3081)."""
    return _load_idx_set("mnist", root, image_size)


@register_dataset("fashion-mnist", num_classes=10, in_channels=1, image_size=28)
def _fashion_mnist(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """Fashion-MNIST from local IDX files (official split; mean 0.2860, std 0.3530); found in
    /usr/share/datasets/fashion-mnist (Debian's ``dataset-fashion-mnist``) without root."""
    return _load_idx_set("fashion-mnist", root, image_size)


@register_dataset("kmnist", num_classes=10, in_channels=1, image_size=28)
def _kmnist(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """Kuzushiji-MNIST from local IDX files (official split; mean 0.1918, std 0.3483)."""
    return _load_idx_set("kmnist", root, image_size)


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles of dicts, lists and numpy arrays; refuse anything else,
    so a tampered file cannot run code. (``_codecs.encode``: how a protocol-2 pickle written
    by Python 3 stores bytes.)"""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` of one CIFAR-10 python batch. Pixels
    must be integers 0..255 and labels integers (any integer dtype): a cast would wrap 300 to 44,
    floor a float pixel 0.5 to 0 and a label 1.7 to 1, a silently other dataset."""
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
        if data.size and (data.dtype.kind not in "ui" or data.min() < 0 or data.max() > 255):
            what = f"{data.min()}..{data.max()}" if data.dtype.kind in "uif" else "values"
            raise ValueError(f"data holds {data.dtype} {what}, not pixel values (integers 0..255)")
        if labels.size and labels.dtype.kind not in "ui":
            raise ValueError(f"labels are {labels.dtype}, not class indices (integers)")
        data, labels = data.astype(np.uint8), labels.astype(np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise ValueError(f"{str(path)!r}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise ValueError(f"{str(path)!r}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{str(path)!r}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels  # rows are R then G then B planes, 32x32 each


@register_dataset("cifar10", num_classes=10, in_channels=3, image_size=32)
def _cifar10(root: Path | None, seed: int, image_size: int | None) -> DatasetBundle:
    """CIFAR-10 from torchvision's local python batches (``cifar-10-batches-py/``), official split."""
    DATASETS.get("cifar10").size(image_size)
    stems = [f for files in _CIFAR_FILES.values() for f in files]
    dirs = _candidate_dirs("cifar10", [_CIFAR_DIR], root, None)
    hit = _find_files(dirs, stems, gz=False)
    if hit is None:
        how = (f"put the CIFAR-10 python version ({_CIFAR_DIR}/ with {', '.join(stems)}, e.g. extracted from "
               "cifar-10-python.tar.gz) in one of them, or pass their folder with --data-root (data_root in a study spec)")
        raise _missing("cifar10", dirs, stems, False, how)
    where, paths = hit
    splits = {}
    for split, files in _CIFAR_FILES.items():
        parts = [_read_cifar_batch(paths[f]) for f in files]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        splits[split] = TensorImages(images, labels, divisor=255.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return make_bundle("cifar10", splits["train"], splits["test"], {
        "root": str(where), "n_train": len(splits["train"]), "n_test": len(splits["test"]),
        "split_seed": None, "split": "official train/test", "norm_mean": CIFAR10_MEAN, "norm_std": CIFAR10_STD,
    })
