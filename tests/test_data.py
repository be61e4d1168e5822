"""Datasets (wavesweep.data, wavesweep.data_sources): registry and shapes, IDX/CIFAR
readers, in-memory uint8 datasets, digits split, stratified subsets, loaders, missing-file
messages."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from wavesweep import data as D
from wavesweep.data import (
    DATASETS,
    TensorImages,
    dataset_shape,
    dataset_targets,
    eval_batches,
    eval_subset,
    load_dataset,
    make_loader,
    stratified_order,
    take,
)
from wavesweep.config import TrialConfig
from wavesweep.data_sources import read_idx, write_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


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


def make_idx_set(directory: Path, n_train: int = 30, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    """Write a tiny MNIST-family set (28x28 uint8 images, labels 0..9) as the four IDX files
    into ``directory``, gzipped or not. Returns the arrays by stem."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)[rng.permutation(n)]
    for stem, arr in arrays.items():
        write_idx(directory / (f"{stem}.gz" if gz else stem), arr)
    return arrays


def make_cifar_batches(root: Path, per_batch: int = 12, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny CIFAR-10 python version (root/cifar-10-batches-py/data_batch_1..5, test_batch)
    as the real files are: pickled dicts with uint8 ``data`` (N, 3072) and a ``labels`` list."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": []}, f, protocol=2)
        out[name] = (data, labels)
    return out


def fake_root(name: str, tmp: Path) -> tuple[Path | None, dict]:
    """(root, load options) holding a tiny generated copy of dataset ``name`` in its real format."""
    if name == "digits":
        return None, {}
    if name in TV_CLASS:
        make_idx_set(tmp / TV_CLASS[name] / "raw", gz=False)  # torchvision's layout
        return tmp, {}
    if name == "cifar10":
        make_cifar_batches(tmp)
        return tmp, {}
    if name == "imagenet":
        make_image_folder(tmp / "val", ["n00000001", "n00000002", "n00000003"], per_class=1)
        return tmp, {"expected_classes": 3}
    if name == "imagefolder":
        make_image_folder(tmp / "train", ["a", "b", "c"], per_class=1)
        make_image_folder(tmp / "val", ["a", "b", "c"], per_class=1)
        return tmp, {}
    raise AssertionError(f"no fake files for dataset {name!r}: add them to fake_root")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; valid: .*digits.*imagenet.*cifar10"):
        load_dataset("nope")


def test_digits_split_is_stratified_deterministic_and_normalised():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    assert isinstance(a.test, TensorImages) and a.test.images.dtype == torch.uint8
    xa, ya = a.test[:]
    assert xa.shape == (360, 1, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == a.info["n_test"] == 360
    assert torch.equal(xa, b.test[:][0]) and torch.equal(ya, b.test.targets)
    assert not torch.equal(ya, c.test.targets)  # another seed, another split
    # stratified: each class's test share within one example of 20 %
    counts_test = np.bincount(ya.numpy(), minlength=10)
    counts_all = counts_test + np.bincount(a.train.targets.numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)
    xt = a.train[:][0]
    assert abs(xt.mean().item()) < 1e-4 and abs(xt.std().item() - 1) < 1e-3


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_values_equal_the_old_float_standardisation_bit_for_bit(seed):
    """The uint8 storage gives exactly the float32 values the old path stored, so every
    recorded number (trained bases, metrics) is unchanged."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    # the old _digits, verbatim
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16.0
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    mean, std = float(x[idx_train].mean()), float(x[idx_train].std())
    xt = torch.from_numpy((x - mean) / std).reshape(-1, 1, 8, 8)
    old_train, old_test = xt[torch.from_numpy(idx_train)], xt[torch.from_numpy(idx_test)]

    b = load_dataset("digits", seed=seed)
    assert (b.info["norm_mean"], b.info["norm_std"]) == (mean, std)
    for old, new in ((old_train, b.train), (old_test, b.test)):
        assert torch.equal(new[:][0], old)  # one batch
        assert torch.equal(torch.stack([new[i][0] for i in range(len(new))]), old)  # item by item
        assert torch.equal(torch.cat([xb for xb, _ in make_loader(new, batch_size=100)]), old)
    assert torch.equal(b.test.targets, torch.from_numpy(y[idx_test].astype(np.int64)))


@pytest.mark.parametrize("limit", [None, 0, 10**6])
def test_eval_subset_all(limit):
    ds = load_dataset("digits").test
    assert eval_subset(ds, limit) is ds


def test_eval_subset_stratified_and_stable():
    ds = load_dataset("digits").test
    targets = dataset_targets(ds)
    s1, s2, s3 = eval_subset(ds, 100, seed=0), eval_subset(ds, 100, seed=0), eval_subset(ds, 100, seed=1)
    assert isinstance(s1, TensorImages) and len(s1) == 100
    assert torch.equal(s1.images, s2.images)
    assert not torch.equal(s1.images, s3.images)
    idx = np.sort(stratified_order(targets, 0)[:100])
    assert torch.equal(s1[:][0], ds[:][0][torch.from_numpy(idx)])  # the same items, same values
    counts = np.bincount(s1.targets.numpy(), minlength=10)
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


@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashion-mnist", "cifar10"])
def test_local_sets_missing_files_message(name, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}: files not found under {str(tmp_path)!r}")
    assert "never downloads" in msg
    if name == "cifar10":
        assert "cifar-10-batches-py/ with data_batch_1" in msg
    else:
        assert f"{str(tmp_path / TV_CLASS[name] / 'raw')!r}" in msg  # torchvision's layout is searched
        assert "train-images-idx3-ubyte[.gz]" in msg and f"torchvision's {TV_CLASS[name]}/raw files" in msg


@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashion-mnist", "cifar10"])
def test_missing_files_message_names_the_command_line_option(name, tmp_path):
    """The user reads this at the command line: the way to point wavesweep at the files is an
    option that ``wavesweep trial`` has (it said "or pass root", the library argument's name,
    and "found without root", which reads as "without root privileges")."""
    import re

    from wavesweep import cli

    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    trial = cli.build_parser().commands["trial"]
    options = {o for a in trial._actions for o in a.option_strings}
    named = re.findall(r"--[a-z][a-z-]*", msg)
    assert named and set(named) <= options, (named, msg)
    assert not re.search(r"\b(pass|without) root\b", msg), msg
    # a study reads the same message: its setting is the spec's data_root (a key the spec takes)
    assert "--data-root (data_root in a study spec)" in msg and "data_root" in {f.name for f in fields(TrialConfig)}
    assert ("apt install dataset-fashion-mnist" in msg) == (name == "fashion-mnist")


def test_missing_default_location_lists_every_place_and_a_partial_set(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVESWEEP_DATA", str(tmp_path))
    (tmp_path / "kmnist").mkdir()
    write_idx(tmp_path / "kmnist" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("kmnist")
    msg = str(err.value)
    for d in (tmp_path / "kmnist", tmp_path / "kmnist" / "KMNIST" / "raw", tmp_path / "KMNIST" / "raw"):
        assert repr(str(d)) in msg
    assert f"({str(tmp_path / 'kmnist')!r} has train-images-idx3-ubyte but lacks train-labels-idx1-ubyte" in msg


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



def test_images_beside_the_synset_folders_are_one_line_not_left_out(tmp_path):
    """valprep.sh stopped part way leaves the images it had not moved beside the synset folders:
    ImageFolder (the oracle) leaves them out, and a trial evaluated on the rest alone without a
    word. They are one line naming the folder, their number and the first; files that are no images
    there (the script itself, a label file, a macOS ``._`` file) are not."""
    import shutil

    from torchvision.datasets import ImageFolder

    classes = ["n00000001", "n00000002", "n00000003"]
    val = make_image_folder(tmp_path / "val", classes, per_class=4)
    for name in ("valprep.sh", "LOC_val_solution.csv", "._img0_0.JPEG"):
        (val / name).write_bytes(b"not an image")
    assert len(load_dataset("imagenet", root=tmp_path, expected_classes=3).test) == 12
    for c in classes[:2]:  # the last image of two classes not moved yet
        shutil.move(val / c / sorted(os.listdir(val / c))[-1], val)
    loose = sorted(f for f in os.listdir(val) if f.endswith((".JPEG", ".png")) and not f.startswith("."))
    assert len(ImageFolder(str(val))) == 12 - len(loose) == 10  # what an ImageFolder reads
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet", root=tmp_path, expected_classes=3)
    msg = str(err.value)
    assert msg.startswith(f"imagenet: {str(val)!r} holds {len(loose)} images beside its 3 class folders "
                          f"(first {loose[0]!r}), in no class;") and "\n" not in msg



def test_class_folders_without_images_are_counted_not_all_listed(tmp_path):
    """ImageFolder's error names every class folder without an image (hundreds of synsets on one
    line when valprep.sh stopped early); the line counts them and names the first. Oracle: the
    empty folders as os.listdir sees them, and torchvision's ImageFolder refusing the tree."""
    from torchvision.datasets import ImageFolder

    classes = [f"n{i:08d}" for i in range(1, 7)]
    val = make_image_folder(tmp_path / "val", classes, per_class=1)
    for c in classes[1::2]:
        for f in os.listdir(val / c):
            os.remove(val / c / f)
    (val / classes[1] / "._img.JPEG").write_bytes(b"AppleDouble")  # no image: the folder is still empty
    empty = sorted(c for c in classes if not [f for f in os.listdir(val / c) if not f.startswith(".")])
    assert empty == classes[1::2]
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(val))
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet", root=tmp_path, expected_classes=6)
    msg = str(err.value)
    assert msg.startswith(f"imagenet: cannot read {str(val)!r}: 3 of the 6 class folders in {str(val)!r} hold no "
                          f"image (first {empty[0]!r}); expected") and "\n" not in msg
    assert not any(c in msg for c in empty[1:])


