"""Benchmark: what each kept speed-up saves, beside the plain code it replaces,
both measured in the same run (median of ``--repeats`` after one warm-up; CPU).

* base-evaluation cache (``trial._base_eval_cached``): ResNet-18 (random init) on the digits
  evaluation split, a cached call (read the .npz of logits, recompute the metrics) against an
  uncached one (run the model, write the .npz) and against a bare ``evaluate.predict`` +
  ``metrics_from_logits``. Oracle: ``tests/test_trial.py``.
* one-partition percentile (``wavelets.percentile_threshold``) against ``np.percentile``
  (method 'linear'): a 2M-entry float32 array, and the |coefficients| of ResNet-18's
  ``layer4.1.conv2`` (512x512x3x3, bior4.4 level 5, filter layout). Oracle:
  ``tests/test_wavelets.py::test_percentile_threshold_is_numpy_percentile_bit_for_bit``.
* shared base norms (``accounting.model_stats(..., base_cache=...)``): the stats of one trial's
  three results (dwt and its matched magnitude and random) on ResNet-18, with one cache shared
  by the three calls against none. Oracle: ``tests/test_accounting.py::test_shared_base_cache_changes_nothing``.
* hard-linked checkpoint files (``tracking._log_files``): one upload of a checkpoint-sized file
  (a dense ResNet-18 state dict's bytes) into a local MLflow store, linked into the staging
  folder against copied there (``os.link`` made to fail). Oracle:
  ``tests/test_integrity.py::test_uploaded_checkpoint_files_are_their_sources_byte_for_byte``.
* adopted base-model state (``models.build_loaded(adopt=True)``): a cached ResNet-18's load as
  a trial does it (read, build, load), built on the meta device and taking the read tensors,
  against the plain copy into a randomly initialised model. Oracle:
  ``tests/test_models.py::test_adopted_state_equals_a_plain_load_without_random_init``.
  Then the whole cached load with its sha256 checksum (``train.get_base_model``), hashed in a
  thread alongside the read and build, against the same load with the checksum hashed after
  it. Oracle: ``tests/test_train.py::test_get_base_model_trains_once_then_uses_the_cache``
  (the checksum is ``hashlib.sha256`` of the file's bytes). Then the same load again in the same
  process (every trial after the first in a study worker): the unchanged file is read but not
  hashed again, its checksum remembered by file signature (``train.remembered_sha256``). Then
  not read either: a deep copy of the model kept from the last read of the unchanged file
  (``train._LOADED``). Oracle (both):
  ``tests/test_train.py::test_a_base_model_file_loaded_again_in_the_process_is_not_hashed_again``.
* metrics from logits (``evaluate.metrics_from_logits``): the target's top-5 rank from two
  comparisons a row (the rows with ties or NaN by the full rule) and the per-label scores from
  ``np.bincount``, against the form they replaced (seven comparisons over every row, and
  scikit-learn's ``precision_recall_fscore_support``), on 2,048 x 1,000 logits (the 224 px
  evaluation of ``bench_eval.py``, whose metrics took 5.9-7.4 ms a pass on the H200's host) and
  10,000 x 10 (Fashion-MNIST's test split). Oracles: ``tests/test_evaluate.py::
  test_target_rank_equals_its_definition_on_every_row``, ``::test_precision_recall_f1_is_sklearns_bit_for_bit``,
  ``::test_metrics_agree_with_sklearn``.
* exact McNemar (``stats.mcnemar_exact``): each binomial term from the one before, against a
  fresh ``math.comb`` per term, in exact integers both. Oracle:
  ``tests/test_stats.py::test_mcnemar_is_exact_at_imagenet_scale`` (``scipy.stats.binomtest``).
* ImageNet's training split listed (``image_files.ImageFiles``): its own scan (hidden folders not
  entered, a name checked alone) against torchvision's make_dataset with the old path-based
  ``is_valid_file``, on a generated tree of 100 x 1,000 empty ``.JPEG`` files, scaled to 1.28 M;
  the same folder listed again in the process (remembered while no folder changed); and a file
  split's fingerprint (paths, sizes, labels; the training split's is no longer in the base
  evaluation's key, ``data.eval_fingerprint``) against its form before (paths by
  ``Path.relative_to``, no sizes). Oracles:
  ``tests/test_data.py::test_a_file_splits_fingerprint_sees_a_file_replaced_under_its_name`` and
  ``tests/test_data.py::test_image_files_scan_is_torchvisions_make_dataset_and_remembered_while_folders_are_unchanged``.

* the finite check of the target weights (``prune_record.check_finite_targets``, each pruning
  method's first step, three a trial): every layer's L1 norm in one ``torch._foreach_norm`` (a
  multi-tensor kernel on a GPU), the exact check per layer only where a sum is not finite, against
  a ``torch.isfinite`` per layer; ResNet-18's and ResNet-50's convs, with the operators each
  dispatches on CPU. Oracle: ``tests/test_pruning.py::test_finite_check_equals_isfinite_per_layer``.

    python bench/bench_speedups.py [--repeats 7] [--threads 2] [--only train_scan]

Measured on the development machine (2 CPU cores shared with other work, load average 5.7,
torch threads 2, ``--repeats 5``; its speed drifts by up to a third, so read the ratios):

    base evaluation, ResNet-18 / digits (360 examples)
      uncached (run the model, write the .npz)     1230.6 ms
      bare predict + metrics                       1022.6 ms
      cached (read the .npz, recompute metrics)      10.3 ms   119.8x faster than uncached
    percentile threshold
      2M float32     (2000000 entries) np.percentile    43.0 ms   percentile_threshold    20.8 ms   2.1x
      layer4.1.conv2 (2359296 entries) np.percentile    51.5 ms   percentile_threshold    21.5 ms   2.4x
    model_stats of three results (dwt, magnitude, random), ResNet-18
      no cache   818.0 ms   shared cache   595.4 ms   1.37x (saves 223 ms a trial)
    checkpoint upload, 46.8 MB, local MLflow store (sqlite + file artifacts)
      copied    75.5 ms   linked    52.0 ms   1.45x (saves 23 ms a checkpoint)
    cached base model load (read + build + load), ResNet-18 / digits  (2026-11-26, load average ~2)
      plain   114.5 ms   adopted    47.4 ms   2.42x (saves 67 ms a trial)
    (2026-11-26 10:25, a slow phase of the machine: read + build alone 98 ms, sha256 alone 34 ms)
    cached base model load with its sha256 checksum (get_base_model)
      checksum after the load    92.9 ms   hashed alongside    87.6 ms   1.06x (saves 5 ms a trial)
    the same load again in the process (file unchanged: read, not hashed again)
      first load    87.6 ms   again    79.7 ms   1.10x (saves 8 ms a trial after the first)
    The hash runs beside the read and build, so not hashing again saves only what the hash takes
    from the read on two cores: 5-11 ms in these runs, more when the hash is the longer of the two.
    the same load again, a copy of the model kept from the second (2026-11-28, load average 0.3)
      read again    79.9 ms   second load (read, keep a copy)    72.6 ms   third and later (a copy
      of the kept one)    19.2 ms   4.16x (saves 61 ms a trial from the third on)
    exact McNemar p (the binomial tail in exact integers)  (2026-11-26, --repeats 3)
      3,000 vs 3,600 discordant   comb per term   829.2 ms   term from term     2.8 ms   296x
      24,000 vs 26,000 discordant   term from term   158.8 ms
    ImageNet train listing, 100 x 1000 files (x12.8 = 1.28 M in brackets)  (2026-11-28, load average 5.1, --repeats 5)
      old scan  1014.4 ms ( 13.0 s)   new scan   178.7 ms (  2.3 s)   5.7x
      remembered (same folder, same process)     7.9 ms ( 0.10 s)
      hash of the split's paths, no longer in the base evaluation's key   746.9 ms (  9.6 s a trial)
    The same, 2026-11-27 (third session; load average 0.7, --repeats 5), file sizes now in the fingerprint:
      old scan   602.7 ms (  7.7 s)   new scan   109.6 ms (  1.4 s)   5.5x
      remembered (same folder, same process)     3.7 ms ( 0.05 s)
      a file split's fingerprint (data._split_digest): paths, sizes and labels   251.1 ms; before, paths
      (Path.relative_to) and labels   461.3 ms; the sizes' stats alone   233.7 ms
      for ImageNet val's 50,000 files (in the base evaluation's key, every trial):  0.13 s (before  0.23 s)
    finite check of the target weights (2026-11-27, third session; --repeats 7, a test suite running beside it)
      resnet18 (20 convs)   isfinite per layer    23.1 ms (103 operators)   one foreach L1 norm     6.9 ms (28 operators)   3.4x
      resnet50 (53 convs)   isfinite per layer    53.2 ms (268 operators)   one foreach L1 norm    14.0 ms (61 operators)   3.8x
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

# the checkout this file is in, before any installed wavesweep (another checkout's editable install)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavesweep import accounting, evaluate, train, trial  # noqa: E402
from wavesweep import pruning as P  # noqa: E402
from wavesweep import wavelets as wv  # noqa: E402
from wavesweep.config import TrialConfig  # noqa: E402
from wavesweep.data import data_fingerprint, dataset_shape, load_dataset  # noqa: E402
from wavesweep.models import build_model  # noqa: E402


def median_s(fn, repeats: int, setup=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up; ``setup()`` runs
    before each, outside the clock."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ms(s: float) -> str:
    return f"{s * 1e3:7.1f} ms"


def bench_base_eval(repeats: int) -> None:
    shape = dataset_shape("digits")
    torch.manual_seed(0)
    model = build_model("resnet18", **shape).eval()
    # the cache in a temporary directory for this section only: the base-model load below reads
    # the user's cache (a ResNet-18 trained there once), not a deleted temporary one
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"WAVESWEEP_CACHE": tmp}):
        base = train.BaseModel(model, "resnet18", "digits", 0, "trained", Path(tmp) / "w.pt", "ab" * 32, shape)
        cfg = TrialConfig(model="resnet18", dataset="digits", device="cpu")
        bundle, _, _, eval_set, selections = trial.eval_parts(cfg)
        fingerprint = data_fingerprint(bundle)
        dev = torch.device("cpu")
        entries = Path(tmp) / "base-evals"

        def clear() -> None:
            for p in entries.glob("*.npz"):
                p.unlink()

        def bare() -> None:
            evaluate.metrics_from_logits(*evaluate.predict(model, eval_set, batch_size=cfg.batch_size, device=dev))

        def cached_call() -> None:
            trial._base_eval_cached(base, cfg, eval_set, dev, fingerprint, selections["test"])

        uncached = median_s(cached_call, repeats, setup=clear)
        plain = median_s(bare, repeats)
        cached_call()  # the entry the cached calls read
        cached = median_s(cached_call, repeats)
    print(f"base evaluation, ResNet-18 / digits ({len(eval_set)} examples)")
    print(f"  uncached (run the model, write the .npz)    {ms(uncached)}")
    print(f"  bare predict + metrics                      {ms(plain)}")
    print(f"  cached (read the .npz, recompute metrics)   {ms(cached)}   {uncached / cached:.1f}x faster than uncached")


def bench_percentile(repeats: int, pct: float = 65.0) -> None:
    rng = np.random.default_rng(0)
    big = np.abs(rng.standard_normal(2_000_000).astype(np.float32))
    torch.manual_seed(0)
    w = build_model("resnet18", num_classes=1000).get_submodule("layer4.1.conv2").weight.detach().numpy()
    coeffs, _st = wv.decompose(w, wavelet="bior4.4", level=5, layout="filter")
    layer = np.abs(coeffs)
    print("percentile threshold")
    for name, a in (("2M float32    ", big), ("layer4.1.conv2", layer)):
        assert wv.percentile_threshold(a, pct) == np.percentile(a, pct)  # the oracle, here too
        ref = median_s(lambda: np.percentile(a, pct), repeats)
        new = median_s(lambda: wv.percentile_threshold(a, pct), repeats)
        print(f"  {name} ({a.size} entries) np.percentile {ms(ref)}   percentile_threshold {ms(new)}   {ref / new:.1f}x")


def bench_model_stats(repeats: int) -> None:
    torch.manual_seed(0)
    base = build_model("resnet18", num_classes=1000).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dwt = P.prune_dwt(base, wavelet="bior4.4", level=5, percentile=65, layout="filter")
    results = [dwt, *P.prune_matched(base, dwt).values()]

    def plain() -> None:
        for r in results:
            accounting.model_stats(base, r)

    def shared() -> None:
        cache: dict = {}
        for r in results:
            accounting.model_stats(base, r, base_cache=cache)

    ref, new = median_s(plain, repeats), median_s(shared, repeats)
    print("model_stats of three results (dwt, magnitude, random), ResNet-18")
    print(f"  no cache {ms(ref)}   shared cache {ms(new)}   {ref / new:.2f}x (saves {(ref - new) * 1e3:.0f} ms a trial)")


def bench_upload(repeats: int) -> None:
    from mlflow.tracking import MlflowClient  # here, not at the top: a GPU machine without MLflow runs the others

    from wavesweep import tracking

    torch.manual_seed(0)
    sd = build_model("resnet18", num_classes=1000).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.wsz"
        src.write_bytes(os.urandom(nbytes))
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        exp = client.create_experiment("bench", artifact_location=(Path(tmp) / "artifacts").as_uri())

        def upload() -> None:
            run = client.create_run(exp)
            tracking._log_files(client, run.info.run_id, {"note.txt": "x"}, copies={"checkpoint/model.wsz": src})

        linked = median_s(upload, repeats)
        real_link = tracking.os.link

        def no_link(a, b):
            raise OSError("link refused by the benchmark")

        tracking.os.link = no_link
        try:
            copied = median_s(upload, repeats)
        finally:
            tracking.os.link = real_link
    print(f"checkpoint upload, {nbytes / 1e6:.1f} MB, local MLflow store (sqlite + file artifacts)")
    print(f"  copied {ms(copied)}   linked {ms(linked)}   {copied / linked:.2f}x (saves {(copied - linked) * 1e3:.0f} ms a checkpoint)")


def bench_base_load(repeats: int) -> None:
    """A cached base model's load as a trial does it (read the weights file, build, load), the
    model adopting the freshly read tensors (meta-device build: no random init) against the
    plain copy into a randomly initialised model. Oracle:
    ``tests/test_models.py::test_adopted_state_equals_a_plain_load_without_random_init``."""
    from wavesweep.models import build_loaded, read_weights

    # the dataset as a trial has it already loaded (trial.run_trial passes its bundle): without
    # it get_base_model loads the dataset itself for the cache key's data fingerprint
    bundle = load_dataset("digits", seed=0)
    base = train.get_base_model("resnet18", "digits", device="cpu", progress=False, bundle=bundle)  # cached (trained once)

    def load(adopt: bool):
        state, meta = read_weights(base.path)
        return build_loaded("resnet18", state, source=str(base.path), adopt=adopt, **meta["build_kwargs"])

    plain = median_s(lambda: load(False), repeats)
    adopted = median_s(lambda: load(True), repeats)
    print("cached base model load (read + build + load), ResNet-18 / digits")
    print(f"  plain {ms(plain)}   adopted {ms(adopted)}   {plain / adopted:.2f}x (saves {(plain - adopted) * 1e3:.0f} ms a trial)")
    # the whole cached load as a trial does it, checksum included: hashed after the read, or
    # (get_base_model) in a thread while the file is read and the model built
    serial = median_s(lambda: (load(True), train.file_sha256(base.path)), repeats)

    def first_read():  # the first load of the file in a process
        train._CHECKSUMS.clear()
        train._LOADED.clear()
        return train.get_base_model("resnet18", "digits", device="cpu", progress=False, bundle=bundle)

    overlapped = median_s(first_read, repeats)
    print("cached base model load with its sha256 checksum (get_base_model)")
    print(f"  checksum after the load {ms(serial)}   hashed alongside {ms(overlapped)}   {serial / overlapped:.2f}x "
          f"(saves {(serial - overlapped) * 1e3:.0f} ms a trial)")
    # every later trial in the same process (a study worker): the file unchanged, read but not
    # hashed again (its checksum remembered by file signature)
    first_read()

    def read_again():  # as before the loaded model was kept: the file read and the model built again
        train._LOADED.clear()
        return train.get_base_model("resnet18", "digits", device="cpu", progress=False, bundle=bundle)

    again = median_s(read_again, repeats)
    print("the same load again in the process (file unchanged: read, not hashed again)")
    print(f"  first load {ms(overlapped)}   again {ms(again)}   {overlapped / again:.2f}x "
          f"(saves {(overlapped - again) * 1e3:.0f} ms a trial after the first)")
    # the second load reads it again and keeps a copy of the model (train._LOADED); every later one
    # is a copy of that, the file not read
    load = lambda: train.get_base_model("resnet18", "digits", device="cpu", progress=False, bundle=bundle)  # noqa: E731
    second = median_s(load, repeats, setup=read_again)
    read_again()
    load()
    kept = median_s(load, repeats)
    print("the same load again, a copy of the model kept from the second (file unchanged)")
    print(f"  read again {ms(again)}   second load (read, keep a copy) {ms(second)}   third and later "
          f"(a copy of the kept one) {ms(kept)}   {again / kept:.2f}x (saves {(again - kept) * 1e3:.0f} ms a trial from the "
          f"third on; the second pays {(second - again) * 1e3:.0f} ms)")


def _metrics_before(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``metrics_from_logits`` as it was before (2026-11-27): the full rank rule on every row,
    scikit-learn's per-label scores."""
    import torch.nn.functional as F
    from sklearn.metrics import precision_recall_fscore_support

    n, c = logits.shape
    preds = logits.argmax(dim=1)
    correct = preds == targets
    tl = logits.gather(1, targets[:, None])
    nan, tl_nan = logits.isnan(), tl.isnan()
    above = (logits > tl) | (nan & ~tl_nan)
    equal = (logits == tl) | (nan & tl_nan)
    rank = above.sum(1) + (equal & (torch.arange(c)[None] < targets[:, None])).sum(1)
    y_true, y_pred = targets.numpy(), preds.numpy()
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=np.unique(y_true), average=None,
                                                       zero_division=0)
    return {"top1": correct.double().mean().item(), "top5": (rank < min(5, c)).double().mean().item(),
            "loss": F.cross_entropy(logits, targets).item(), "f1_macro": float(f.mean()),
            "recall_macro": float(r.mean()), "precision_macro": float(p.mean()),
            "f1_weighted": float((f * support / support.sum()).sum())}


