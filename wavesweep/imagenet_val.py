"""ImageNet-1k val kept flat: the images in one folder, their labels in separate files, as the
two usual distributions leave it (:func:`flat_samples` finds and reads them):

- Kaggle's "ImageNet Object Localization Challenge": the images in ``ILSVRC/Data/CLS-LOC/val/``;
  at the top ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the synset first in
  PredictionString: ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 ...``) and
  ``LOC_synset_mapping.txt`` (the 1000 synsets, ``n01440764 tench, Tinca tinca`` per line).
- image-net.org: the images in ``ILSVRC2012_img_val/``; the devkit's
  ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (line i: the
  ILSVRC2012_ID of ``ILSVRC2012_val_<i as 8 digits>``) mapped to synsets by its
  ``data/meta.mat`` (struct ``synsets``; the leaves, ``num_children`` 0, are the 1000 classes),
  read as torchvision's ``parse_devkit_archive`` reads them.

Where they are looked for, from the folder ``DIR`` given: the images directly in the first of
:data:`IMAGE_DIRS` under ``DIR`` that holds any; the labels in ``DIR`` or one of the
:data:`LABEL_LEVELS` folders above it (Kaggle's val folder is four below its label files),
the nearest first, Kaggle's files before a devkit in the same folder.

The files are read where they are: nothing is moved or extracted (torchvision's ``ImageNet``
rearranges the folder). Class index = position among the sorted synsets, the order
ImageFolder gives the synset folders and torchvision's pretrained weights use, so an image has
the same label in either layout. Anything missing or inconsistent is one line naming the file
and what was expected (``FileNotFoundError`` for a missing file, else ``ValueError``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: image folders tried under DIR, in order: DIR itself, a top folder's val/, image-net.org's, Kaggle's
IMAGE_DIRS = (".", "val", "ILSVRC2012_img_val", "ILSVRC/Data/CLS-LOC/val")
#: label files are looked for in DIR and this many folders above it
LABEL_LEVELS = 4
KAGGLE_LABELS, KAGGLE_SYNSETS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_TRUTH, DEVKIT_META = "data/ILSVRC2012_validation_ground_truth.txt", "data/meta.mat"
_SYNSET = re.compile(r"^n\d{8}$")
_MAPPING_LINE = "'n01440764 tench, Tinca tinca'"


@dataclass(frozen=True)
class FlatLabels:
    """The labels of a flat val folder: ``classes`` the synsets, sorted (class index = position);
    ``labels`` image name without its extension -> synset; ``source`` the file they come from."""

    classes: tuple[str, ...]
    labels: dict[str, str]
    source: Path


def _q(path: Path) -> str:
    return repr(str(path))


def _text(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 text is a ValueError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the header
    except UnicodeDecodeError as err:
        raise ValueError(f"imagenet: {_q(path)} is not a text file ({err.reason} at byte {err.start})") from None


def image_dirs(root: Path) -> list[Path]:
    """The folders whose images are looked for, in order (see :data:`IMAGE_DIRS`)."""
    return [root / d for d in IMAGE_DIRS]


def label_dirs(root: Path) -> list[Path]:
    """The folders where label files are looked for, nearest first: ``root`` and the
    :data:`LABEL_LEVELS` folders above it (as written, ``..`` resolved, links not followed)."""
    top = Path(os.path.abspath(root))
    return [top, *list(top.parents)[:LABEL_LEVELS]]


def images_in(directory: Path) -> dict[str, str]:
    """The image files directly in ``directory``, sorted: name without extension -> file name.
    Hidden files (macOS's ``._name.JPEG``) are left out, as :class:`~wavesweep.image_files.ImageFiles`
    leaves them out; {} where ``directory`` is no folder. Two images of one name are a ValueError."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    if not directory.is_dir():
        return {}
    found: dict[str, str] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):  # scandir: 50,000 names, no stat each
        hidden = entry.name.startswith(".")
        if hidden or not has_file_allowed_extension(entry.name, IMG_EXTENSIONS) or not entry.is_file():
            continue
        stem = os.path.splitext(entry.name)[0]
        if stem in found:
            raise ValueError(f"imagenet: {_q(directory)} holds both {found[stem]!r} and {entry.name!r}; "
                             "expected one image per name (the label files name images without extension)")
        found[stem] = entry.name
    return found


# --------------------------------------------------------------------------- Kaggle