# --------------------------------------------------------------------------- ImageNet val, flat

#: in ILSVRC2012_ID order (ID = position + 1), not sorted, as in the real devkit (ID 1 is n02119789)
FLAT_SYNSETS = ["n02119789", "n01440764", "n04591713", "n01443537"]


def write_val_images(directory: Path, synsets: list[str], per_class: int = 2, seed: int = 0) -> dict[str, str]:
    """``per_class`` small JPEGs per synset, named ILSVRC2012_val_<8 digits> with the numbers
    shuffled across the classes (as in the real set), flat in ``directory``; file name -> synset."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    numbers = rng.permutation(len(synsets) * per_class) + 1
    truth = {}
    for j, i in enumerate(numbers):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        Image.fromarray(rng.integers(0, 256, size=(18, 22, 3), dtype=np.uint8)).save(directory / name)
        truth[name] = synsets[j % len(synsets)]
    return dict(sorted(truth.items()))


def write_meta_mat(path: Path, leaves: list[str], inner: int = 2) -> None:
    """The devkit's ``meta.mat``: a struct array ``synsets`` with its fields; ``leaves`` get
    ILSVRC2012_ID 1.. (num_children 0), then ``inner`` WordNet nodes above them (children > 0)."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i + 1, w, f"words {w}", f"gloss {w}", 0, np.zeros((1, 0)), 0, 1300) for i, w in enumerate(leaves)]
    n = len(leaves)
    rows += [(n + 1 + k, f"n0999999{k}", "inner", "an inner node", 2, np.array([[1, 2]]), 1, 0) for k in range(inner)]
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"synsets": np.array(rows, dtype=[(f, "O") for f in fields]).reshape(-1, 1)})


def make_flat_val(kind: str, top: Path, synsets: list[str] = FLAT_SYNSETS, per_class: int = 2) -> dict:
    """One distribution's val set as it is downloaded, under ``top``: ``kaggle`` (images in
    ILSVRC/Data/CLS-LOC/val/, LOC_val_solution.csv and LOC_synset_mapping.txt at the top, rows
    and mapping lines in no sorted order) or ``devkit`` (images in ILSVRC2012_img_val/,
    ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt, meta.mat}).
    Returns the paths and ``truth``: file name -> synset."""
    rng = np.random.default_rng(1)
    if kind == "kaggle":
        images = top / "ILSVRC" / "Data" / "CLS-LOC" / "val"
        truth = write_val_images(images, synsets, per_class)
        rows = [f"{Path(n).stem},{s} 1 2 30 40 {s} 5 6 7 8" for n, s in truth.items()]
        labels = top / "LOC_val_solution.csv"
        labels.write_text("ImageId,PredictionString\n" + "\n".join(rows[i] for i in rng.permutation(len(rows))) + "\n")
        meta = top / "LOC_synset_mapping.txt"
        meta.write_text("".join(f"{s} words for {s}, more words\n" for s in synsets))
    else:
        images = top / "ILSVRC2012_img_val"
        truth = write_val_images(images, synsets, per_class)
        devkit = top / "ILSVRC2012_devkit_t12"
        meta, labels = devkit / "data" / "meta.mat", devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
        write_meta_mat(meta, synsets)
        ids = [synsets.index(truth[f"ILSVRC2012_val_{i:08d}.JPEG"]) + 1 for i in range(1, len(truth) + 1)]
        labels.write_text("".join(f"{i}\n" for i in ids))
    return {"top": top, "images": images, "labels": labels, "meta": meta, "truth": truth}


def class_tree(flat: dict, root: Path) -> Path:
    """The same image files arranged as an ImageFolder of synset folders (valprep.sh's layout)."""
    import shutil

    for name, synset in flat["truth"].items():
        (root / synset).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(flat["images"] / name, root / synset / name)
    return root


@pytest.mark.parametrize("given", ["top", "images", "beside"])
@pytest.mark.parametrize("kind", ["kaggle", "devkit"])
def test_flat_val_gives_the_labels_of_the_class_folder_tree(kind, given, tmp_path):
    """The flat layouts, passed as the distribution's top, as the images' folder, or as the
    images' folder with the label files moved beside it (in it), give the samples and labels
    torchvision's ImageFolder gives over the same files as synset folders (the oracle), and the
    same tensors as wavesweep's folder layout; a macOS ``._`` file beside the images is no image."""
    import shutil

    from torchvision.datasets import ImageFolder

    flat = make_flat_val(kind, tmp_path / kind)
    tree = class_tree(flat, tmp_path / "tree")
    (flat["images"] / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    if given == "beside":  # the label files in the images' folder itself
        for f in (flat["labels"], flat["meta"]) if kind == "kaggle" else (flat["labels"].parents[1],):
            shutil.move(f, flat["images"] / f.name)
    root = flat["top"] if given == "top" else flat["images"]
    files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in flat["top"].rglob("*")}
    b = load_dataset("imagenet", root=root, expected_classes=4, image_size=16)
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in flat["top"].rglob("*")} == files  # read only
    oracle = ImageFolder(str(tree))
    assert b.num_classes == 4 and b.train is None and b.info["root"] == str(flat["images"])
    assert b.test.classes == oracle.classes == sorted(FLAT_SYNSETS)
    got = {Path(p).name: y for p, y in b.test.samples}
    assert got == {Path(p).name: y for p, y in oracle.samples} and len(got) == len(b.test) == 8
    assert {n: b.test.classes[y] for n, y in got.items()} == flat["truth"]
    assert sorted(dataset_targets(b.test).tolist()) == sorted(oracle.targets)
    folder = load_dataset("imagenet", root=tree, expected_classes=4, image_size=16).test
    by_name = {Path(p).name: i for i, (p, _) in enumerate(folder.samples)}
    for i in (0, 5):
        x, y = b.test[i]
        fx, fy = folder[by_name[Path(b.test.samples[i][0]).name]]
        assert y == fy and x.shape == (3, 16, 16) and torch.equal(x, fx)


def test_flat_val_loads_from_the_default_root_and_evaluates_in_worker_processes(tmp_path, monkeypatch):
    """Kaggle's download unpacked at $WAVESWEEP_DATA/imagenet (no val/ there) is found without a
    root, and its images are decoded by a DataLoader worker like an ImageFolder's."""
    from wavesweep.evaluate import predict

    flat = make_flat_val("kaggle", tmp_path / "imagenet")
    monkeypatch.setenv("WAVESWEEP_DATA", str(tmp_path))
    b = load_dataset("imagenet", expected_classes=4, image_size=16)
    assert b.info["labels"] == str(flat["labels"]) and len(b.test) == 8
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    logits, targets = predict(model, b.test, batch_size=3, device="cpu", num_workers=1)
    assert logits.shape == (8, 4) and targets.tolist() == dataset_targets(b.test).tolist()


