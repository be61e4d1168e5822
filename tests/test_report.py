"""Report functions over hand-made trial frames: no Optuna, no MLflow, no models."""

from __future__ import annotations

import itertools

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from wavesweep import report


def brute_pareto(points: np.ndarray, directions) -> np.ndarray:
    """Oracle: O(n^2) definition of non-domination, written independently of report.pareto_mask."""
    signs = [1 if d == "maximize" else -1 for d in directions]
    out = []
    for i, p in enumerate(points):
        if np.isnan(p).any():
            out.append(False)
            continue
        dominated = False
        for j, q in enumerate(points):
            if i == j or np.isnan(q).any():
                continue
            ge = all(s * q[k] >= s * p[k] for k, s in enumerate(signs))
            gt = any(s * q[k] > s * p[k] for k, s in enumerate(signs))
            dominated |= ge and gt
        out.append(not dominated)
    return np.array(out)


@pytest.mark.parametrize("directions", list(itertools.product(["maximize", "minimize"], repeat=2)) + [("maximize",) * 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_mask_matches_definition(directions, seed):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 6, size=(40, len(directions))).astype(float)  # ties on purpose
    pts[3, 0] = np.nan
    mask = report.pareto_mask(pts, directions)
    np.testing.assert_array_equal(mask, brute_pareto(pts, directions))
    assert mask.any() and not mask[3]


def test_pareto_mask_rejects_wrong_shape():
    with pytest.raises(ValueError, match="points must be"):
        report.pareto_mask(np.zeros((3, 2)), ["maximize"])


def make_frame(n: int = 12, seed: int = 0) -> pd.DataFrame:
    """A plausible study: accuracy falls with the pruned fraction, dwt a bit above magnitude."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        frac = float(rng.uniform(0.1, 0.95))
        dwt = 0.98 - 0.5 * frac**3 + rng.normal(0, 0.01)
        mag = dwt - 0.03
        rows.append({
            "number": i, "state": "PRUNED" if i % 5 == 4 else "COMPLETE",
            "wavelet": rng.choice(["haar", "bior2.2"]), "level": int(rng.integers(1, 6)), "percentile": frac * 100,
            "layout": rng.choice(["filter", "flat"]), "mode": "periodization",
            "top1": dwt, "magnitude_top1": mag, "random_top1": 0.1, "base_top1": 0.99,
            "pruned_fraction": frac, "magnitude_pruned_fraction": frac, "random_pruned_fraction": frac,
            "compression_ratio": 1 / (1 - frac * 0.9), "magnitude_compression_ratio": 1 / (1 - frac * 0.9),
            "random_compression_ratio": 1 / (1 - frac * 0.9), "gain_top1_vs_magnitude": dwt - mag,
            "dwt_vs_magnitude_ci_low": -0.01, "dwt_vs_magnitude_ci_high": 0.07, "dwt_vs_magnitude_mcnemar_p": 0.04,
            "partial_top1": 0.2 if i % 5 == 4 else np.nan, "mlflow_run_id": f"run{i}",
            "layers": {"name": ["conv1", "conv2"], "dwt_coeff_sparsity": [frac, frac], "dwt_weight_sparsity": [0.0, 0.01],
                       "magnitude_weight_sparsity": [frac, frac]},
            "value_0": dwt if i % 5 != 4 else np.nan, "value_1": 1 / (1 - frac * 0.9) if i % 5 != 4 else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def assert_png(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0, path


OBJ2 = [("top1", "maximize"), ("compression_ratio", "maximize")]


def test_write_report_makes_every_file(tmp_path):
    frame = make_frame()
    files = report.write_report(frame, tmp_path / "r", study_name="demo", objectives=OBJ2,
                                importances={"top1": {"percentile": 0.7, "wavelet": 0.3}})  # fmt: skip
    assert {p.suffix for p in files.values()} == {".png", ".csv", ".md"}
    for p in files.values():
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert_png(p)
    assert not list((tmp_path / "r").glob(".*tmp*")), "no temporary files left behind"
    summary = pd.read_csv(files["summary_csv"])
    done = frame[frame["state"] == "COMPLETE"]
    best = summary[summary["selection"] == "best top1 (maximize)"].iloc[0]
    assert best["trial"] == done.loc[done["value_0"].idxmax(), "number"]
    assert best["magnitude_top1"] == pytest.approx(done["magnitude_top1"].max())  # matched baseline of the best
    front = summary[summary["selection"] == "pareto front"]
    vals = done[["value_0", "value_1"]].to_numpy()
    assert len(front) == brute_pareto(vals, ["maximize", "maximize"]).sum()
    md = files["summary_md"].read_text()
    assert "| selection | trial |" in md and "coefficient" in md  # says where dwt's compression lives
    assert md.count("\n| ") == len(summary) + 1  # the header and one Markdown row per table row
    trials = pd.read_csv(files["trials_csv"])
    assert len(trials) == len(frame) and "layers" not in trials


def test_summary_table_single_objective_and_minimize():
    frame = make_frame()
    table = report.summary_table(frame, [("top1", "minimize")])
    done = frame[frame["state"] == "COMPLETE"]
    assert len(table) == 1 and table.loc[0, "trial"] == done.loc[done["value_0"].idxmin(), "number"]
    assert "pruned_fraction" in table and "dwt_vs_magnitude_mcnemar_p" in table


def test_reports_survive_a_study_without_complete_trials(tmp_path):
    frame = make_frame(3).assign(state="PRUNED", value_0=np.nan, value_1=np.nan)
    files = report.write_report(frame, tmp_path, study_name="none", objectives=[("top1", "maximize")], importances={})
    for p in files.values():
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert_png(p)
    assert pd.read_csv(files["summary_csv"]).empty
    assert "no complete trials" in files["summary_md"].read_text()


def test_markdown_escapes_and_formats():
    md = report.to_markdown(pd.DataFrame({"a": ["x|y"], "b": [0.123456789], "c": [np.nan]}))
    lines = md.strip().splitlines()
    assert lines[0] == "| a | b | c |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| x\\|y | 0.1235 |  |"


def test_layer_plot_without_record(tmp_path):
    assert_png(report.plot_layer_sparsity(None, tmp_path / "l.png"))