def bench_metrics(repeats: int) -> None:
    print("metrics from logits (top-1/5, loss, F1, recall, precision)")
    g = torch.Generator().manual_seed(0)
    for n, c in ((2048, 1000), (10_000, 10)):
        y = torch.randint(0, c, (n,), generator=g)
        logits = torch.randn(n, c, generator=g)
        logits[torch.arange(n), y] += 2.0  # a model better than chance
        new = evaluate.metrics_from_logits(logits, y).metrics()
        assert new == _metrics_before(logits, y), "the two forms disagree"
        old_s = median_s(lambda: _metrics_before(logits, y), repeats)
        new_s = median_s(lambda: evaluate.metrics_from_logits(logits, y), repeats)
        print(f"  {n:>6,} x {c:<5,} before {ms(old_s)}   now {ms(new_s)}   {old_s / new_s:.1f}x")


def bench_mcnemar(repeats: int) -> None:
    """Exact McNemar p (``stats.mcnemar_exact``: each binomial term from the one before) against a
    fresh ``math.comb`` per term (the code it replaced), at one size both finish, then the new
    way alone at an ImageNet size (50,000 images: tens of thousands of discordant pairs)."""
    from math import comb

    from wavesweep.stats import mcnemar_exact

    def per_term(a: int, b: int) -> float:
        n = a + b
        return min(1.0, 2 * sum(comb(n, i) for i in range(min(a, b) + 1)) / 2**n)

    print("exact McNemar p (the binomial tail in exact integers)")
    a, b = 3_000, 3_600
    assert per_term(a, b) == mcnemar_exact(a, b)
    old, new = median_s(lambda: per_term(a, b), max(1, repeats // 3)), median_s(lambda: mcnemar_exact(a, b), repeats)
    print(f"  {a:,} vs {b:,} discordant   comb per term {ms(old)}   term from term {ms(new)}   {old / new:.0f}x")
    a, b = 24_000, 26_000
    print(f"  {a:,} vs {b:,} discordant   term from term {ms(median_s(lambda: mcnemar_exact(a, b), repeats))}")


def _old_image_files(root: str):
    """``ImageFiles`` as it was before its own scan (2026-11-28): torchvision's make_dataset with an
    ``is_valid_file`` that made each path absolute and relative to the root, and the empty-class
    count rebuilding the set of labels once per class."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    from wavesweep.image_files import class_dirs, read_image

    top = os.path.abspath(root)

    def is_valid_file(path: str) -> bool:
        parts = os.path.relpath(os.path.abspath(path), top).split(os.sep)
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)

    classes = class_dirs(root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = ImageFolder.make_dataset(root, class_to_idx, None, is_valid_file)
    empty = sorted(set(class_to_idx) - {c for c, i in class_to_idx.items() if i in {y for _, y in samples}})
    assert not empty and read_image
    return samples


def bench_train_scan(repeats: int, classes: int = 100, per_class: int = 1000) -> None:
    """Listing ImageNet's training split (``image_files.ImageFiles``) on a generated tree of
    ``classes`` x ``per_class`` empty ``.JPEG`` files (the scan never opens them), scaled to
    1.28 M: the old path-based scan, the new one (first time in a process), the same folder again
    (remembered: one stat per folder), and the per-trial hash of the split's paths that the base
    evaluation's key no longer takes (``data.eval_fingerprint``). Oracle:
    ``tests/test_data.py::test_image_files_scan_is_torchvisions_make_dataset_and_remembered_while_folders_are_unchanged``."""
    from wavesweep import image_files
    from wavesweep.data import _split_digest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        for c in range(classes):
            d = root / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"n{c:08d}_{i}.JPEG").touch()
        old_t = time.time() - 3600  # folders not modified just now: the scan may be remembered
        for d in [root, *root.iterdir()]:
            os.utime(d, (old_t, old_t))
        n = classes * per_class
        scale = 1_281_167 / n
        assert _old_image_files(str(root)) == image_files.ImageFiles(str(root)).samples
        old = median_s(lambda: _old_image_files(str(root)), repeats)
        new = median_s(lambda: image_files.ImageFiles(str(root)), repeats, setup=image_files._SCANS.clear)
        again = median_s(lambda: image_files.ImageFiles(str(root)), repeats)
        ds = image_files.ImageFiles(str(root))
        digest = median_s(lambda: _split_digest(ds), repeats)
        before = median_s(lambda: hashlib.sha256("\n".join(  # the form before 2026-11-27 (3rd session): no sizes
            f"{Path(f).relative_to(root).as_posix()}\t{y}" for f, y in ds.samples).encode()).hexdigest(), repeats)
        stats = median_s(lambda: [os.stat(f) for f, _ in ds.samples], repeats)
    val = 50_000 / n
    print(f"ImageNet train listing, {classes} x {per_class} files (x{scale:.1f} = 1.28 M in brackets)")
    print(f"  old scan {ms(old)} ({old * scale:5.1f} s)   new scan {ms(new)} ({new * scale:5.1f} s)   {old / new:.1f}x")
    print(f"  remembered (same folder, same process) {ms(again)} ({again * scale:5.2f} s)")
    print(f"  a file split's fingerprint (data._split_digest): paths, sizes and labels {ms(digest)}; before, paths "
          f"(Path.relative_to) and labels {ms(before)}; the sizes' stats alone {ms(stats)}")
    print(f"  for ImageNet val's 50,000 files (in the base evaluation's key, every trial): {digest * val:5.2f} s "
          f"(before {before * val:5.2f} s); for the 1.28 M training files (not in it) {digest * scale:5.1f} s")


def _isfinite_per_layer(layers) -> None:
    """``prune_record.check_finite_targets`` before 2026-11-27 (third session): a
    ``torch.isfinite(w).all()`` per layer (5 operators each), stacked, one sync."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(m.weight).all() for _, m in layers])
        assert bool(finite.all())


def bench_finite_check(repeats: int) -> None:
    """The check that every target weight is finite, which each pruning method runs first (three
    times a trial): one ``torch._foreach_norm`` of every layer's L1 norm against a
    ``torch.isfinite`` per layer, on ResNet-18's and ResNet-50's convs, with the operators each
    dispatches (what a GPU launches). Oracle: ``tests/test_pruning.py::test_finite_check_equals_isfinite_per_layer``."""
    import torchvision
    from torch.utils._python_dispatch import TorchDispatchMode

    from wavesweep.prune_record import check_finite_targets

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops(fn) -> int:
        Count.n = 0
        with Count():
            fn()
        return Count.n

    torch.manual_seed(0)
    print("finite check of the target weights (each pruning method's first step)")
    for name, net in (("resnet18", build_model("resnet18", **dataset_shape("digits"))), ("resnet50", torchvision.models.resnet50())):
        layers = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
        old = median_s(lambda: _isfinite_per_layer(layers), repeats)
        new = median_s(lambda: check_finite_targets(layers), repeats)
        print(f"  {name} ({len(layers)} convs)   isfinite per layer {ms(old)} ({ops(lambda: _isfinite_per_layer(layers))} operators)   "
              f"one foreach L1 norm {ms(new)} ({ops(lambda: check_finite_targets(layers))} operators)   {old / new:.1f}x")


#: ``--devices``: where ``bench_channels_last`` measures (empty: the CPU, and CUDA where there is a GPU)
DEVICES = ""


def bench_channels_last(repeats: int) -> None:
    """A trial's conv models in channels-last format (``evaluate.compute_layout``) against
    contiguous ones, on the CPU and on CUDA where there is a GPU: one forward pass without
    gradients, in eval mode (evaluation, timing) and in train mode (BatchNorm re-estimation),
    for the default trial's ResNet-18 on digits (8 px), the cnn on 28 px images (Fashion-MNIST's
    size), batches of 64 and 256, and (CUDA only) ResNet-18 on 224 px images, batch 64 (random
    init; only the memory format differs). Then the default trial itself
    (``trial.run_trial(TrialConfig(device=...))``: ResNet-18 on digits, recovery bn), in-process,
    alternately contiguous and channels-last (``evaluate.CPU_CHANNELS_LAST``, on by default;
    ``evaluate.CUDA_CHANNELS_LAST``, off until this measures it on a GPU).
    Oracle: ``tests/test_trial.py::test_a_channels_last_trial_gives_the_contiguous_trials_numbers``
    and its CUDA case."""
    import copy

    devices = [torch.device(d) for d in DEVICES.split(",")] if DEVICES else \
        [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        switch = "CUDA_CHANNELS_LAST" if dev.type == "cuda" else "CPU_CHANNELS_LAST"
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        name_of = torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"conv models in channels-last format on {dev.type} ({name_of}; evaluate.compute_layout), one forward pass")
        shapes = [("resnet18", 8, (64, 256)), ("cnn", 28, (64, 256))] + ([("resnet18", 224, (64,))] if dev.type == "cuda" else [])
        for name, size, batches in shapes:
            torch.manual_seed(0)
            plain = build_model(name, num_classes=10, in_channels=1, image_size=size).to(dev)
            fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)  # what compute_layout does
            for bs in batches:
                x = torch.randn(bs, 1, size, size, device=dev)
                for train_mode in (False, True):
                    plain.train(train_mode)
                    fast.train(train_mode)

                    def run(model):
                        model(x)
                        sync()

                    with torch.no_grad():
                        a = median_s(lambda: run(plain), repeats)
                        b = median_s(lambda: run(fast), repeats)
                    print(f"  {name:8s} {size:3d} px, batch {bs:3d}, {'train' if train_mode else 'eval '} mode   "
                          f"contiguous {ms(a)}   channels-last {ms(b)}   {a / b:.2f}x")
        cfg = TrialConfig(device=dev.type)
        times: dict[bool, list[float]] = {False: [], True: []}
        top1 = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mock.patch.object(evaluate, switch, False):  # the base model trained (or read) outside the clock
                trial.run_trial(dataclasses.replace(cfg, timing_batches=0, recovery="none"), progress=False).release()
            for _ in range(max(1, repeats // 3)):
                for on in (False, True):
                    with mock.patch.object(evaluate, switch, on):
                        t0 = time.perf_counter()
                        r = trial.run_trial(cfg, progress=False)
                        times[on].append(time.perf_counter() - t0)
                    top1[on] = {m: round(o.eval.top1, 4) for m, o in r.outcomes.items()}
                    r.release()
        a, b = statistics.median(times[False]), statistics.median(times[True])
        print(f"  the default trial on {dev.type} (ResNet-18 / digits, recovery bn), median of {len(times[True])}: "
              f"contiguous {a:.2f} s   channels-last {b:.2f} s   {a / b:.2f}x")
        print(f"  top-1 contiguous {top1[False]}; channels-last {top1[True]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run one benchmark, e.g. train_scan (the bench_<name> functions)")
    ap.add_argument("--devices", default="", help="comma-separated devices for channels_last (default: cpu, and cuda when present)")
    args = ap.parse_args()
    global DEVICES
    DEVICES = args.devices
    torch.set_num_threads(args.threads)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its store-creation notes
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    if args.only:
        globals()[f"bench_{args.only}"](args.repeats)
        return
    bench_base_eval(args.repeats)
    bench_percentile(args.repeats)
    bench_model_stats(args.repeats)
    bench_upload(args.repeats)
    bench_base_load(args.repeats)
    bench_metrics(args.repeats)
    bench_mcnemar(args.repeats)
    bench_finite_check(args.repeats)
    bench_train_scan(args.repeats)
    bench_channels_last(args.repeats)


if __name__ == "__main__":
    main()