def test_flat_val_fingerprint_follows_the_files_and_labels(tmp_path):
    """The two distributions of the same files and labels are the same data; one label changed,
    or one image (and its label) left out, is other data."""
    from wavesweep.data import data_fingerprint

    def fp(root: Path) -> str:
        return data_fingerprint(load_dataset("imagenet", root=root, expected_classes=4))

    kaggle, devkit = make_flat_val("kaggle", tmp_path / "k"), make_flat_val("devkit", tmp_path / "d")
    assert fp(kaggle["top"]) == fp(devkit["top"])
    base = fp(kaggle["top"])
    lines = kaggle["labels"].read_text().splitlines()
    row = lines[1].split(",")
    other = next(s for s in FLAT_SYNSETS if s != row[1].split()[0])
    kaggle["labels"].write_text("\n".join([lines[0], f"{row[0]},{other} 1 2 3 4", *lines[2:]]) + "\n")
    relabelled = fp(kaggle["top"])
    kaggle["labels"].write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    (kaggle["images"] / f"{row[0]}.JPEG").unlink()
    assert len({base, relabelled, fp(kaggle["top"])}) == 3


def _replace_line(path: Path, k: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[k] = text
    path.write_text("\n".join(lines) + "\n")


def _append_line(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text + "\n")


def _drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(True)[:-1]))


def _new_image(path: Path) -> None:
    Image.new("RGB", (8, 8)).save(path)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def _savemat(path: Path, content: dict) -> None:
    from scipy.io import savemat

    savemat(path, content)


#: fault -> (layout, what is done to the generated files, the error, its message, the key of
#: make_flat_val's file the message must name)
FLAT_FAULTS = {
    "kaggle-label-of-an-absent-image": (
        "kaggle", lambda f: (f["images"] / "ILSVRC2012_val_00000003.JPEG").unlink(),
        ValueError, r"labels 1 images that are not in .*'ILSVRC2012_val_00000003'", "labels"),
    "kaggle-image-without-label": (
        "kaggle", lambda f: _new_image(f["images"] / "extra.JPEG"),
        ValueError, r"holds 1 images that .* does not label \(first 'extra.JPEG'\)", "images"),
    "kaggle-synset-not-in-mapping": (
        "kaggle", lambda f: _replace_line(f["labels"], 2, "ILSVRC2012_val_00000002,n09999999 1 2 3 4"),
        ValueError, r"line 3: synset n09999999 of ILSVRC2012_val_00000002 is not among the 4 in .*LOC_synset_mapping",
        "labels"),
    "kaggle-fewer-classes": (
        "kaggle", lambda f: f["meta"].write_text("".join(f"{s} w\n" for s in FLAT_SYNSETS[:3])),
        ValueError, r"lists 3 synsets; expected 4", "meta"),
    "kaggle-mapping-missing": (
        "kaggle", lambda f: f["meta"].unlink(),
        FileNotFoundError, r"does not exist; expected beside LOC_val_solution.csv", "meta"),
    "kaggle-mapping-line": (
        "kaggle", lambda f: _replace_line(f["meta"], 1, "tench, Tinca tinca"),
        ValueError, r"line 2 is 'tench, Tinca tinca'; expected a synset id", "meta"),
    "kaggle-header": (
        "kaggle", lambda f: _replace_line(f["labels"], 0, "id,label"),
        ValueError, r"starts with 'id,label'; expected the header 'ImageId,PredictionString'", "labels"),
    "kaggle-row-without-synset": (
        "kaggle", lambda f: _replace_line(f["labels"], 4, "ILSVRC2012_val_00000004,"),
        ValueError, r"line 5 is 'ILSVRC2012_val_00000004,'; expected an image id", "labels"),
    "kaggle-image-twice": (
        "kaggle", lambda f: _append_line(f["labels"], f["labels"].read_text().splitlines()[1]),
        ValueError, r"line 10: ILSVRC2012_val_\d+ again \(first on line 2\)", "labels"),
    "devkit-without-meta": (
        "devkit", lambda f: f["meta"].unlink(),
        FileNotFoundError, r"the devkit lacks .*data/meta.mat'; expected the synsets", "meta"),
    "devkit-without-ground-truth": (
        "devkit", lambda f: f["labels"].unlink(),
        FileNotFoundError, r"the devkit lacks .*data/ILSVRC2012_validation_ground_truth.txt'; expected the ILSVRC2012_ID",
        "labels"),
    "devkit-id-not-a-leaf": (  # ID 5: an inner WordNet node
        "devkit", lambda f: _replace_line(f["labels"], 2, "5"),
        ValueError, r"line 3 is '5'; expected the ILSVRC2012_ID of ILSVRC2012_val_00000003, one of the 4 leaf classes "
                    r"in .*meta.mat' \(1..4\)", "labels"),
    "devkit-fewer-labels-than-images": (
        "devkit", lambda f: _drop_last_line(f["labels"]),
        ValueError, r"holds 1 images that .* does not label \(first 'ILSVRC2012_val_00000008.JPEG'\)", "labels"),
    "devkit-label-of-an-absent-image": (
        "devkit", lambda f: _append_line(f["labels"], "1"),
        ValueError, r"labels 1 images that are not in .*'ILSVRC2012_val_00000009'", "labels"),
    "devkit-fewer-classes": (
        "devkit", lambda f: write_meta_mat(f["meta"], FLAT_SYNSETS[:3]),
        ValueError, r"has 3 leaf synsets \(num_children 0\); expected 4", "meta"),
    "devkit-meta-not-a-mat-file": (
        "devkit", lambda f: f["meta"].write_text("not a MAT-file"),
        ValueError, r"cannot be read as a MAT-file", "meta"),
    "devkit-meta-without-synsets": (
        "devkit", lambda f: _savemat(f["meta"], {"other": np.zeros(3)}),
        ValueError, r"holds no 'synsets'", "meta"),
    "two-images-of-one-name": (
        "devkit", lambda f: _new_image(f["images"] / "ILSVRC2012_val_00000001.png"),
        ValueError, r"holds both 'ILSVRC2012_val_00000001.JPEG' and 'ILSVRC2012_val_00000001.png'", "images"),
    "images-without-label-files": (
        "devkit", lambda f: _remove_tree(f["meta"].parents[1]),
        FileNotFoundError, r"holds 8 images but no labels for them: looked for LOC_val_solution.csv .* or "
                           r"ILSVRC2012_devkit_t12/", "images"),
    "label-files-without-images": (
        "kaggle", lambda f: _remove_tree(f["top"] / "ILSVRC"),
        FileNotFoundError, r"found the labels .* but no images: looked for image files directly in", "labels"),
}


@pytest.mark.parametrize("fault", FLAT_FAULTS)
def test_a_malformed_flat_val_is_one_line_naming_the_file(fault, tmp_path):
    kind, break_it, error, pattern, names = FLAT_FAULTS[fault]
    flat = make_flat_val(kind, tmp_path / "top")
    assert len(load_dataset("imagenet", root=flat["top"], expected_classes=4).test) == 8  # whole, it loads
    break_it(flat)
    with pytest.raises(error, match=pattern) as err:
        load_dataset("imagenet", root=flat["top"], expected_classes=4)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("imagenet: ") and repr(str(flat[names])) in msg



@pytest.mark.parametrize("kind", ["kaggle", "devkit"])
def test_a_distribution_whose_val_was_sorted_into_synset_folders_names_that_folder(kind, tmp_path):
    """valprep.sh run where the images were unpacked (Kaggle's ILSVRC/Data/CLS-LOC/val/,
    image-net.org's ILSVRC2012_img_val/), the top of the download given: the error said only that
    the label files were found but no images, though that folder holds all of them. It names the
    folder of synset folders, which loads as the ImageFolder layout (oracle: torchvision's
    ImageFolder over it)."""
    from torchvision.datasets import ImageFolder

    flat = make_flat_val(kind, tmp_path / kind)
    class_tree(flat, flat["images"])
    for name in flat["truth"]:
        (flat["images"] / name).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("imagenet", root=flat["top"], expected_classes=4)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"imagenet: found the labels {str(flat['labels'])!r} but no images")
    assert f"; {str(flat['images'])!r} holds 4 synset folders: for that ImageFolder layout pass it as the data root" in msg
    b = load_dataset("imagenet", root=flat["images"], expected_classes=4)
    oracle = ImageFolder(str(flat["images"]))
    assert b.test.samples == oracle.samples and b.test.classes == oracle.classes == sorted(FLAT_SYNSETS)


def test_the_flat_layout_needs_1000_classes_unless_told_otherwise(tmp_path):
    flat = make_flat_val("devkit", tmp_path)
    with pytest.raises(ValueError, match=r"meta.mat' has 4 leaf synsets \(num_children 0\); expected 1000"):
        load_dataset("imagenet", root=flat["images"])


