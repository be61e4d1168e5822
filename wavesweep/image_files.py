"""Image folders read the way wavesweep checks them (imported when a file dataset is loaded).

- :class:`ImageFiles`: torchvision's ``ImageFolder`` whose classes are the folders wavesweep
  validated: hidden folders (``.ipynb_checkpoints``, ``.cache``) are not classes. Plain
  ``ImageFolder`` counts them, which shifts every label after them by one.
- :func:`read_image`: torchvision's PIL loader, with an unreadable file (truncated, not an
  image, gone) reported as one ``ValueError`` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder


def class_dirs(path: str | Path) -> list[str]:
    """The class folders under ``path``: sorted, hidden ones left out."""
    return sorted(p.name for p in Path(path).iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image(path: str) -> Any:
    """``PIL.Image`` in RGB, as torchvision's ``pil_loader``; a file PIL cannot read is a ValueError."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except OSError as exc:  # PIL.UnidentifiedImageError, a truncated file, a file removed since the scan
        raise ValueError(f"image {path!r} cannot be read ({type(exc).__name__}: {exc}); remove or replace it") from None


class ImageFiles(ImageFolder):
    """``ImageFolder`` with :func:`class_dirs` as its classes and :func:`read_image` as its loader."""

    def __init__(self, root: str, transform: Any = None) -> None:
        super().__init__(root, transform=transform, loader=read_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_dirs(directory)
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}
