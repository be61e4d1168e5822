"""Datasets: registry, digits split, stratified subsets, loaders, missing-file messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from wavesweep.data import (
    DATASETS,
    dataset_targets,
    eval_subset,
    load_dataset,
    make_loader,
    stratified_order,
)


def make_image_folder(root: Path, classes: list[str], per_class: int = 2, size: tuple[int, int] = (40, 36)) -> Path:
    """Write ``per_class`` random RGB JPEGs/PNGs into ``root/<class>/`` for each class."""
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            ext = "JPEG" if i % 2 == 0 else "png"
            Image.fromarray(arr).save(root / c / f"img{ci}_{i}.{ext}")
    return root


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; valid: .*digits.*imagenet.*cifar10"):
        load_dataset("nope")


def test_digits_split_is_stratified_deterministic_and_normalised():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    xa, ya = a.test.tensors
    assert xa.shape[1:] == (1, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == a.info["n_test"] == 360
    assert torch.equal(xa, b.test.tensors[0]) and torch.equal(ya, b.test.tensors[1])
    assert not torch.equal(ya, c.test.tensors[1])  # another seed, another split
    # stratified: each class's test share within one example of 20 %
    counts_test = np.bincount(ya.numpy(), minlength=10)
    counts_all = counts_test + np.bincount(a.train.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)
    xt = a.train.tensors[0]
    assert abs(xt.mean().item()) < 1e-4 and abs(xt.std().item() - 1) < 1e-3


@pytest.mark.parametrize("limit", [None, 0, 10**6])
def test_eval_subset_all(limit):
    ds = load_dataset("digits").test
    assert eval_subset(ds, limit) is ds


def test_eval_subset_stratified_and_stable():
    ds = load_dataset("digits").test
    targets = dataset_targets(ds)
    s1, s2, s3 = eval_subset(ds, 100, seed=0), eval_subset(ds, 100, seed=0), eval_subset(ds, 100, seed=1)
    assert isinstance(s1, TensorDataset) and len(s1) == 100
    assert torch.equal(s1.tensors[0], s2.tensors[0])
    assert not torch.equal(s1.tensors[0], s3.tensors[0])
    counts = np.bincount(s1.tensors[1].numpy(), minlength=10)
    expected = 100 * np.bincount(targets, minlength=10) / len(targets)
    assert np.all(np.abs(counts - expected) <= 1), (counts, expected)
    with pytest.raises(ValueError, match="eval limit"):
        eval_subset(ds, -3)


def test_stratified_order_prefixes_are_proportional():
    rng = np.random.default_rng(0)
    targets = rng.choice(7, size=700, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    order = stratified_order(targets, seed=3)
    assert sorted(order.tolist()) == list(range(700))
    share = np.bincount(targets, minlength=7) / 700
    for L in (50, 123, 350):
        counts = np.bincount(targets[order[:L]], minlength=7)
        assert np.all(np.abs(counts - L * share) <= 1.0 + 1e-9), (L, counts, L * share)


def test_make_loader_tensor_fast_path_and_shuffle_seed():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    ds = TensorDataset(x, torch.arange(10))
    batches = list(make_loader(ds, batch_size=4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))
    o1 = torch.cat([b[1] for b in make_loader(ds, batch_size=3, shuffle=True, seed=5)])
    o2 = torch.cat([b[1] for b in make_loader(ds, batch_size=3, shuffle=True, seed=5)])
    assert torch.equal(o1, o2) and sorted(o1.tolist()) == list(range(10))
    assert not torch.equal(o1, torch.arange(10))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, batch_size=0)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_sets_missing_files_message(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{name}: files not found under .*never downloads"):
        load_dataset(name, root=tmp_path)


def test_imagenet_missing_dir_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*1000 class folders named by WordNet synset"):
        load_dataset("imagenet", root=tmp_path / "absent")


def test_imagenet_malformed_dir_message(tmp_path):
    root = make_image_folder(tmp_path / "val", ["n00000001", "n00000002", "n00000003"], per_class=1)
    with pytest.raises(ValueError, match=r"malformed directory.*found 3 class folders.*expected"):
        load_dataset("imagenet", root=root)
    bad = make_image_folder(tmp_path / "bad", ["cat", "dog"], per_class=1)
    with pytest.raises(ValueError, match=r"not synset ids \(e.g. 'cat'\)"):
        load_dataset("imagenet", root=bad, expected_classes=2)


def test_imagenet_generated_folder_loads_with_eval_transform(tmp_path):
    classes = ["n00000001", "n00000002", "n00000003", "n00000004"]
    root = make_image_folder(tmp_path / "imagenet" / "val", classes, per_class=3, size=(300, 270))
    b = load_dataset("imagenet", root=tmp_path / "imagenet", expected_classes=4)  # top dir: finds val/
    assert b.train is None and b.num_classes == 4 and len(b.test) == 12 and b.image_size == 224
    x, y = b.test[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    assert b.info["root"] == str(root)
    assert dataset_targets(b.test).tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    sub = eval_subset(b.test, 4, seed=0)
    assert sorted(dataset_targets(sub).tolist()) == [0, 1, 2, 3]


def test_imagefolder_train_val_and_size(tmp_path):
    make_image_folder(tmp_path / "train", ["a", "b"], per_class=3)
    make_image_folder(tmp_path / "val", ["a", "b"], per_class=2)
    b = load_dataset("imagefolder", root=tmp_path, image_size=32)
    assert b.num_classes == 2 and len(b.train) == 6 and len(b.test) == 4
    assert b.test[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        load_dataset("imagefolder", root=tmp_path / "nothing")


def test_registry_names():
    assert set(DATASETS.names()) >= {"digits", "imagenet", "imagefolder", "mnist", "cifar10"}