def test_imagefolder_train_val_and_size(tmp_path):
    make_image_folder(tmp_path / "train", ["a", "b"], per_class=3)
    make_image_folder(tmp_path / "val", ["a", "b"], per_class=2)
    b = load_dataset("imagefolder", root=tmp_path, image_size=32)
    assert b.num_classes == 2 and len(b.train) == 6 and len(b.test) == 4
    assert b.test[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        load_dataset("imagefolder", root=tmp_path / "nothing")


def test_imagefolder_class_mismatch_names_the_differing_folders(tmp_path):
    """train/ and val/ with the same number of class folders but different names said only
    "(train: 2, val: 2)": nothing told which folder to rename."""
    make_image_folder(tmp_path / "train", ["cat", "dog"], per_class=1)
    make_image_folder(tmp_path / "val", ["cat", "dgo"], per_class=1)
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", root=tmp_path, image_size=16)
    msg = str(err.value)
    assert "\n" not in msg and "1 only in train/ (first 'dog')" in msg and "1 only in val/ (first 'dgo')" in msg


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagefolder_images_beside_the_class_folders_are_one_line_not_left_out(tmp_path, split):
    """An image directly in train/ or val/ belongs to no class: torchvision's ImageFolder (the
    oracle) leaves it out, so the split was the rest alone, without a word. One line naming the
    folder, the number and the first; a file there that is no image is not one."""
    import shutil

    from torchvision.datasets import ImageFolder

    for sp in ("train", "val"):
        make_image_folder(tmp_path / sp, ["a", "b"], per_class=3)
    (tmp_path / split / "notes.txt").write_text("not an image")
    assert len(load_dataset("imagefolder", root=tmp_path, image_size=16).test) == 6
    moved = sorted(os.listdir(tmp_path / split / "a"))[0]
    shutil.move(tmp_path / split / "a" / moved, tmp_path / split)
    assert len(ImageFolder(str(tmp_path / split))) == 5  # what an ImageFolder reads
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", root=tmp_path, image_size=16)
    msg = str(err.value)
    assert msg.startswith(f"imagefolder: {str(tmp_path / split)!r} holds 1 images beside its 2 class folders "
                          f"(first {moved!r}), in no class;") and "\n" not in msg


def test_hidden_folders_are_not_classes_and_labels_match_torchvision(tmp_path):
    """A hidden folder (``.ipynb_checkpoints``, ``.cache``) beside the classes is no class: the
    labels equal torchvision's ImageFolder over the same tree without it (the oracle), where a
    plain ImageFolder would shift every label after it by one. An empty hidden folder too."""
    from torchvision.datasets import ImageFolder

    clean = tmp_path / "clean"
    for split, n in (("train", 2), ("val", 2)):
        make_image_folder(clean / split, ["Dog", "cat"], per_class=n)
    import shutil

    messy = tmp_path / "messy"
    shutil.copytree(clean, messy)
    make_image_folder(messy / "val", [".ipynb_checkpoints"], per_class=1)
    (messy / "train" / ".cache").mkdir()  # empty: plain ImageFolder refuses the tree
    b = load_dataset("imagefolder", root=messy, image_size=32)
    for split, ds in (("train", b.train), ("val", b.test)):
        oracle = ImageFolder(str(clean / split))
        assert ds.class_to_idx == oracle.class_to_idx == {"Dog": 0, "cat": 1}
        assert [(Path(f).name, y) for f, y in ds.samples] == [(Path(f).name, y) for f, y in oracle.samples]
    syn = ["n01440764", "n01443537"]
    make_image_folder(tmp_path / "inet", syn, per_class=2)
    make_image_folder(tmp_path / "inet", [".cache"], per_class=1)
    inet = load_dataset("imagenet", root=tmp_path / "inet", expected_classes=2)
    assert dataset_targets(inet.test).tolist() == [0, 0, 1, 1]


def test_hidden_files_in_class_folders_are_not_examples(tmp_path):
    """macOS's ``._img.JPEG`` beside each copied image (not an image) and a Jupyter
    ``.ipynb_checkpoints`` folder inside a class folder were examples: the evaluation stopped at
    the first ``._`` file and the checkpoint copy counted twice. The samples now equal
    torchvision's ImageFolder over the tree without them (the oracle); a dataset root that
    itself lies under a hidden folder (``~/.cache/...``) keeps every image."""
    import shutil

    from torchvision.datasets import ImageFolder

    from wavesweep.evaluate import predict

    clean = tmp_path / "clean"
    for split in ("train", "val"):
        make_image_folder(clean / split, ["Dog", "cat"], per_class=2)
    messy = tmp_path / ".cache" / "messy"
    shutil.copytree(clean, messy)
    for img in list(messy.rglob("img*")):
        (img.parent / f"._{img.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # not an image
    make_image_folder(messy / "val" / "cat", [".ipynb_checkpoints"], per_class=2)
    b = load_dataset("imagefolder", root=messy, image_size=32)
    for split, ds in (("train", b.train), ("val", b.test)):
        oracle = ImageFolder(str(clean / split))
        assert [(Path(f).relative_to(messy / split), y) for f, y in ds.samples] == \
            [(Path(f).relative_to(clean / split), y) for f, y in oracle.samples]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    logits, targets = predict(model, b.test, batch_size=2, device="cpu")
    assert logits.shape == (4, 2) and targets.tolist() == [0, 0, 1, 1]


def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path):
    """A file that is not an image: one ValueError naming it, read in this process or by a
    DataLoader worker (whose re-raised message :func:`one_line` reduces to the worker's error)."""
    from wavesweep.evaluate import predict
    from wavesweep.failures import one_line

    for split in ("train", "val"):
        make_image_folder(tmp_path / split, ["a", "b"], per_class=2)
    bad = tmp_path / "val" / "b" / "zz.png"
    bad.write_bytes(b"garbage")
    b = load_dataset("imagefolder", root=tmp_path, image_size=16)
    with pytest.raises(ValueError, match=r"image '.*zz\.png' cannot be read \(UnidentifiedImageError"):
        b.test[len(b.test) - 1]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    with pytest.raises(ValueError) as err:
        predict(net, b.test, batch_size=2, device="cpu", num_workers=1)
    assert str(err.value).startswith("Caught ValueError in DataLoader worker process 0.")
    line = one_line(err.value)
    assert line.startswith(f"image {str(bad)!r} cannot be read (UnidentifiedImageError") and "\n" not in line


def test_an_image_over_pils_pixel_limit_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (more than twice Image.MAX_IMAGE_PIXELS) is no OSError: it
    came out bare, without the file's name."""
    from PIL import Image

    for split in ("train", "val"):
        make_image_folder(tmp_path / split, ["a", "b"], per_class=1, size=(40, 36))
    b = load_dataset("imagefolder", root=tmp_path, image_size=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 36 // 3)  # 40x36 is over twice the limit
    with pytest.raises(ValueError, match=r"^image '.*img0_0\.JPEG' cannot be read \(DecompressionBombError: "):
        b.test[0]


def test_registry_names():
    assert set(DATASETS.names()) >= {"digits", "imagenet", "imagefolder", "mnist", "fashion-mnist", "kmnist", "cifar10"}


@pytest.mark.parametrize("name", DATASETS.names())
def test_registry_shape_equals_what_loading_gives(name, tmp_path):
    """Every registered dataset: its registry shape (dataset_shape) is what loading gives,
    on generated files in the dataset's real format."""
    root, options = fake_root(name, tmp_path)
    b = load_dataset(name, root=root, **options)
    shape = dataset_shape(name, root=root)
    if name == "imagenet":  # the registry says 1000 classes; the generated tree has 3
        assert shape == {"num_classes": 1000, "in_channels": 3, "image_size": 224}
        shape["num_classes"] = options["expected_classes"]
    assert shape == {"num_classes": b.num_classes, "in_channels": b.in_channels, "image_size": b.image_size}
    for split in (b.train, b.test):
        if split is None:
            continue
        x, y = split[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == (b.in_channels, b.image_size, b.image_size)
        t = dataset_targets(split)
        assert len(t) == len(split) and 0 <= t.min() and t.max() < b.num_classes
    assert b.info["n_test"] == len(b.test)


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_fixed_size_sets_refuse_another_image_size(name):
    with pytest.raises(ValueError, match=rf"{name} images are (\d+)x\1; image_size=64 is not supported"):
        dataset_shape(name, image_size=64)
    assert dataset_shape("imagenet", image_size=160)["image_size"] == 160


# --------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(1)
    for shape in [(7,), (5, 28, 28), (2, 3, 4, 5)]:
        arr = (rng.normal(size=shape) * 100).astype(dtype)
        path = write_idx(tmp_path / f"a{len(shape)}{suffix}", arr)
        back = read_idx(path)
        assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)
        assert back.flags.writeable and back.dtype.isnative


def test_idx_bytes_are_the_format_and_agree_with_torchvision(tmp_path):
    """Independent oracles: the header built by hand, and torchvision's own IDX reader."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = write_idx(tmp_path / "img-idx3-ubyte", images).read_bytes()
    assert raw == b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + images.tobytes()
    gz = write_idx(tmp_path / "img-idx3-ubyte.gz", images).read_bytes()
    assert gzip.decompress(gz) == raw
    ints = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    p = write_idx(tmp_path / "ints-idx2", ints)
    assert p.read_bytes()[:12] == b"\x00\x00\x0c\x02" + struct.pack(">2I", 2, 2)
    for path, arr in ((tmp_path / "img-idx3-ubyte", images), (p, ints)):
        assert np.array_equal(read_sn3_pascalvincent_tensor(str(path)).numpy(), arr)
        assert np.array_equal(read_idx(path), arr)


def test_idx_reader_rejects_corrupt_files_in_one_line(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 5, 5), np.uint8)).read_bytes()
    cases = {
        "magic": (b"\x12\x34" + good[2:], r"not an IDX file: magic 1234"),
        "type": (good[:2] + b"\x07" + good[3:], r"not an IDX file: magic 00000703"),
        "short": (good[:-3], r"IDX header says uint8 \(4, 5, 5\) \(100 bytes\) but the file holds 97 bytes"),
        "long": (good + b"\x00", r"but the file holds 101 bytes"),
        "header": (good[:9], r"IDX header truncated \(9 bytes, 3 dims need 16\)"),
        "empty": (b"", r"magic \(empty\)"),
    }
    for name, (content, pattern) in cases.items():
        for gz in (False, True):
            path = tmp_path / f"{name}{'.gz' if gz else ''}"
            path.write_bytes(gzip.compress(content) if gz else content)
            with pytest.raises(ValueError, match=pattern) as err:
                read_idx(path)
            assert str(err.value).startswith(repr(str(path))) and "\n" not in str(err.value)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(good)[:-10])  # truncated gzip stream
    with pytest.raises(ValueError, match=r"broken.gz'?: corrupt gzip stream"):
        read_idx(broken)
    with pytest.raises(FileNotFoundError, match="absent' does not exist"):
        read_idx(tmp_path / "absent")


# --------------------------------------------------------------------------- MNIST family, CIFAR-10


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_idx_sets_equal_torchvision_class_and_old_transform(name, tmp_path):
    """Files in torchvision's <root>/<Class>/raw layout: our uint8 dataset gives exactly what
    torchvision's own dataset class with the old ToTensor + Normalize transform gave."""
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    cls = TV_CLASS[name]
    arrays = make_idx_set(tmp_path / cls / "raw", gz=False)
    b = load_dataset(name, root=tmp_path)
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530), "kmnist": (0.1918, 0.3483)}[name]
    assert (b.info["norm_mean"], b.info["norm_std"]) == (mean, std)
    assert b.info["root"] == str(tmp_path / cls / "raw") and b.info["split"] == "official train/test"
    tf = T.Compose([T.ToTensor(), T.Normalize((mean,), (std,))])
    for train, ours in ((True, b.train), (False, b.test)):
        ref = getattr(tvd, cls)(str(tmp_path), train=train, download=False, transform=tf)
        assert len(ours) == len(ref) == (30 if train else 20)
        old = torch.stack([ref[i][0] for i in range(len(ref))])
        assert torch.equal(ours[:][0], old) and torch.equal(ours[:][1], ref.targets)
        assert all(torch.equal(ours[i][0], old[i]) and ours[i][1] == int(ref.targets[i]) for i in range(len(ref)))
        prefix = "train" if train else "t10k"
        assert np.array_equal(ours.images[:, 0].numpy(), arrays[f"{prefix}-images-idx3-ubyte"])


