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
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder, VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension


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


class ImageFiles(ImageFolder):
    """``ImageFolder`` with :func:`class_dirs` as its classes and :func:`read_image` as its loader."""

    def __init__(self, root: str, transform: Any = None) -> None:
        top = os.path.abspath(root)

        def is_valid_file(path: str) -> bool:  # ImageFolder's extensions, hidden names left out
            parts = os.path.relpath(os.path.abspath(path), top).split(os.sep)
            return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)

        super().__init__(root, transform=transform, loader=read_image, is_valid_file=is_valid_file)

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        """ImageFolder's samples; class folders without an image are counted, with the first named
        (ImageFolder's own error names every one of them: hundreds of names on one line)."""
        samples = super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty=True)
        empty = sorted(set(class_to_idx) - {c for c, i in class_to_idx.items() if i in {y for _, y in samples}})
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
