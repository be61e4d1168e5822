"""Image folders read the way wavesweep checks them (imported when a file dataset is loaded).

- :class:`ImageFiles`: torchvision's ``ImageFolder`` whose classes are the folders wavesweep
  validated: hidden folders (``.ipynb_checkpoints``, ``.cache``) are not classes. Plain
  ``ImageFolder`` counts them, which shifts every label after them by one. Hidden files and
  anything in a hidden folder inside a class folder are not examples either: macOS leaves a
  ``._name.JPEG`` beside every image it copies (not an image: plain ``ImageFolder`` takes it for
  one and the evaluation stops at it), Jupyter a ``.ipynb_checkpoints`` copy of what it opened
  (an image counted twice).
- :class:`LabelledImageFiles`: image files whose labels are given, not read from folder names
  (ImageNet val kept flat, its labels in separate files: :mod:`wavesweep.imagenet_val`), read
  like :class:`ImageFiles`.
- :func:`read_image`: torchvision's PIL loader, with an unreadable file (truncated, not an
  image, gone) reported as one ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS


def class_dirs(path: str | Path) -> list[str]:
    """The class folders under ``path``: sorted, hidden ones left out."""
    return sorted(p.name for p in Path(path).iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image(path: str) -> Any:
    """``PIL.Image`` in RGB, as torchvision's ``pil_loader``; a file PIL cannot read is a ValueError."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:  # PIL.UnidentifiedImageError, a truncated
        # file, a file removed since the scan, an image over PIL's pixel limit (Image.MAX_IMAGE_PIXELS)
        raise ValueError(f"image {path!r} cannot be read ({type(exc).__name__}: {exc}); remove or replace it") from None


#: a folder whose mtime is this close to a scan's start is not remembered: file timestamps are
#: coarse (a kernel tick, ~4 ms), so a file added just after the scan could leave it unchanged
_RACY_NS = 2_000_000_000
#: (folder as given, its absolute path, its classes) -> (samples, {folder: its :func:`_folder_state`}) of a scan
_SCANS: dict[tuple[str, str, tuple[tuple[str, int], ...]],
             tuple[tuple[tuple[str, int], ...], dict[str, tuple[int, int, int]]]] = {}


def _folder_state(path: str) -> tuple[int, int, int]:
    """``(device, inode, mtime_ns)`` of the folder at ``path`` (links followed): the mtime alone
    misses another folder put in its place (class folders swapped or a link re-pointed, when their
    mtimes are equal, as an archive's extraction leaves them); the inode sees it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _mtimes_unchanged(mtimes: dict[str, tuple[int, int, int]]) -> bool:
    try:
        return all(_folder_state(d) == t for d, t in mtimes.items())
    except OSError:  # a folder gone since
        return False


def scan_image_files(directory: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``[(path, class index)]`` of the images under each class folder of ``directory``: exactly
    what torchvision's ``make_dataset`` gives with ImageFolder's extensions and hidden names (any
    hidden folder or file under ``directory``) left out, in its order (sorted folders, then sorted
    names; links followed), with paths joined onto ``directory`` as given.

    Cheaper than ``make_dataset`` with an ``is_valid_file`` (ImageNet's train split: 1.28 M files,
    see ``bench/bench_speedups.py``): hidden folders are not entered, and a name is checked alone,
    not its path made absolute and relative again. Remembered for the process (a study worker
    scans once), keyed by the folder and its classes and valid while the modification time of every
    folder it read is unchanged (an image added, removed or renamed in any of them changes its
    folder's) and each is still the same folder (its inode: class folders swapped, or a link
    re-pointed, with equal mtimes); a folder modified within :data:`_RACY_NS` of the scan is not trusted, so such a scan
    is not remembered. An image replaced in place under the same name is the same sample here (its
    pixels are read when it is decoded; :func:`wavesweep.data.data_fingerprint` sees its size).
    """
    directory = os.path.expanduser(directory)  # as make_dataset
    key = (str(directory), os.path.abspath(directory), tuple(sorted(class_to_idx.items())))
    hit = _SCANS.get(key)
    if hit is not None and _mtimes_unchanged(hit[1]):
        return list(hit[0])
    start = time.time_ns()
    exts = tuple(IMG_EXTENSIONS)
    samples: list[tuple[str, int]] = []
    mtimes: dict[str, tuple[int, int, int]] = {}
    for target_class in sorted(class_to_idx):
        index = class_to_idx[target_class]
        target_dir = os.path.join(directory, target_class)
        if not os.path.isdir(target_dir):
            continue
        walked = []
        for root, dirs, fnames in os.walk(target_dir, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # a hidden folder: nothing in it is an example
            mtimes[root] = _folder_state(root)
            walked.append((root, fnames))
        for root, fnames in sorted(walked):  # make_dataset's order: sorted(os.walk(...)), then sorted names
            for fname in sorted(fnames):
                if not fname.startswith(".") and fname.lower().endswith(exts):
                    samples.append((os.path.join(root, fname), index))
    if all(t[2] < start - _RACY_NS for t in mtimes.values()):
        _SCANS[key] = (tuple(samples), mtimes)
    return samples


class ImageFiles(ImageFolder):
    """``ImageFolder`` with :func:`class_dirs` as its classes, :func:`scan_image_files` as its
    scan (hidden names left out) and :func:`read_image` as its loader."""

    def __init__(self, root: str, transform: Any = None) -> None:
        super().__init__(root, transform=transform, loader=read_image)

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        """:func:`scan_image_files`; class folders without an image are counted, with the first named
        (ImageFolder's own error names every one of them: hundreds of names on one line)."""
        samples = scan_image_files(directory, class_to_idx)
        found = {y for _, y in samples}  # once: in the comprehension's condition it was a scan per class
        empty = sorted(c for c, i in class_to_idx.items() if i not in found)
        if empty and not allow_empty:
            raise FileNotFoundError(f"{len(empty)} of the {len(class_to_idx)} class folders in {str(directory)!r} hold "
                                    f"no image (first {empty[0]!r})")
        return samples

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_dirs(directory)
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}


class LabelledImageFiles(VisionDataset):
    """Image files with their labels given: the attributes of :class:`ImageFiles` (``root``,
    ``samples`` [(path, class index)], ``targets``, ``classes``, ``class_to_idx``, ``transform``,
    :func:`read_image` as loader), so the data fingerprint, ``dataset_targets`` and the loaders
    read it as they read an image folder. Items are ``(transform(image), class index)``."""

    def __init__(self, root: str, samples: list[tuple[str, int]], classes: list[str], transform: Any = None) -> None:
        super().__init__(root, transform=transform)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = list(samples)
        self.imgs = self.samples  # ImageFolder's alias
        self.targets = [y for _, y in self.samples]
        self.loader = read_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = self.loader(path)
        return (image if self.transform is None else self.transform(image)), target