def test_idx_set_gzipped_in_root_and_root_overrides(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "flat", gz=True, seed=1)
    make_idx_set(tmp_path / "env" / "kmnist", gz=False, seed=2)
    monkeypatch.setenv("WAVESWEEP_DATA", str(tmp_path / "env"))
    from_env = load_dataset("kmnist")
    assert from_env.info["root"] == str(tmp_path / "env" / "kmnist")
    flat = load_dataset("kmnist", root=tmp_path / "flat")  # root wins over WAVESWEEP_DATA
    assert flat.info["root"] == str(tmp_path / "flat")
    assert not torch.equal(flat.test.images, from_env.test.images)


@pytest.mark.parametrize("gz", [False, True])
def test_an_idx_file_replaced_with_its_size_and_mtime_is_read_again(tmp_path, gz):
    """A labels file replaced, in the same process (a study worker between trials), by other labels
    of the same size whose mtime was set back to the old one (cp -p, rsync -t, tar x of files with
    equal mtimes) was taken from the decoded-file cache: the old labels were evaluated, under the old
    fingerprint. Oracle: the labels parsed from the new file."""
    import shutil

    make_idx_set(tmp_path / "set", gz=gz)
    labels = tmp_path / "set" / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))
    before = load_dataset("kmnist", root=tmp_path / "set")
    fingerprint = D.eval_fingerprint(before)
    st = labels.stat()
    other = (read_idx(labels) + 1) % 10
    replacement = write_idx(tmp_path / labels.name, other)
    assert replacement.stat().st_size == st.st_size
    shutil.copyfile(replacement, labels)  # same size, same path; the old mtime restored
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (labels.stat().st_size, labels.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = load_dataset("kmnist", root=tmp_path / "set")
    assert np.array_equal(after.test.targets.numpy(), other.astype(np.int64))
    assert D.eval_fingerprint(after) != fingerprint


def test_idx_set_with_wrong_contents_names_the_file(tmp_path):
    make_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 12, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte': label 12 outside 0..9"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte': expected 20 uint8 labels"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((30, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte': expected uint8 images \(N, 28, 28\)"):
        load_dataset("mnist", root=tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_dataset("mnist", root=tmp_path)


def test_cifar10_equals_old_pil_transform_path(tmp_path):
    """The old path: torchvision's CIFAR10 item = PIL image of the HWC array, ToTensor, Normalize."""
    from torchvision import transforms as T

    written = make_cifar_batches(tmp_path)
    b = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")  # the batches folder itself also works
    assert len(b.train) == 60 and len(b.test) == 12 and b.in_channels == 3
    tf = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    data, labels = written["test_batch"]
    old = torch.stack([tf(Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))) for row in data])
    assert torch.equal(b.test[:][0], old) and b.test.targets.tolist() == labels
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert b.train.targets.tolist() == train_labels


