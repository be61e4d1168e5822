"""scikit-learn's splits and digits kept on disk (``wavesweep.splits``) against scikit-learn itself,
computed and read back: the same arrays, and a later process that does not import scikit-learn."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import sklearn.model_selection

from wavesweep import splits

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "digits-like": (200, np.repeat(np.arange(10), 20), dict(test_size=0.2), 0),
    "uneven-classes": (37, np.array([0] * 20 + [1] * 12 + [2] * 5), dict(train_size=0.5), 7),
    "numpy-float": (60, np.tile(np.arange(3), 20), dict(train_size=np.float64(0.25)), 3),
    "count": (50, np.tile(np.arange(5), 10), dict(test_size=10), 1),
}


def _sklearn(n, labels, sizes, seed):
    return sklearn.model_selection.train_test_split(np.arange(n), stratify=labels, random_state=seed, **sizes)


def _no_sklearn(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scikit-learn was called: the cache was not used")

    monkeypatch.setattr(sklearn.model_selection, "train_test_split", refuse)
    monkeypatch.setattr(sklearn.datasets, "load_digits", refuse)


@pytest.mark.parametrize("case", list(CASES))
def test_a_split_equals_scikit_learns_computed_and_read_back(tmp_path, monkeypatch, case):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    n, labels, sizes, seed = CASES[case]
    want = _sklearn(n, labels, sizes, seed)
    got = splits.train_test_split_indices(n, stratify=labels, seed=seed, **sizes)
    assert len(list((tmp_path / "splits").glob("*.npz"))) == 1
    _no_sklearn(monkeypatch)
    again = splits.train_test_split_indices(n, stratify=labels, seed=seed, **sizes)
    for g, a, w in zip(got, again, want):
        assert g.dtype == a.dtype == np.int64 and np.array_equal(g, w) and np.array_equal(a, w)  # its order, not sorted


def test_each_thing_that_decides_a_split_is_in_its_key(tmp_path, monkeypatch):
    """Another seed, size, label array or count is another split: each computed by scikit-learn, and
    an int size (a count) is not the float of the same value (a fraction: 4.0 is refused)."""
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    labels = np.tile(np.arange(4), 25)
    variants = [dict(seed=0, test_size=0.2), dict(seed=1, test_size=0.2), dict(seed=0, test_size=0.3),
                dict(seed=0, test_size=20), dict(seed=0, train_size=0.2)]  # fmt: skip
    for v in variants:
        sizes = {k: x for k, x in v.items() if k != "seed"}
        got = splits.train_test_split_indices(100, stratify=labels, **v)
        for g, w in zip(got, _sklearn(100, labels, sizes, v["seed"])):
            assert np.array_equal(g, w), v
    other = labels.copy()
    other[:2] = other[1::-1]
    for g, w in zip(splits.train_test_split_indices(100, stratify=other, seed=0, test_size=0.2), _sklearn(100, other, {"test_size": 0.2}, 0)):
        assert np.array_equal(g, w)
    assert len(list((tmp_path / "splits").glob("*.npz"))) == len(variants) + 1
    splits.train_test_split_indices(100, stratify=labels, seed=0, train_size=4)
    with pytest.raises(ValueError, match="train_size"):  # scikit-learn's own error, nothing cached for it
        splits.train_test_split_indices(100, stratify=labels, seed=0, train_size=4.0)
    assert len(list((tmp_path / "splits").glob("*.npz"))) == len(variants) + 2
    with pytest.raises(ValueError, match="stratify has 99 labels for 100 examples"):
        splits.train_test_split_indices(100, stratify=labels[:99], seed=0, test_size=0.2)


def test_labels_of_any_dtype_split_as_scikit_learn_splits_them(tmp_path, monkeypatch):
    """The key holds each label's class index, not the labels' bytes: an object array's bytes are
    addresses, so new labels at freed addresses got another array's split (26 of 30 wrong) and each
    process wrote a new file. Object, string and float labels, and labels of mixed types that do not
    order (scikit-learn's own error, nothing cached), against scikit-learn."""
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    for i in range(30):
        ids = rng.integers(0, 3, 60)
        ids[:6] = [0, 0, 1, 1, 2, 2]
        for labels in (np.array([10**9 + int(v) for v in ids], dtype=object), np.array([f"class-{v}" for v in ids]),
                       ids * 0.5 - 3.0):  # fmt: skip
            got = splits.train_test_split_indices(60, stratify=labels, seed=i, test_size=0.25)
            for g, w in zip(got, _sklearn(60, labels, {"test_size": 0.25}, i)):
                assert np.array_equal(g, w), (i, labels.dtype)
        del labels
    # one file per (seed, class of each example): the three label kinds of a seed share it
    assert len(list((tmp_path / "splits").glob("*.npz"))) == 30
    mixed = np.array([1, "a"] * 10, dtype=object)  # np.unique cannot order them: scikit-learn's own error
    with pytest.raises(TypeError, match="not supported between instances of 'str' and 'int'"):
        _sklearn(20, mixed, {"test_size": 0.5}, 0)
    with pytest.raises(TypeError, match="not supported between instances of 'str' and 'int'"):
        splits.train_test_split_indices(20, stratify=mixed, seed=0, test_size=0.5)
    assert len(list((tmp_path / "splits").glob("*.npz"))) == 30


def test_a_damaged_or_foreign_cache_file_is_computed_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    labels = np.tile(np.arange(3), 30)
    a = splits.train_test_split_indices(90, stratify=labels, seed=0, test_size=0.2)
    b = splits.train_test_split_indices(90, stratify=labels, seed=1, test_size=0.2)
    files = sorted((tmp_path / "splits").glob("*.npz"), key=os.path.getmtime)
    assert len(files) == 2 and not all(np.array_equal(x, y) for x, y in zip(a, b))
    files[1].write_bytes(files[0].read_bytes())  # seed 0's file in seed 1's place
    with caplog.at_level(logging.WARNING, logger="wavesweep.splits"):
        again = splits.train_test_split_indices(90, stratify=labels, seed=1, test_size=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(again, b)) and "holds another computation" in caplog.text
    caplog.clear()
    files[1].write_bytes(files[1].read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING, logger="wavesweep.splits"):
        again = splits.train_test_split_indices(90, stratify=labels, seed=1, test_size=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(again, b)) and "ignoring unreadable cache file" in caplog.text
    _no_sklearn(monkeypatch)  # written again whole
    assert all(np.array_equal(x, y) for x, y in zip(splits.train_test_split_indices(90, stratify=labels, seed=1, test_size=0.2), b))


def test_a_cache_that_cannot_be_written_still_gives_the_arrays(tmp_path, monkeypatch):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("WAVESWEEP_CACHE", str(blocked))
    labels = np.tile(np.arange(3), 10)
    for g, w in zip(splits.train_test_split_indices(30, stratify=labels, seed=0, test_size=0.5), _sklearn(30, labels, {"test_size": 0.5}, 0)):
        assert np.array_equal(g, w)
    x, y = splits.load_digits()
    assert x.shape == (1797, 64) and blocked.read_text() == "a file where the cache folder should be"


def test_digits_equal_scikit_learns_computed_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    want_x, want_y = sklearn.datasets.load_digits(return_X_y=True)
    got = splits.load_digits()
    _no_sklearn(monkeypatch)
    again = splits.load_digits()
    for (gx, gy) in (got, again):
        assert gx.dtype == want_x.dtype and gy.dtype == want_y.dtype
        assert np.array_equal(gx, want_x) and np.array_equal(gy, want_y)


@pytest.mark.slow  # two child processes
def test_a_trial_with_the_cache_filled_does_not_import_scikit_learn(tmp_path, shared_cache):
    """What the cache is for: the second trial process (a study's validation split included) runs
    without importing scikit-learn, or scipy.stats with it, and records the same numbers."""
    from wavesweep import train

    weights = train.get_base_model("cnn", "digits", seed=0, cache_root=shared_cache, progress=False,
                                   train_config=train.TrainConfig(epochs=1, batch_size=64, lr=1e-2)).path  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(WAVESWEEP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    code = ("import json, sys\nfrom wavesweep import trial\nfrom wavesweep.config import TrialConfig\n"
            "cfg = TrialConfig.from_mapping({'model': 'cnn', 'weights': WEIGHTS, 'eval_limit': 120, 'val_fraction': 0.5, 'timing_batches': 0,"
            " 'recovery': 'none', 'percentile': 60})\n"
            "r = trial.run_trial(cfg)\n"
            "print(json.dumps([sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn' or m == 'scipy.stats'),"
            " r.outcomes['dwt'].eval.top1, r.outcomes['magnitude'].eval.top1]))\n").replace("WEIGHTS", repr(str(weights)))  # fmt: skip
    outs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout.strip().splitlines()[-1])
    import json

    first, second = json.loads(outs[0]), json.loads(outs[1])
    assert "sklearn" in first[0] and second[0] == [], outs
    assert first[1:] == second[1:]
