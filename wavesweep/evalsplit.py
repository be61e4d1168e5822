"""The validation/test split of a trial's evaluation examples.

A study selects (its objective, its early-stopping pruner, its best trial and what is
registered) on the **validation** part and reports the **test** part; the two are disjoint,
stratified by class and seeded, so every trial of a study with the same seed splits the same
examples the same way. ``val_fraction=0`` keeps every evaluation example in the test part.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from wavesweep import data, splits


def validation_indices(targets: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(validation, test)`` positions into ``targets``, each sorted: a stratified split
    (scikit-learn's ``train_test_split``, kept on disk by :mod:`wavesweep.splits`) with ``floor(fraction * N)`` validation examples.
    ``fraction=0``: no validation examples. Raises one-line ``ValueError`` when the examples
    cannot be split that way (a class with one example, fewer validation examples than classes)."""
    targets = np.asarray(targets)
    n = len(targets)
    positions = np.arange(n, dtype=np.int64)
    if fraction == 0:
        return positions[:0], positions
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction={fraction} must be in [0, 1)")
    if n == 0:
        raise ValueError(f"val_fraction={fraction} cannot split the evaluation examples: there are none "
                         "(the evaluation split is empty)")
    try:
        val, test = splits.train_test_split_indices(n, train_size=fraction, stratify=targets, seed=seed)
    except ValueError:
        labels, counts = np.unique(targets, return_counts=True)
        why = (f"class {labels[counts.argmin()]} has {counts.min()} example(s)" if counts.min() < 2
               else f"each part needs at least one example of each of the {len(labels)} classes")
        raise ValueError(
            f"val_fraction={fraction} cannot split {n} evaluation examples into stratified validation and test "
            f"parts: {why}; raise eval_limit or set val_fraction=0"
        ) from None
    return np.sort(val), np.sort(test)


def split_eval_set(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset | None, Dataset]:
    """``(validation, test)`` parts of ``dataset`` (validation None when ``fraction`` is 0)."""
    if fraction == 0:
        return None, dataset
    val, test = validation_indices(data.dataset_targets(dataset), fraction, seed)
    return data.take(dataset, val), data.take(dataset, test)
