"""The validation/test split of the evaluation examples: disjoint, stratified, seeded; every
model scored on both parts, each equal to a direct evaluation; studies select on validation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from wavesweep import data, evaluate, evalsplit, schema, train, trial
from wavesweep.config import TrialConfig
from wavesweep.study.spec import STUDY_VAL_FRACTION, spec_from_mapping
from wavesweep.study.spec_yaml import SpecError


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 3])
def test_split_is_disjoint_complete_stratified_and_seeded(fraction, seed):
    rng = np.random.default_rng(1)
    y = rng.choice(7, size=503, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.05, 0.05])
    val, test = evalsplit.validation_indices(y, fraction, seed)
    assert np.intersect1d(val, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([val, test])), np.arange(len(y)))
    assert len(val) == int(np.floor(fraction * len(y)))
    for c in range(7):  # each class splits in the same proportion, to within one example
        n_c = (y == c).sum()
        assert abs((y[val] == c).sum() - fraction * n_c) <= 1, c
    again = evalsplit.validation_indices(y, fraction, seed)
    assert np.array_equal(val, again[0]) and np.array_equal(test, again[1])
    other = evalsplit.validation_indices(y, fraction, seed + 1)[0]
    assert not np.array_equal(val, other), "the seed changes which examples validate"


def test_no_validation_part_keeps_every_example_in_test():
    val, test = evalsplit.validation_indices(np.arange(10) % 3, 0.0)
    assert val.size == 0 and np.array_equal(test, np.arange(10))
    ds = data.TensorImages(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10) % 3, divisor=255.0, mean=(0.0,), std=(1.0,))
    v, t = evalsplit.split_eval_set(ds, 0.0)
    assert v is None and t is ds


@pytest.mark.parametrize(("y", "fraction", "needle"), [
    (np.arange(10), 0.5, "class 0 has 1 example"),
    (np.repeat(np.arange(10), 3), 0.1, "at least one example of each of the 10 classes"),
])  # fmt: skip
def test_unsplittable_examples_give_one_line(y, fraction, needle):
    with pytest.raises(ValueError) as err:
        evalsplit.validation_indices(y, fraction, 0)
    msg = str(err.value)
    assert "\n" not in msg and f"val_fraction={fraction}" in msg and needle in msg and "val_fraction=0" in msg


def test_no_examples_to_split_is_one_line():
    """An empty evaluation split (an IDX test file of 0 images) with val_fraction > 0 ended in numpy's
    "zero-size array to reduction operation minimum which has no identity"."""
    with pytest.raises(ValueError, match=r"^val_fraction=0.5 cannot split the evaluation examples: there are none"):
        evalsplit.validation_indices(np.zeros(0, dtype=np.int64), 0.5, 0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_val_fraction_is_refused(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        TrialConfig(val_fraction=bad)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> train.BaseModel:
    """An untrained CNN from a weights file: the parts' arithmetic does not depend on accuracy."""
    from wavesweep.models import build_model

    folder = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    torch.save(build_model("cnn", num_classes=10, in_channels=1, image_size=8).state_dict(), folder / "cnn.pt")
    return train.get_base_model("cnn", "digits", seed=0, weights=folder / "cnn.pt", cache_root=folder, progress=False)


def test_trial_scores_both_parts_exactly_and_reports_only_validation(tiny_base, monkeypatch, tmp_path):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    cfg = TrialConfig(model="cnn", dataset="digits", eval_limit=120, val_fraction=0.5, timing_batches=0,
                      percentile=70, level=2, wavelet="haar", recovery="none", device="cpu")  # fmt: skip
    seen: list[evaluate.Chunk] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trial.run_trial(cfg, base=tiny_base, reporter=seen.append)
    # the parts, recomputed independently from the configuration
    _, examples = trial.load_eval_set(cfg)
    y = data.dataset_targets(examples)
    val_idx, test_idx = evalsplit.validation_indices(y, 0.5, cfg.seed)
    val_set, test_set = data.take(examples, val_idx), data.take(examples, test_idx)
    assert r.eval_info["n_val"] == 60 and r.eval_info["n_eval"] == 60
    assert seen[-1].result.n == 60 and sum(c.n for c in seen) == 60, "the pruner sees the validation part only"
    m = r.metrics()
    for method, o in r.outcomes.items():
        direct_val = evaluate.evaluate(o.prune.model, val_set, device="cpu")
        direct_test = evaluate.evaluate(o.prune.model, test_set, device="cpu")
        assert m[method]["val_top1"] == pytest.approx(direct_val.top1) and m[method]["val_loss"] == pytest.approx(direct_val.loss)
        assert m[method]["top1"] == pytest.approx(direct_test.top1) and m[method]["f1_macro"] == pytest.approx(direct_test.f1_macro)
        assert np.array_equal(o.eval.targets, y[test_idx]) and np.array_equal(o.val_eval.targets, y[val_idx])
    assert m["dwt"]["base_val_top1"] == pytest.approx(evaluate.evaluate(tiny_base.model, val_set, device="cpu").top1)
    p = m["parent"]
    assert p["val_gain_top1_vs_magnitude"] == pytest.approx(p["val_top1"] - p["magnitude_val_top1"])
    assert r.paired["dwt_vs_magnitude"].n == 60  # paired statistics are on the test part
    assert set(p) - {k for k in p if k.startswith("seconds_")} == {
        k for k in schema.headline_names("none", True) if not schema.is_timing(k)}


def test_val_fraction_zero_is_the_whole_evaluation_set(tiny_base, monkeypatch, tmp_path):
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    cfg = TrialConfig(model="cnn", dataset="digits", eval_limit=90, timing_batches=0, percentile=60, level=2,
                      wavelet="haar", recovery="none", device="cpu")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trial.run_trial(cfg, base=tiny_base)
    _, examples = trial.load_eval_set(cfg)
    assert r.eval_info["n_val"] == 0 and r.outcomes["dwt"].val_eval is None
    assert r.outcomes["dwt"].eval.top1 == pytest.approx(evaluate.evaluate(r.outcomes["dwt"].prune.model, examples, device="cpu").top1)
    assert not any(k.startswith("val_") or "_val_" in k for k in r.metrics()["parent"])


def _spec(**over):
    d = {"base": {"model": "cnn", "dataset": "digits"}, "space": {"percentile": {"low": 10, "high": 90}},
         "objectives": {"top1": "maximize"}, "n_trials": 2}  # fmt: skip
    d.update(over)
    return spec_from_mapping(d, path=Path("s.yaml"))


def test_studies_select_on_validation_by_default():
    s = _spec()
    assert s.fixed["val_fraction"] == STUDY_VAL_FRACTION and s.validation
    assert s.selection_metrics == ["val_top1"]
    s = _spec(objectives={"gain_top1_vs_magnitude": "maximize", "compression_ratio": "maximize"})
    assert s.selection_metrics == ["val_gain_top1_vs_magnitude", "compression_ratio"]
    s = _spec(fixed={"val_fraction": 0})
    assert not s.validation and s.selection_metrics == ["top1"]


@pytest.mark.parametrize(("over", "needle"), [
    ({"objectives": {"dwt_vs_magnitude_ci_low": "maximize"}}, "measured on the test part only"),
    ({"space": {"val_fraction": [0.2, 0.5]}}, "cannot be searched"),
])  # fmt: skip
def test_selection_that_would_use_test_examples_is_refused(over, needle):
    with pytest.raises(SpecError, match=needle):
        _spec(**over)
