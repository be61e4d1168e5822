"""scikit-learn's stratified splits and its bundled digits, kept on disk once computed.

A trial needs two things from scikit-learn: the indices of ``train_test_split`` (the digits
train/test split, a study's validation/test split of the evaluation examples) and the digits
arrays of ``load_digits``. Importing scikit-learn imports ``scipy.stats`` too: 2-3 s on 2 CPU
cores, a quarter of a small trial's process (a study's worker, a ``wavesweep trial`` run). Both
are computed by scikit-learn itself, once, and kept under the cache (``WAVESWEEP_CACHE``:
``splits/`` and ``datasets/``), keyed by everything that decides them and by scikit-learn's
version; a later process reads the same arrays back without importing scikit-learn.

A cache file is used only when the key stored in it is the key asked for (a file copied over
another is computed again); one that cannot be read is computed again with a warning; one that
cannot be written (a full or read-only disk) is skipped with a debug line: the arrays are the
same either way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import numbers
import zipfile
from collections.abc import Callable

import numpy as np

from wavesweep.fileio import atomic_write
from wavesweep.store import cache_dir

log = logging.getLogger(__name__)


def _sklearn_version() -> str:
    """scikit-learn's version, read from its installed metadata (no import of scikit-learn)."""
    return importlib.metadata.version("scikit-learn")


def _cached(folder: str, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays ``compute()`` gives for ``key``: read from ``<cache>/<folder>/`` when a file of that
    key is there, else computed and written there."""
    key = f"{key}|scikit-learn {_sklearn_version()}"
    path = cache_dir() / folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return {name: z[name] for name in z.files if name != "key"}
                log.warning("cache file %s holds another computation; computing it again", path)
        # a truncated .npz is no zip (BadZipFile), an empty one no data (EOFError)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable cache file %s: %s", path, exc)
    arrays = compute()
    try:
        with atomic_write(path) as fh:
            np.savez(fh, key=np.array(key), **arrays)
    except OSError as exc:  # a cache: the arrays are right without it
        log.debug("not cached (%s): %s", path, exc)
    return arrays


def _size_key(size: float | int | None) -> str:
    """A split size as scikit-learn reads it: an int is a count, a float a fraction (so 1 and 1.0 differ)."""
    if size is None:
        return "None"
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return f"int:{int(size)}"
    return f"float:{float(size)!r}"


def train_test_split_indices(
    n: int, *, stratify: np.ndarray, seed: int, train_size: float | int | None = None,
    test_size: float | int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``train_test_split(np.arange(n), train_size=..., test_size=..., stratify=stratify,
    random_state=seed)``: its two int64 index arrays, in its order. scikit-learn's ValueError for
    a split it cannot make is raised as it is (nothing is cached).

    The key holds the labels as scikit-learn splits on them: each label's class index among the
    sorted distinct labels (``np.unique``'s inverse), not the labels' bytes (those of an object
    array are addresses). Labels ``np.unique`` cannot order, or not one per example, are split
    by scikit-learn without the cache."""
    labels = np.asarray(stratify)
    if len(labels) != n:
        raise ValueError(f"stratify has {len(labels)} labels for {n} examples")

    def compute() -> dict[str, np.ndarray]:
        from sklearn.model_selection import train_test_split

        first, second = train_test_split(np.arange(n, dtype=np.int64), train_size=train_size, test_size=test_size,
                                         stratify=labels, random_state=seed)  # fmt: skip
        return {"first": first, "second": second}

    try:
        if labels.ndim != 1:
            raise TypeError("not one label per example")
        classes, inverse = np.unique(labels, return_inverse=True)
    except TypeError:  # mixed types that do not order, labels of several columns
        out = compute()
    else:
        digest = hashlib.sha256(np.ascontiguousarray(inverse, dtype="<i8").tobytes()).hexdigest()
        key = (f"train_test_split|n={int(n)}|train_size={_size_key(train_size)}|test_size={_size_key(test_size)}"
               f"|seed={int(seed)}|classes={len(classes)}|class_of_each={digest}")  # fmt: skip
        out = _cached("splits", key, compute)
    return out["first"], out["second"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits(return_X_y=True)``: images (1797, 64) float64, labels int64."""

    def compute() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits as sklearn_load_digits

        x, y = sklearn_load_digits(return_X_y=True)
        return {"x": x, "y": y}

    out = _cached("datasets", "load_digits(return_X_y=True)", compute)
    return out["x"], out["y"]