def read_synset_mapping(path: Path, expected_classes: int) -> tuple[str, ...]:
    """The sorted synsets of Kaggle's ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``
    per line), which must list ``expected_classes`` different ones."""
    if not path.is_file():
        raise FileNotFoundError(f"imagenet: {_q(path)} does not exist; expected beside {KAGGLE_LABELS}: the "
                                f"{expected_classes} synsets, one per line ({_MAPPING_LINE})")
    first: dict[str, int] = {}
    for k, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        synset = line.split()[0]
        if not _SYNSET.match(synset):
            raise ValueError(f"imagenet: {_q(path)} line {k} is {line[:60]!r}; expected a synset id and its words "
                             f"({_MAPPING_LINE})")
        if synset in first:
            raise ValueError(f"imagenet: {_q(path)} line {k}: {synset} again (first on line {first[synset]}); "
                             "expected each synset once")
        first[synset] = k
    if len(first) != expected_classes:
        raise ValueError(f"imagenet: {_q(path)} lists {len(first)} synsets; expected {expected_classes}, "
                         "the classes of ImageNet-1k")
    return tuple(sorted(first))


def read_kaggle(path: Path, mapping: Path, expected_classes: int) -> FlatLabels:
    """Kaggle's ``LOC_val_solution.csv`` at ``path``: each image's synset (the first token of its
    PredictionString), which must be one of ``mapping``'s (``LOC_synset_mapping.txt``)."""
    classes = read_synset_mapping(mapping, expected_classes)
    known = set(classes)
    reader = csv.reader(_text(path).splitlines())
    header = next(reader, [])
    if [h.strip() for h in header] != ["ImageId", "PredictionString"]:
        raise ValueError(f"imagenet: {_q(path)} starts with {','.join(header)[:80]!r}; expected the header "
                         "'ImageId,PredictionString'")
    labels: dict[str, str] = {}
    first: dict[str, int] = {}
    for row in reader:
        k = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        tokens = row[1].split() if len(row) == 2 else []
        if not tokens or not row[0].strip() or not _SYNSET.match(tokens[0]):
            raise ValueError(f"imagenet: {_q(path)} line {k} is {','.join(row)[:80]!r}; expected an image id, then "
                             "its synset and boxes ('ILSVRC2012_val_00008726,n02119789 255 142 454 329')")
        image, synset = row[0].strip(), tokens[0]
        if synset not in known:
            raise ValueError(f"imagenet: {_q(path)} line {k}: synset {synset} of {image} is not among the "
                             f"{len(known)} in {_q(mapping)}")
        if image in first:
            raise ValueError(f"imagenet: {_q(path)} line {k}: {image} again (first on line {first[image]}); "
                             "expected one row per image")
        labels[image], first[image] = synset, k
    return FlatLabels(classes, labels, path)


# --------------------------------------------------------------------------- devkit


def read_meta_mat(path: Path, expected_classes: int) -> dict[int, str]:
    """ILSVRC2012_ID -> synset of the leaf synsets (``num_children`` 0) in the devkit's
    ``meta.mat``, as torchvision's ``parse_meta_mat`` selects them; there must be
    ``expected_classes`` of them, each a synset id once."""
    from scipy import io as sio

    fields = ("ILSVRC2012_ID", "WNID", "num_children")
    try:
        synsets = np.atleast_1d(sio.loadmat(str(path), squeeze_me=True)["synsets"])
    except KeyError:
        raise ValueError(f"imagenet: {_q(path)} holds no 'synsets'; expected the devkit's meta.mat, a struct "
                         f"array 'synsets' with fields {', '.join(fields)}") from None
    except (sio.matlab.MatReadError, ValueError, OSError, TypeError, NotImplementedError) as err:  # no MAT-file
        raise ValueError(f"imagenet: {_q(path)} cannot be read as a MAT-file ({type(err).__name__}: {err}); "
                         "expected the devkit's meta.mat") from None
    lacking = [f for f in fields if f not in (synsets.dtype.names or ())]
    if lacking:
        raise ValueError(f"imagenet: {_q(path)}: 'synsets' has no field {', '.join(lacking)}; expected the "
                         f"devkit's meta.mat, with fields {', '.join(fields)}")
    leaves: dict[int, str] = {}
    seen: set[str] = set()
    for s in synsets:
        try:
            if int(s["num_children"]) != 0:  # an inner WordNet node, not a class
                continue
            key, wnid = int(s["ILSVRC2012_ID"]), str(s["WNID"])
        except (TypeError, ValueError):
            raise ValueError(f"imagenet: {_q(path)}: synset {s['WNID']!r} has ILSVRC2012_ID {s['ILSVRC2012_ID']!r} "
                             f"and num_children {s['num_children']!r}; expected integers") from None
        if not _SYNSET.match(wnid):
            raise ValueError(f"imagenet: {_q(path)}: leaf synset {key} has WNID {wnid!r}; expected a synset id "
                             "like 'n01440764'")
        if key in leaves or wnid in seen:
            raise ValueError(f"imagenet: {_q(path)}: ILSVRC2012_ID {key} or synset {wnid} on two leaf synsets; "
                             "expected each once")
        leaves[key] = wnid
        seen.add(wnid)
    if len(leaves) != expected_classes:
        raise ValueError(f"imagenet: {_q(path)} has {len(leaves)} leaf synsets (num_children 0); expected "
                         f"{expected_classes}, the classes of ImageNet-1k")
    return leaves