@pytest.mark.parametrize(("data", "labels", "needle"), [
    (np.full((12, 3072), 300, np.int64), [1] * 12, r"data holds int64 300..300, not pixel values \(integers 0..255\)"),
    (np.full((12, 3072), 0.5), [1] * 12, r"data holds float64 0.5..0.5, not pixel values"),
    (np.full((12, 3072), -1, np.int16), [1] * 12, r"data holds int16 -1..-1, not pixel values"),
    (np.zeros((12, 3072), np.uint8), [1.7] * 12, r"labels are float64, not class indices \(integers\)"),
])  # fmt: skip
def test_a_cifar10_batch_whose_values_a_cast_would_change_is_one_line(tmp_path, data, labels, needle):
    """Pixels other than integers 0..255, or labels other than integers, were cast: 300 became 44,
    0.5 became 0, a label 1.7 became 1: a silently other dataset. Integer pixels 0..255 of any
    integer dtype are the same pixels (oracle: the uint8 array)."""
    make_cifar_batches(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as f:
        pickle.dump({"labels": labels, "data": data}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch': not a CIFAR-10 python batch \(ValueError: " + needle) as err:
        load_dataset("cifar10", root=tmp_path)
    assert "\n" not in str(err.value)
    pixels = np.random.default_rng(3).integers(0, 256, size=(12, 3072))  # int64, every value a pixel
    with open(batch, "wb") as f:
        pickle.dump({"labels": list(range(10)) + [0, 1], "data": pixels}, f, protocol=2)
    b = load_dataset("cifar10", root=tmp_path)
    assert np.array_equal(b.test.images.numpy().reshape(12, 3072), pixels.astype(np.uint8))


def test_cifar10_refuses_a_pickle_with_code(tmp_path):
    import os

    make_cifar_batches(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    pattern = r"test_batch': not a CIFAR-10 python batch \(UnpicklingError: unexpected object posix.system"
    with pytest.raises(ValueError, match=pattern):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files_found_without_root(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVESWEEP_DATA", str(tmp_path))  # no local copy: the system package is used
    b = load_dataset("fashion-mnist")
    assert b.info["root"] == str(FASHION_DIR)
    assert (len(b.train), len(b.test), b.num_classes, b.in_channels, b.image_size) == (60000, 10000, 10, 1, 28)
    assert b.train.images.shape == (60000, 1, 28, 28) and b.test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(dataset_targets(b.train)).tolist() == [6000] * 10
    assert np.bincount(dataset_targets(b.test)).tolist() == [1000] * 10
    x = b.train[:][0]  # the published constants standardise the train split
    assert abs(x.mean().item()) < 2e-3 and abs(x.std().item() - 1) < 2e-3


# --------------------------------------------------------------------------- TensorImages


def _rgb_images(n: int = 37, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 5, 6), generator=g, dtype=torch.uint8)
    return TensorImages(images, torch.arange(n) % 4, divisor=255.0, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def test_tensor_images_batch_equals_items_and_the_formula():
    ds = _rgb_images()
    x, y = ds[:]
    items = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(x, items) and y.tolist() == [ds[i][1] for i in range(len(ds))]
    ref = torch.empty_like(x)  # channel by channel, as torchvision's Normalize does it
    for c, (m, s) in enumerate(zip(ds.mean, ds.std)):
        ref[:, c] = (ds.images[:, c].float() / 255 - torch.tensor(m)) / torch.tensor(s)
    assert torch.equal(x, ref)
    idx = torch.tensor([5, 0, 36, 5])
    assert torch.equal(ds[idx][0], x[idx]) and torch.equal(ds[np.array([5, 0, 36, 5])][0], x[idx])
    assert torch.equal(ds[3:9][0], x[3:9])
    sub = take(ds, np.array([4, 1, 2]))
    assert isinstance(sub, TensorImages) and torch.equal(sub[:][0], x[[4, 1, 2]])
    assert dataset_targets(sub).tolist() == [0, 1, 2] and dataset_targets(sub).dtype == np.int64
    assert ds.to("cpu") is ds


def test_tensor_images_rejects_bad_inputs():
    u8 = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="images must be uint8"):
        TensorImages(u8.float(), torch.zeros(2, dtype=torch.int64), divisor=1, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match=r"targets must be int64 \(2,\)"):
        TensorImages(u8, torch.zeros(3, dtype=torch.int64), divisor=1, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="need 1 means, 1 positive stds"):
        TensorImages(u8, torch.zeros(2, dtype=torch.int64), divisor=1, mean=(0, 0), std=(1, 1))


def test_make_loader_tensor_images_shuffles_by_seed():
    ds = _rgb_images()
    x_all = ds[:][0]
    a = list(make_loader(ds, batch_size=8, shuffle=True, seed=2))
    b = list(make_loader(ds, batch_size=8, shuffle=True, seed=2))
    order = torch.cat([y for _, y in a])
    assert [len(y) for _, y in a] == [8, 8, 8, 8, 5]
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    xs = torch.cat([x for x, _ in a])
    # every shuffled item is the normalised item it claims to be
    perm = torch.cat([torch.nonzero((x_all == xi).flatten(1).all(1)).flatten()[:1] for xi in xs])
    assert sorted(perm.tolist()) == list(range(37)) and torch.equal(ds.targets[perm], order)
    assert perm.tolist() != list(range(37))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_images_device_copy_is_cached_and_exact():
    ds = _rgb_images()
    d1, d2 = ds.to("cuda"), ds.to("cuda")
    assert d1 is d2 and d1.images.is_cuda and d1.to("cuda") is d1
    assert torch.equal(d1[:][0].cpu(), ds[:][0])  # division on the GPU is the same division
    sub = take(ds, np.array([3, 1]))
    assert sub._copies["cuda:0"].images.is_cuda  # the subset indexed the device copy
    assert torch.equal(sub.to("cuda")[:][0].cpu(), ds[:][0][[3, 1]])


# --------------------------------------------------------------------------- file loaders


def test_eval_batches_one_persistent_loader_for_the_dataset_and_its_subsets(tmp_path):
    make_image_folder(tmp_path / "val", ["n00000001", "n00000002"], per_class=3, size=(40, 40))
    ds = load_dataset("imagenet", root=tmp_path / "val", expected_classes=2, image_size=32).test
    try:
        full = list(eval_batches(ds, batch_size=4, num_workers=1))
        assert [len(y) for _, y in full] == [4, 2]
        assert torch.cat([y for _, y in full]).tolist() == [0, 0, 0, 1, 1, 1]
        (loader, _), = ds._wavesweep_eval_loaders.values()
        workers = loader._iterator._workers
        sub = Subset(Subset(ds, [5, 4, 1, 0]), [0, 2, 3])  # nested: items 5, 1, 0
        part = list(eval_batches(sub, batch_size=4, num_workers=1))
        assert len(ds._wavesweep_eval_loaders) == 1 and loader._iterator._workers is workers  # same workers
        x = torch.cat([b[0] for b in part])
        assert torch.cat([b[1] for b in part]).tolist() == [1, 0, 0]
        assert torch.equal(x, torch.stack([ds[i][0] for i in (5, 1, 0)]))
        pickle.dumps(ds)  # the cached loader does not travel with the dataset
    finally:
        D.close_loaders(ds)
    assert not hasattr(ds, "_wavesweep_eval_loaders")


@pytest.mark.parametrize("fail", [False, True], ids=["full-pass", "worker-error"])
def test_a_dropped_dataset_stops_its_loaders_workers_without_the_garbage_collector(tmp_path, fail):
    """The loaders :func:`eval_batches` and :func:`seeded_batches` cache on a dataset hold it
    weakly, and a pass that fails (a worker's error) stops its workers: a dataset dropped without
    :func:`close_loaders` stops its worker processes at once. Before, dataset and loader made a
    reference cycle, and the garbage collector finalised the loader's queues before stopping the
    workers: torch then waited its 5 s join timeout per worker (a 4 s test of this file took 9 s)."""
    import gc
    import multiprocessing
    import weakref

    make_image_folder(tmp_path / "val", ["n00000001", "n00000002"], per_class=2, size=(40, 40))
    if fail:
        (tmp_path / "val" / "n00000002" / "zz.JPEG").write_bytes(b"garbage")
    ds = load_dataset("imagenet", root=tmp_path / "val", expected_classes=2, image_size=32).test
    before = set(multiprocessing.active_children())
    was_enabled = gc.isenabled()
    gc.disable()  # only reference counting frees the dataset here
    try:
        if fail:  # the error's traceback holds the dataset in a cycle: the workers stop at the error
            with pytest.raises(ValueError, match="zz.JPEG"):
                list(eval_batches(ds, batch_size=2, num_workers=2))
            with pytest.raises(ValueError, match="zz.JPEG"):
                list(D.seeded_batches(ds, [[0, 1], [2, 3], [4]], seed=0, num_workers=1))
            assert [loader._iterator for loader, _ in ds._wavesweep_eval_loaders.values()] == [None, None]
            assert set(multiprocessing.active_children()) == before  # no worker left running
            return
        assert len(list(eval_batches(ds, batch_size=2, num_workers=2))) == 2
        assert len(list(D.seeded_batches(ds, [[0, 1], [2, 3]], seed=0, num_workers=1))) == 2
        workers = [w for loader, _ in ds._wavesweep_eval_loaders.values() for w in loader._iterator._workers]
        assert len(workers) == 3 and all(w.is_alive() for w in workers)
        probe = D._Unowned(ds)
        assert pickle.loads(pickle.dumps(probe))[3][1] == ds[3][1] == 1  # a spawned worker gets the dataset itself
        gone = weakref.ref(ds)
        del ds
        assert gone() is None  # freed by reference counting: no cycle through its cached loaders
        assert [w.is_alive() for w in workers] == [False] * 3
        assert set(multiprocessing.active_children()) == before
        with pytest.raises(RuntimeError, match="freed"):
            len(probe)
    finally:
        if was_enabled:
            gc.enable()


def test_a_data_root_given_to_digits_is_said_to_be_unused(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="wavesweep.data_sources"):
        a = load_dataset("digits", root=tmp_path / "nowhere")
    assert f"data root {tmp_path / 'nowhere'} is not used" in caplog.text
    assert torch.equal(a.test.images, load_dataset("digits").test.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tensor_dataset_with_labels_on_cuda_gives_its_targets_and_subsets():
    """``dataset_targets`` read a TensorDataset's labels with ``.numpy()``, which a CUDA tensor
    refuses: eval subsets and chunked evaluation of a dataset built on the GPU failed."""
    from torch.utils.data import TensorDataset

    x, y = torch.randn(12, 1, 4, 4), torch.arange(12) % 3
    ds = TensorDataset(x.cuda(), y.cuda())
    assert dataset_targets(ds).tolist() == y.tolist()
    assert sorted(dataset_targets(eval_subset(ds, 6, seed=0)).tolist()) == [0, 0, 1, 1, 2, 2]


def test_a_data_root_whose_user_is_unknown_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """``~user/...`` for a user this machine does not know (a typo for ``~/...``), as --data-root,
    data_root in a spec or $WAVESWEEP_DATA, came out as pathlib's bare RuntimeError and a traceback
    (exit 1); it is one line naming the value, exit 2, as the weights file's is."""
    from wavesweep.cli import main

    root = "~no_such_user_wavesweep/imagenet"
    with pytest.raises(RuntimeError):  # the oracle: pathlib cannot expand it
        Path(root).expanduser()
    with pytest.raises(ValueError, match=r"^data root '~no_such_user_wavesweep/imagenet': cannot expand") as err:
        load_dataset("imagenet", root=root)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("WAVESWEEP_DATA", root)
    with pytest.raises(ValueError, match=r"^data root \(\$WAVESWEEP_DATA\) '~no_such_user_wavesweep/imagenet'"):
        load_dataset("imagenet")
    monkeypatch.delenv("WAVESWEEP_DATA")
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--model", "cnn", "--dataset", "imagefolder", "--data-root", root, "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"wavesweep: error: data root {root!r}: cannot expand '~no_such_user_wavesweep' (no such user or no home)\n"


# --------------------------------------------------------------------------- ImageNet's training split

TRAIN_LAYOUTS = {  # layout -> (the val set's maker, where train/ goes under the top, the root passed)
    "folder-top": ("folder", "train", "."),
    "folder-val": ("folder", "train", "val"),  # --data-root the val folder itself: train/ one level up
    "kaggle": ("kaggle", "ILSVRC/Data/CLS-LOC/train", "."),
    "devkit": ("devkit", "train", "."),
}


def make_imagenet_tree(top: Path, layout: str, train_synsets: list[str] | None = FLAT_SYNSETS,
                       per_class: int = 2) -> tuple[Path, Path | None]:
    """A generated ImageNet under ``top`` in ``layout`` (:data:`TRAIN_LAYOUTS`): val with the 4
    :data:`FLAT_SYNSETS`, and train/ with ``train_synsets`` (None: no train/). Returns (root, train/)."""
    kind, train_at, root_at = TRAIN_LAYOUTS[layout]
    if kind == "folder":
        make_image_folder(top / "val", sorted(FLAT_SYNSETS), per_class=2, size=(20, 18))
    else:
        make_flat_val(kind, top)
    train = None
    if train_synsets is not None:
        train = make_image_folder(top / train_at, train_synsets, per_class=per_class, size=(24, 20))
    return (top / root_at).resolve() if root_at != "." else top, train


@pytest.mark.parametrize("layout", sorted(TRAIN_LAYOUTS))
def test_imagenet_finds_its_training_split_with_the_val_labels(tmp_path, layout):
    """train/ where each layout keeps it is the bundle's train split; a synset has one label in
    both splits (oracle: the synset folder each training image is in, and the val's own classes);
    its transform is torchvision's training preset at the dataset's size, recorded in the info."""
    from torchvision import transforms as T

    root, train_dir = make_imagenet_tree(tmp_path, layout, train_synsets=FLAT_SYNSETS, per_class=3)
    b = load_dataset("imagenet", root=root, expected_classes=4, image_size=16)
    assert b.train is not None and len(b.train) == 12 and b.info["n_train"] == 12
    assert b.info["train_root"] == str(train_dir) and "train_looked_for" not in b.info
    assert b.info["train_transform"] == "random resized crop 16, horizontal flip, imagenet norm"
    val_index = {c: i for i, c in enumerate(b.test.classes)}
    assert b.test.classes == sorted(FLAT_SYNSETS)
    for path, y in b.train.samples:
        assert y == val_index[Path(path).parent.name]
    tf = b.train.transform.transforms
    assert [type(t) for t in tf] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert tf[0].size == (16, 16) and tf[0].scale == (0.08, 1.0)
    assert tuple(tf[3].mean) == (0.485, 0.456, 0.406) and tuple(tf[3].std) == (0.229, 0.224, 0.225)
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == b.train.targets[0]


@pytest.mark.parametrize("layout", ["folder-val", "kaggle"])
@pytest.mark.parametrize("rel", [".", ".."])
def test_imagenet_finds_its_training_split_from_a_relative_data_root_of_dot_or_dot_dot(tmp_path, monkeypatch, layout, rel):
    """``--data-root .`` in the val images' folder (or ``..`` in a folder below it): train/ was looked
    for at ``Path('.').parent / 'train'``, i.e. inside the val folder, so the split beside it was not
    found and a recovery stopped naming 'train'. Oracle: the same tree given by its absolute path."""
    root, train_dir = make_imagenet_tree(tmp_path, layout, per_class=3)
    want = load_dataset("imagenet", root=root, expected_classes=4, image_size=16)
    assert want.train is not None and want.info["train_root"] == str(train_dir)
    images = Path(want.info["root"])
    cwd = images
    if rel == "..":  # a folder below the val images' folder: a synset folder, or one made in a flat val
        cwd = images / "n01440764" if layout == "folder-val" else images / "sub"
        cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    b = load_dataset("imagenet", root=rel, expected_classes=4, image_size=16)
    assert "train_looked_for" not in b.info and b.train is not None
    assert Path(b.info["train_root"]).resolve() == train_dir.resolve()
    assert [(Path(f).relative_to(b.train.root), y) for f, y in b.train.samples] == \
        [(Path(f).relative_to(want.train.root), y) for f, y in want.train.samples]


def test_imagenet_without_train_folder_is_val_alone_and_says_where_train_was_looked_for(tmp_path):
    root, _ = make_imagenet_tree(tmp_path, "folder-top", train_synsets=None)
    b = load_dataset("imagenet", root=root, expected_classes=4)
    assert b.train is None and b.info["n_train"] == 0 and len(b.test) == 8
    assert b.info["train_looked_for"] == str(tmp_path / "train")


@pytest.mark.parametrize("layout", ["folder-top", "kaggle"])
def test_imagenet_train_with_other_synsets_is_one_line(tmp_path, layout):
    """A train/ with a synset the val set lacks (or lacking one it has) is not ImageNet's training
    split: the val set loads as without it (an unrelated train/ beside a val folder given alone must
    not stop a recovery=none evaluation), and the info keeps one line naming the folder, the counts
    and the first synset on each side, for the recovery that needs it."""
    root, train = make_imagenet_tree(tmp_path, layout, train_synsets=FLAT_SYNSETS[:3] + ["n09999999"])
    b = load_dataset("imagenet", root=root, expected_classes=4)
    assert b.train is None and b.info["train_looked_for"] == str(train) and len(b.test) > 0
    msg = b.info["train_unusable"]
    assert "\n" not in msg
    assert msg.startswith(f"imagenet: training folder {str(train)!r} holds 4 class folders, not the 4 synsets of the "
                          "validation set ")
    assert "1 only in train/ (first 'n09999999'); 1 only in the validation set (first 'n01443537')" in msg


def test_imagenet_train_with_loose_images_or_an_empty_class_is_one_line(tmp_path):
    root, train = make_imagenet_tree(tmp_path, "folder-top")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(train / "stray.JPEG")
    b = load_dataset("imagenet", root=root, expected_classes=4)
    assert b.train is None and b.info["train_unusable"].startswith(
        f"imagenet: training folder {str(train)!r} holds 1 images beside its 4 class folders (first 'stray.JPEG'), "
        "in no class; ")
    (train / "stray.JPEG").unlink()
    for f in (train / "n01443537").iterdir():
        f.unlink()
    msg = load_dataset("imagenet", root=root, expected_classes=4).info["train_unusable"]
    assert "\n" not in msg and msg.startswith(f"imagenet: cannot read training folder {str(train)!r}: 1 of the 4 class "
                                              f"folders in {str(train)!r} hold no image (first 'n01443537'); ")


def test_eval_fingerprint_ignores_the_training_split_data_fingerprint_does_not(tmp_path):
    """The base evaluation's cache key (eval_fingerprint) is the val's alone: train/ added, or
    relabelled (its images moved to another synset), keeps it; the base model's (data_fingerprint)
    changes with either. Another val (one image more) changes both."""
    from wavesweep.data import data_fingerprint, eval_fingerprint

    def fps():
        b = load_dataset("imagenet", root=tmp_path, expected_classes=4)
        return eval_fingerprint(b), data_fingerprint(b)

    make_imagenet_tree(tmp_path, "folder-top", train_synsets=None)
    alone = fps()
    train = make_image_folder(tmp_path / "train", FLAT_SYNSETS, per_class=2, size=(24, 20))
    with_train = fps()
    a, b = sorted(FLAT_SYNSETS)[:2]
    moved = next((train / a).iterdir())
    moved.rename(train / b / moved.name)  # the same files, one with another label
    relabelled = fps()
    assert alone[0] == with_train[0] == relabelled[0]
    assert len({alone[1], with_train[1], relabelled[1]}) == 3
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / a / "extra.JPEG")
    other_val = fps()
    assert other_val[0] != alone[0] and other_val[1] != relabelled[1]


def _reference_image_folder(root: Path) -> list[tuple[str, int]]:
    """The samples as ImageFiles found them before the scan of its own (torchvision's
    make_dataset, hidden names left out by an is_valid_file on the path relative to the root)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    top = os.path.abspath(root)

    def is_valid_file(path: str) -> bool:
        parts = os.path.relpath(os.path.abspath(path), top).split(os.sep)
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ImageFolder.make_dataset(str(root), {c: i for i, c in enumerate(classes)}, None, is_valid_file)


def _old_times(root: Path) -> None:
    """Every folder under ``root`` (and it) last modified an hour ago: a scan of it is remembered."""
    t = os.stat(root).st_mtime - 3600
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(d, (t, t))


def test_image_files_scan_is_torchvisions_make_dataset_and_remembered_while_folders_are_unchanged(tmp_path, monkeypatch):
    """Oracle: torchvision's make_dataset with the old path-based is_valid_file, on a tree with
    hidden files and folders, nested folders, other files, upper-case extensions and a linked
    folder. Scanned again unchanged (old folder times), nothing is walked; an image added,
    removed or renamed, in a class folder or a nested one, is seen; a tree modified just now is
    not remembered (file times are coarse)."""
    from wavesweep import image_files

    root = make_image_folder(tmp_path / "train", ["n01", "n02", "n03"], per_class=3, size=(8, 8))
    (root / "n01" / "._img0_0.JPEG").write_bytes(b"not an image")
    (root / "n01" / ".ipynb_checkpoints").mkdir()
    (root / "n01" / ".ipynb_checkpoints" / "copy.png").write_bytes(b"x")
    (root / "n02" / "sub" / "deeper").mkdir(parents=True)
    (root / "n02" / "sub" / "deeper" / "b.JPG").write_bytes(b"x")
    (root / "n02" / "sub" / "a.jpeg").write_bytes(b"x")
    (root / "n02" / "notes.txt").write_text("x")
    (root / ".cache").mkdir()
    (root / ".cache" / "z.png").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.png").write_bytes(b"x")
    (root / "n03" / "link").symlink_to(tmp_path / "elsewhere")
    reference = _reference_image_folder(root)
    assert image_files.ImageFiles(str(root)).samples == reference
    assert len(reference) == 12 and not any("/." in p for p, _ in reference)

    walks = []
    real_walk = os.walk
    monkeypatch.setattr(image_files.os, "walk", lambda *a, **k: walks.append(a[0]) or real_walk(*a, **k))
    image_files.ImageFiles(str(root))  # modified just now: not remembered
    assert walks
    _old_times(root)
    image_files.ImageFiles(str(root))  # scanned, remembered
    walks.clear()
    ds = image_files.ImageFiles(str(root))
    assert walks == [] and ds.samples == reference and ds.targets == [y for _, y in reference]
    for change in (lambda: (root / "n02" / "sub" / "deeper" / "new.png").write_bytes(b"x"),
                   lambda: (root / "n01" / "img0_1.png").unlink(),
                   lambda: (root / "n03" / "img2_0.JPEG").rename(root / "n03" / "renamed.JPEG")):
        _old_times(root)
        image_files.ImageFiles(str(root))  # remembered as it is now
        change()
        assert image_files.ImageFiles(str(root)).samples == _reference_image_folder(root)


def test_image_files_scan_sees_another_folder_put_in_a_class_folders_place_with_the_same_mtime(tmp_path):
    """Class folders swapped, or a linked class folder re-pointed, when the folders' mtimes are
    equal (as an archive's extraction leaves them: _old_times gives them one time): the scan
    remembered was of other folders, and gave every image its old label under a path that no
    longer exists. Oracle: torchvision's make_dataset."""
    from wavesweep import image_files

    root = make_image_folder(tmp_path / "train", ["n01", "n02"], per_class=2, size=(8, 8))
    (root / "n02" / "third.png").write_bytes((root / "n02" / "img1_1.png").read_bytes())
    _old_times(root)
    assert image_files.ImageFiles(str(root)).samples == _reference_image_folder(root)  # remembered
    (root / "n01").rename(root / "tmp")
    (root / "n02").rename(root / "n01")
    (root / "tmp").rename(root / "n02")
    swapped = image_files.ImageFiles(str(root)).samples
    assert swapped == _reference_image_folder(root) and all(os.path.exists(f) for f, _ in swapped)

    other = tmp_path / "other"
    for name, n in (("a", 1), ("b", 3)):
        make_image_folder(other / name, ["x"], per_class=n, size=(8, 8))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "n01").symlink_to(other / "a" / "x")
    _old_times(linked)
    _old_times(other)
    assert len(image_files.ImageFiles(str(linked)).samples) == 1  # remembered
    (linked / "n01").unlink()
    (linked / "n01").symlink_to(other / "b" / "x")
    _old_times(linked)
    assert image_files.ImageFiles(str(linked)).samples == _reference_image_folder(linked)
    assert len(_reference_image_folder(linked)) == 3


def test_a_file_training_splits_fingerprint_names_how_its_random_transforms_draw(tmp_path, monkeypatch):
    """A base model trained on an image folder is keyed by how its random flips drew (per example
    since the decoding workers): another scheme is another model, never reused. The evaluation
    key and in-memory datasets (no random transforms) do not carry it."""
    from wavesweep import data
    from wavesweep.data import data_fingerprint, eval_fingerprint

    for split in ("train", "val"):
        make_image_folder(tmp_path / split, ["a", "b"], per_class=2)
    folder = load_dataset("imagefolder", root=tmp_path, image_size=16)
    digits = load_dataset("digits")
    before = data_fingerprint(folder), eval_fingerprint(folder), data_fingerprint(digits)
    monkeypatch.setattr(data, "FILE_TRAIN_RANDOMNESS", "main-process-generator")
    after = data_fingerprint(folder), eval_fingerprint(folder), data_fingerprint(digits)
    assert before[0] != after[0] and before[1:] == after[1:]


def test_a_file_splits_fingerprint_sees_a_file_replaced_under_its_name(tmp_path):
    """A file split's fingerprint holds each file's size: an image replaced under its name by
    another (another size) is other data; a copy of the folder elsewhere, with other modification
    times, is the same data; so is a file touched. Oracle: the sizes os.stat gives, and the
    relative paths ``Path.relative_to`` gives (the digest slices them off the root as given)."""
    import shutil
    from types import SimpleNamespace

    from wavesweep.data import _relative_paths, data_fingerprint, eval_fingerprint

    root = tmp_path / "one"
    for split in ("train", "val"):
        make_image_folder(root / split, ["a", "b"], per_class=2)

    def fps(r):
        b = load_dataset("imagefolder", root=r)
        return eval_fingerprint(b), data_fingerprint(b)

    before = fps(root)
    copy = tmp_path / "two"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # other mtimes
    os.utime(root / "val" / "a" / "img0_0.JPEG", (1, 1))
    assert fps(copy) == before == fps(root)
    replaced = root / "val" / "a" / "img0_0.JPEG"
    size = replaced.stat().st_size
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(replaced, format="JPEG")
    assert replaced.stat().st_size != size
    after = fps(root)
    assert after[0] != before[0] and after[1] != before[1]
    shutil.copyfile(copy / "val" / "a" / "img0_0.JPEG", replaced)  # the first image back
    assert fps(root) == before

    ds = load_dataset("imagefolder", root=str(root) + "/").test  # the root as given: a trailing slash
    assert _relative_paths(ds) == [Path(f).relative_to(root / "val").as_posix() for f, _ in ds.samples]
    assert ds.samples[0][0].startswith(f"{root}/val/")
    odd = SimpleNamespace(root=f"{root}/./val/", samples=ds.samples)  # paths not under the root as given
    assert not ds.samples[0][0].startswith(odd.root)
    assert _relative_paths(odd) == [Path(f).relative_to(root / "val").as_posix() for f, _ in ds.samples]