def read_devkit(devkit: Path, expected_classes: int) -> FlatLabels:
    """image-net.org's devkit folder: line i of ``data/ILSVRC2012_validation_ground_truth.txt`` is
    the ILSVRC2012_ID of ``ILSVRC2012_val_<i as 8 digits>``, its synset from ``data/meta.mat``."""
    meta, truth = devkit / DEVKIT_META, devkit / DEVKIT_TRUTH
    for f, what in ((meta, "the synsets (a struct 'synsets' with ILSVRC2012_ID, WNID, num_children)"),
                    (truth, "the ILSVRC2012_ID of each val image, one per line")):
        if not f.is_file():
            raise FileNotFoundError(f"imagenet: the devkit lacks {_q(f)}; expected {what}, as extracted from "
                                    "ILSVRC2012_devkit_t12.tar.gz")
    synset_of = read_meta_mat(meta, expected_classes)
    labels: dict[str, str] = {}
    for k, line in enumerate(_text(truth).rstrip().splitlines(), 1):
        t = line.strip()
        synset = synset_of.get(int(t)) if t.isdigit() else None
        if synset is None:
            raise ValueError(f"imagenet: {_q(truth)} line {k} is {t[:40]!r}; expected the ILSVRC2012_ID of "
                             f"ILSVRC2012_val_{k:08d}, one of the {len(synset_of)} leaf classes in {_q(meta)} "
                             f"({min(synset_of)}..{max(synset_of)})")
        labels[f"ILSVRC2012_val_{k:08d}"] = synset
    return FlatLabels(tuple(sorted(synset_of.values())), labels, truth)


# --------------------------------------------------------------------------- finding them


def find_labels(root: Path, expected_classes: int) -> FlatLabels | None:
    """The labels of the nearest of :func:`label_dirs` holding Kaggle's ``LOC_val_solution.csv``
    or a ``ILSVRC2012_devkit_t12/`` folder (Kaggle's first); None where none does."""
    for d in label_dirs(root):
        if (d / KAGGLE_LABELS).is_file():
            return read_kaggle(d / KAGGLE_LABELS, d / KAGGLE_SYNSETS, expected_classes)
        if (d / DEVKIT).is_dir():
            return read_devkit(d / DEVKIT, expected_classes)
    return None


def flat_samples(root: Path, expected_classes: int) -> tuple[Path, FlatLabels, list[tuple[str, int]]] | None:
    """``(image folder, labels, [(image path, class index)] sorted by file name)`` of the flat val
    set found from ``root``; None where neither a folder of images nor label files are found (not
    this layout). Images without labels, labels of images that are not there, and labels or images
    found without the other are a one-line error naming the file."""
    folders = image_dirs(root)
    found = next(((d, imgs) for d in folders if (imgs := images_in(d))), None)
    labels = find_labels(root, expected_classes)
    if found is None and labels is None:
        return None
    if labels is None:
        looked = ", ".join(_q(d) for d in label_dirs(root))
        raise FileNotFoundError(f"imagenet: {_q(found[0])} holds {len(found[1])} images but no labels for them: "
                                f"looked for {KAGGLE_LABELS} (Kaggle) or {DEVKIT}/ (image-net.org's devkit) in {looked}")
    if found is None:
        looked = ", ".join(_q(d) for d in folders)
        # the val folder sorted into synset folders where it was unpacked (valprep.sh run there)
        tree = next(((d, n) for d in folders if d.is_dir() and (n := sum(
            1 for e in os.scandir(d) if _SYNSET.match(e.name) and e.is_dir()))), None)
        hint = (f"; {_q(tree[0])} holds {tree[1]} synset folders: for that ImageFolder layout pass it as the data "
                "root (--data-root, data_root in a study spec)") if tree else ""
        raise FileNotFoundError(f"imagenet: found the labels {_q(labels.source)} but no images: looked for image "
                                f"files directly in {looked}{hint}")
    directory, images = found
    unlabelled = [name for stem, name in images.items() if stem not in labels.labels]
    if unlabelled:
        raise ValueError(f"imagenet: {_q(directory)} holds {len(unlabelled)} images that {_q(labels.source)} does "
                         f"not label (first {unlabelled[0]!r}); expected a label for every image there")
    absent = [stem for stem in labels.labels if stem not in images]
    if absent:
        raise ValueError(f"imagenet: {_q(labels.source)} labels {len(absent)} images that are not in "
                         f"{_q(directory)} (first {absent[0]!r}); expected each of them there")
    index = {c: i for i, c in enumerate(labels.classes)}
    samples = [(str(directory / name), index[labels.labels[stem]]) for stem, name in images.items()]
    empty = len(index) - len({y for _, y in samples})
    if empty:
        log.warning("imagenet: %d of the %d classes have no image in %s", empty, len(index), directory)
    return directory, labels, samples
