"""Report, figure and trials-frame functions over hand-made trial frames: no Optuna, no MLflow,
no models."""

from __future__ import annotations

import itertools
import os
import shutil

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from wavesweep import figures, report, trials_frame


def brute_pareto(points: np.ndarray, directions) -> np.ndarray:
    """Oracle: O(n^2) definition of non-domination, written independently of trials_frame.pareto_mask."""
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
    mask = trials_frame.pareto_mask(pts, directions)
    np.testing.assert_array_equal(mask, brute_pareto(pts, directions))
    assert mask.any() and not mask[3]


def test_pareto_mask_rejects_wrong_shape():
    with pytest.raises(ValueError, match="points must be"):
        trials_frame.pareto_mask(np.zeros((3, 2)), ["maximize"])


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
                       "magnitude_weight_sparsity": [frac, frac], "level_requested": [3, 3], "level_effective": [0, 3]},
            "recovery": ["none", "bn"][i % 2], "n_eval": 360, "num_classes": 10, "dataset": "digits",
            "prerec_top1": dwt - 0.1 * (i % 2), "magnitude_prerec_top1": mag - 0.1 * (i % 2), "random_prerec_top1": 0.1,
            "stored_bytes": 4e6 * (1 - frac * 0.9), "magnitude_stored_bytes": 4e6 * (1 - frac * 0.9),
            "random_stored_bytes": 4e6 * (1 - frac * 0.9), "dense_bytes": 4e6,
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


@pytest.mark.parametrize("param, values", [("finetune_lr", [1e-4, 1e-3, 3e-3]), ("targets", ["conv", "conv,linear", "linear"]),
                                           ("recovery_batches", [5, 50, 20])])  # fmt: skip
def test_summary_names_every_searched_parameter_of_the_best(tmp_path, param, values):
    """Any trial parameter can be searched; the best-configuration table showed only wavelet,
    level, percentile, layout, mode, scope, keep_approx and recovery, so a study searching
    ``finetune_lr`` named its best trial without the value that made it best."""
    frame = make_frame().assign(dataset="digits")
    frame[param] = [values[i % 3] for i in range(len(frame))]
    files = report.write_report(frame, tmp_path, study_name="demo", objectives=[("top1", "maximize")], importances={})
    summary = pd.read_csv(files["summary_csv"], dtype={param: type(values[0])})
    done = frame[frame["state"] == "COMPLETE"]
    best = done.loc[done["value_0"].idxmax()]
    assert summary.loc[0, "trial"] == best["number"] and summary.loc[0, param] == best[param]
    assert f" {param} |" in files["summary_md"].read_text()
    assert "dataset" not in summary  # the same in every trial: not a column


def test_reports_survive_a_study_without_complete_trials(tmp_path):
    frame = make_frame(3).assign(state="PRUNED", value_0=np.nan, value_1=np.nan)
    files = report.write_report(frame, tmp_path, study_name="none", objectives=[("top1", "maximize")], importances={})
    for p in files.values():
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert_png(p)
    assert pd.read_csv(files["summary_csv"]).empty
    assert "no complete trials" in files["summary_md"].read_text()
    # no selection happened: not "no validation part: val_fraction 0" (a failed or pruned trial records no n_val)
    assert "Selection: no complete trial, so none was selected." in files["summary_md"].read_text()
    assert "val_fraction" not in files["summary_md"].read_text()


def test_markdown_escapes_and_formats():
    md = report.to_markdown(pd.DataFrame({"a": ["x|y"], "b": [0.123456789], "c": [np.nan]}))
    lines = md.strip().splitlines()
    assert lines[0] == "| a | b | c |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| x\\|y | 0.1235 |  |"


def test_summary_writes_counts_and_bytes_in_full(tmp_path):
    """Metrics come back from Optuna as floats; a count or a byte size in summary.md is the number
    itself (n_eval 12345, not .4g's 1.234e+04), the other numbers keep four significant digits."""
    frame = make_frame()
    frame = frame.assign(n_eval=12345.0, n_val=10000.0, value_0=23808400.0 + 8.0 * frame["number"])  # trial 0 is best
    md = report.write_report(frame, tmp_path, study_name="counts", objectives=[("stored_bytes", "minimize")],
                             importances={})["summary_md"].read_text()  # fmt: skip
    table = [l for l in md.splitlines() if l.startswith("| best")]
    assert table, md
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert {"12345", "10000", "23808400"} <= set(cells), cells
    assert not any("e+" in c for c in cells), cells
    assert report.to_markdown(pd.DataFrame({"x": [0.123456789, 2.0, -3.0, 1e20]})).splitlines()[2:] == [
        "| 0.1235 |", "| 2 |", "| -3 |", f"| {10**20} |"]


@pytest.mark.parametrize("objectives, n_val", [
    ([("val_top1", "maximize")], 180.0), ([("top1", "maximize")], 0.0),  # a study with a validation part has val_top1
    ([("compression_ratio", "maximize")], 0.0), ([("compression_ratio", "maximize")], 180.0),
    ([("stored_bytes", "minimize"), ("magnitude_stored_bytes", "minimize")], 180.0),
])  # fmt: skip
def test_selection_note_says_what_selected(tmp_path, objectives, n_val):
    """The note under summary.md's title names what chose the best trials: the validation part
    (a val_* objective), the test examples themselves (optimistic scores), or nothing example-
    dependent at all (compression, bytes: the scores are not selected on); never "no validation
    part" for a study that has one."""
    frame = make_frame().assign(n_val=n_val, n_eval=180.0)
    md = report.write_report(frame, tmp_path, study_name="s", objectives=objectives, importances={})["summary_md"].read_text()
    note = next(l for l in md.splitlines() if l.startswith("Selection:"))
    by_val = objectives[0][0].startswith("val_") and n_val > 0
    free = objectives[0][0] in ("compression_ratio", "stored_bytes")
    assert ("**validation** part" in note) == by_val, note
    assert ("optimistic" in note) == (not by_val and not free), note
    assert ("val_fraction` 0" in note) == (n_val == 0 and not by_val and not free), note
    if free:
        assert "do not depend on the evaluation examples" in note and "180 test examples" in note, note


def test_layer_plot_without_record(tmp_path):
    assert_png(figures.plot_layer_sparsity(None, tmp_path / "l.png"))


# --------------------------------------------------------------------------- figures that do not mislead


@pytest.mark.parametrize("seed", range(6))
def test_pareto_staircase_never_claims_more_than_measured(seed):
    """Every vertex of the drawn front is weakly dominated by a measured point (below and to the
    left of it), and every point of the brute-force front is a vertex."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(1, 20, 30), rng.uniform(0, 1, 30)
    x[:3] = np.round(x[:3])  # some ties
    sx, sy = trials_frame.front_staircase(x, y)
    pts = np.column_stack([x, y])
    for vx, vy in zip(sx, sy):
        assert np.any((x >= vx - 1e-12) & (y >= vy - 1e-12)), (vx, vy)
    front = pts[brute_pareto(pts, ["maximize", "maximize"])]
    vertices = set(zip(sx.round(12), sy.round(12)))
    assert {(round(a, 12), round(b, 12)) for a, b in front} <= vertices
    assert np.all(np.diff(sx) >= 0) and np.all(np.diff(sy) <= 0)  # a staircase: right and down only


def test_pareto_staircase_drops_right_after_a_point():
    """0.645 measured at 2.4x and only chance beyond: the line falls at 2.4x."""
    sx, sy = trials_frame.front_staircase(np.array([1.0, 2.4, 18.0, 2.0]), np.array([0.9, 0.645, 0.1, 0.5]))
    assert list(zip(sx, sy)) == [(1.0, 0.9), (1.0, 0.645), (2.4, 0.645), (2.4, 0.1), (18.0, 0.1)]


def _capture(monkeypatch):
    figs = []
    real = figures._save

    def keep(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return figs


def test_accuracy_vs_pruned_fraction_per_recovery_with_intervals(tmp_path, monkeypatch):
    frame = make_frame(12)
    frame = pd.concat([frame, frame.iloc[[0]].assign(number=99, top1=frame["top1"].iloc[0] - 0.04)], ignore_index=True)  # a replicate
    pts = figures.method_points(frame, "pruned_fraction")
    done = frame[frame["state"] == "COMPLETE"]
    assert len(pts) == 3 * (len(done) - 1)  # trial 0 and its replicate are one configuration
    rep = pts[(pts["method"] == "dwt") & (pts["n_runs"] == 2)].iloc[0]
    assert rep["top1"] == pytest.approx(frame["top1"].iloc[0] - 0.02)
    assert (rep["low"], rep["high"]) == pytest.approx((frame["top1"].iloc[0] - 0.04, frame["top1"].iloc[0]))
    one = pts[(pts["method"] == "magnitude") & (pts["n_runs"] == 1)].iloc[0]
    from scipy.stats import binomtest

    ci = binomtest(round(one["top1"] * 360), 360).proportion_ci(method="wilson")
    assert (one["low"], one["high"]) == pytest.approx((ci.low, ci.high))
    assert figures.chance_level(frame) == pytest.approx(0.1)
    assert figures.chance_level(frame.drop(columns="num_classes")) == pytest.approx(0.1)  # digits, from the registry

    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_pruned_fraction(frame, tmp_path / "a.png"))
    fig = figs[-1]
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["recovery: none", "recovery: bn"]
    assert {"dwt", "magnitude", "random", "unpruned", "chance (1/10)"} <= {t.get_text() for t in fig.legends[0].get_texts()}
    for ax in axes:
        labels = ax.get_legend_handles_labels()[1]
        assert {"dwt", "magnitude", "random", "unpruned", "chance (1/10)"} <= set(labels)
        for line in ax.get_lines():  # no line joins two configurations: only flat reference lines
            xs, ys = line.get_data()
            if line.get_linestyle() not in ("None", "") and len(xs) > 1:
                assert np.ptp(np.asarray(ys, float)) == 0 or np.ptp(np.asarray(xs, float)) == 0, line.get_label()
    assert "dwt before recovery" in axes[1].get_legend_handles_labels()[1]
    assert "dwt before recovery" not in axes[0].get_legend_handles_labels()[1]


def _errorbars_drawn(fig):
    """Per titled panel and method: the drawn points and interval ends, read back from the errorbars."""
    out = {}
    for ax in (a for a in fig.axes if a.get_title()):
        for c in ax.containers:
            (line, _caps, (bars,)) = c.lines[0], c.lines[1], c.lines[2]
            ends = np.array([seg[:, 1] for seg in bars.get_segments()])
            out[(ax.get_title(), c.get_label())] = np.column_stack([line.get_xydata(), ends])
    return out


def test_one_configuration_twice_at_one_seed_is_one_run(tmp_path, monkeypatch):
    """Optuna sampling a configuration again at the same seed repeats the same run: it plots what one
    copy plots (its value and Wilson interval, n_runs 1), not a zero-width "replicate range" of 2;
    the same configuration at another seed is a replicate range."""
    from scipy.stats import binomtest

    frame = make_frame(6).assign(state="COMPLETE", seed=0)
    twice = pd.concat([frame, frame.iloc[[0]].assign(number=99)], ignore_index=True)
    cols = ["method", "pruned_fraction", "top1", "low", "high", "n_runs", "interval", "recovery"]
    one, dup = figures.method_points(frame, "pruned_fraction"), figures.method_points(twice, "pruned_fraction")
    pd.testing.assert_frame_equal(dup[cols], one[cols])
    row = dup[(dup["method"] == "dwt") & dup["numbers"].map(lambda n: 0 in n)].iloc[0]
    ci = binomtest(round(frame["top1"].iloc[0] * 360), 360).proportion_ci(method="wilson")
    assert row["interval"] == "wilson" and row["n_runs"] == 1 and row["top1"] == frame["top1"].iloc[0]
    assert (row["low"], row["high"]) == pytest.approx((ci.low, ci.high))
    figs = _capture(monkeypatch)
    figures.plot_accuracy_vs_pruned_fraction(frame, tmp_path / "one.png")
    figures.plot_accuracy_vs_pruned_fraction(twice, tmp_path / "twice.png")
    drawn_one, drawn_twice = _errorbars_drawn(figs[0]), _errorbars_drawn(figs[1])
    assert drawn_one.keys() == drawn_twice.keys() and len(drawn_one) == 6  # 2 recoveries x 3 methods
    for key, pts in drawn_one.items():
        np.testing.assert_array_equal(drawn_twice[key], pts, err_msg=str(key))

    top1 = frame["top1"].iloc[0]
    other = pd.concat([frame, frame.iloc[[0]].assign(number=99, seed=1, top1=top1 - 0.04)], ignore_index=True)
    pts = figures.method_points(other, "pruned_fraction")
    rep = pts[(pts["method"] == "dwt") & pts["numbers"].map(lambda n: 0 in n)].iloc[0]
    assert rep["interval"] == "replicate range" and rep["n_runs"] == 2 and rep["numbers"] == [0, 99]
    assert (rep["top1"], rep["low"], rep["high"]) == pytest.approx((top1 - 0.02, top1 - 0.04, top1))


def test_accuracy_vs_compression_one_panel_and_front_per_recovery(tmp_path, monkeypatch):
    """A finetune trial that dominates a one-shot trial does not take it off the front: one panel
    per recovery setting, each with the Pareto front of its own trials."""
    frame = make_frame(2).assign(state="COMPLETE", recovery=["none", "finetune"], compression_ratio=[4.0, 5.0], top1=[0.6, 0.9])
    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_compression(frame, tmp_path / "c.png"))
    axes = [ax for ax in figs[-1].axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["recovery: none", "recovery: finetune"]
    for ax, rec in zip(axes, ["none", "finetune"]):
        mine = frame[frame["recovery"] == rec]
        want = mine[brute_pareto(mine[["compression_ratio", "top1"]].to_numpy(), ["maximize", "maximize"])]
        dwt = next(c for c in ax.collections if c.get_label() == "dwt")
        np.testing.assert_array_equal(dwt.get_offsets(), mine[["compression_ratio", "top1"]].to_numpy())
        front = next(l for l in ax.get_lines() if l.get_label() == "dwt front of the points drawn (test top-1, compression)")
        assert set(map(tuple, want[["compression_ratio", "top1"]].to_numpy())) <= set(map(tuple, front.get_xydata()))
        assert [t.get_text() for t in ax.texts] == [f"#{n}" for n in want["number"]]


def test_the_studys_own_pareto_front_is_ringed_where_it_differs_from_the_drawn_points_front(tmp_path, monkeypatch):
    """A study selecting on val_top1 has its own Pareto front; the figure's line is the front of
    the test top-1 points it draws. Trial 2, on the drawn front but dominated on the validation
    scores, was labelled like a front trial with nothing to tell the two apart: the study's front
    (summary.md's "pareto front" rows) is now ringed and named in the legend."""
    frame = make_frame(4).assign(state="COMPLETE", recovery="none", compression_ratio=[2.0, 3.0, 4.0, 5.0],
                                 top1=[0.9, 0.8, 0.7, 0.6], value_0=[0.9, 0.8, 0.5, 0.6],
                                 value_1=[2.0, 3.0, 4.0, 5.0])  # fmt: skip
    objectives = [("val_top1", "maximize"), ("compression_ratio", "maximize")]
    rows = report.best_rows(frame, objectives)
    want = sorted(rows.loc[rows["selection"] == "pareto front", "number"])
    assert want == [0, 1, 3] and report._front_numbers(frame, objectives) == want
    assert report._front_numbers(frame, objectives[:1]) == []
    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_compression(frame, tmp_path / "c.png", study_front=want,
                                                   objectives=["val_top1", "compression_ratio"]))  # fmt: skip
    (ax,) = [ax for ax in figs[-1].axes if ax.get_title()]
    ring = next(c for c in ax.collections if c.get_label() == "the study's Pareto front (val_top1, compression_ratio)")
    np.testing.assert_array_equal(ring.get_offsets(), frame.loc[want, ["compression_ratio", "top1"]].to_numpy())
    assert [t.get_text() for t in ax.texts] == ["#0", "#1", "#2", "#3"]  # the drawn points' own front: all four
    legend = [t.get_text() for t in figs[-1].legends[0].get_texts()]
    assert "the study's Pareto front (val_top1, compression_ratio)" in legend


def test_front_trials_at_one_point_share_one_label(tmp_path, monkeypatch):
    """Two trials of one configuration (TPE samples a point twice) sit at one point of the front:
    one label names both, instead of two labels drawn over each other."""
    frame = make_frame(3).assign(state="COMPLETE", recovery="none", compression_ratio=[4.0, 4.0, 2.0], top1=[0.9, 0.9, 0.5])
    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_compression(frame, tmp_path / "c.png"))
    (ax,) = [ax for ax in figs[-1].axes if ax.get_title()]
    assert [(t.get_text(), t.xy) for t in ax.texts] == [("#0, #1", (4.0, 0.9))]
    # a near tie (both on the front, 0.05 % of the axes apart) is one label too; points 20 % apart are not
    frame = make_frame(4).assign(state="COMPLETE", recovery="none", compression_ratio=[2.0, 2.841, 2.842, 3.0],
                                 top1=[0.95, 0.7863, 0.7859, 0.75])  # fmt: skip
    assert_png(figures.plot_accuracy_vs_compression(frame, tmp_path / "d.png"))
    (ax,) = [ax for ax in figs[-1].axes if ax.get_title()]
    assert [t.get_text() for t in ax.texts] == ["#0", "#1, #2", "#3"]


@pytest.mark.parametrize("metric", ["top1", "val_top1"])
def test_history_marks_pruned_trials_of_top1_objectives(tmp_path, monkeypatch, metric):
    """A study with a validation part optimises val_top1: its pruned trials are drawn too."""
    frame = make_frame(10)
    figs = _capture(monkeypatch)
    assert_png(figures.plot_history(frame, [(metric, "maximize")], tmp_path / "h.png"))
    ax = figs[-1].axes[0]
    assert "pruned (partial top1)" in [t.get_text() for t in ax.get_legend().get_texts()]
    marks = next(c for c in ax.collections if c.get_label() == "pruned (partial top1)")
    pruned = frame[frame["state"] == "PRUNED"]
    assert len(pruned) == 2
    np.testing.assert_array_equal(marks.get_offsets(), pruned[["number", "partial_top1"]].to_numpy())


@pytest.mark.parametrize("plot", ["pruned_fraction", "stored_mb", "compression", "gap"])
def test_trials_without_a_recorded_recovery_are_drawn(tmp_path, monkeypatch, plot):
    """Trials of a study recorded before recovery existed (recovery NaN) have their own panel
    ("not recorded") in every per-recovery figure; the gap figure, one marker per recovery."""
    frame = make_frame(2).assign(state="COMPLETE", recovery=["bn", np.nan], top1=[0.7, 0.8], gain_top1_vs_magnitude=[0.02, 0.05])
    draw = {"pruned_fraction": figures.plot_accuracy_vs_pruned_fraction, "stored_mb": figures.plot_accuracy_vs_stored_mb,
            "compression": figures.plot_accuracy_vs_compression, "gap": figures.plot_gap}[plot]  # fmt: skip
    figs = _capture(monkeypatch)
    assert_png(draw(frame, tmp_path / "f.png"))
    axes = [ax for ax in figs[-1].axes if ax.get_title()]
    if plot == "gap":  # one panel, every trial a marker
        marks = {c.get_label(): list(c.get_offsets()[:, 1]) for c in axes[0].collections if not c.get_label().startswith("_")}
        assert marks == {"recovery bn: CI contains 0 (not significant)": pytest.approx([0.02]),
                         "recovery not recorded: CI contains 0 (not significant)": pytest.approx([0.05])}  # fmt: skip
        return
    assert [ax.get_title() for ax in axes] == ["recovery: bn", "recovery: not recorded"]
    for ax, mine in zip(axes, [frame.iloc[[0]], frame.iloc[[1]]]):
        if plot == "compression":
            ys = next(c for c in ax.collections if c.get_label() == "dwt").get_offsets()[:, 1]
        else:
            ys = next(c for c in ax.containers if c.get_label() == "dwt").lines[0].get_ydata()
        assert list(ys) == list(mine["top1"])


def test_gap_figure_draws_each_trial_by_the_interval_it_has(tmp_path, monkeypatch):
    """A trial of one evaluation has its paired bootstrap interval; a trial over replicate seeds has
    none, but the t-interval of its gain across the seeds; a trial with neither was drawn hollow
    under "CI contains 0 (not significant)", a claim about an interval it does not have."""
    frame = make_frame(4).assign(state="COMPLETE", recovery="bn", pruned_fraction=[0.5, 0.6, 0.7, 0.8],
                                 gain_top1_vs_magnitude=[0.03, 0.02, 0.04, 0.01],
                                 dwt_vs_magnitude_ci_low=[0.01, np.nan, np.nan, np.nan],
                                 dwt_vs_magnitude_ci_high=[0.05, np.nan, np.nan, np.nan],
                                 gain_top1_vs_magnitude_ci_low=[np.nan, -0.01, 0.02, np.nan],
                                 gain_top1_vs_magnitude_ci_high=[np.nan, 0.05, 0.06, np.nan])  # fmt: skip
    figs = _capture(monkeypatch)
    assert_png(figures.plot_gap(frame, tmp_path / "g.png"))
    ax = figs[-1].axes[0]
    marks = {c.get_label(): [tuple(p) for p in c.get_offsets()] for c in ax.collections if not c.get_label().startswith("_")}
    assert marks == {"CI excludes 0": [(0.5, 0.03), (0.7, 0.04)], "CI contains 0 (not significant)": [(0.6, 0.02)],
                     "no interval recorded": [(0.8, 0.01)]}  # fmt: skip
    (bars,) = [c for c in ax.collections if c.get_label().startswith("_") or type(c).__name__ == "LineCollection"][:1]
    spans = sorted(tuple(np.round(seg[:, 1], 6)) for seg in bars.get_segments())
    assert spans == [(-0.01, 0.05), (0.01, 0.05), (0.02, 0.06)]


def bh_oracle(p):
    """Benjamini-Hochberg by its definition: min over j >= i of p_(j) * n / j, capped at 1."""
    p = np.asarray(p, float)
    n = len(p)
    order = np.argsort(p)
    adj = np.empty(n)
    for rank, i in enumerate(order, start=1):
        adj[i] = min(1.0, min(p[order[j - 1]] * n / j for j in range(rank, n + 1)))
    return adj


def test_adjusted_p_values_and_verdicts(tmp_path):
    from scipy.stats import false_discovery_control

    frame = make_frame(12)
    rng = np.random.default_rng(5)
    frame["dwt_vs_magnitude_mcnemar_p"] = rng.uniform(0, 0.2, len(frame))
    done = frame["state"] == "COMPLETE"
    out = report.with_significance(frame)
    got = out.loc[done, "dwt_vs_magnitude_p_adj"].to_numpy()
    np.testing.assert_allclose(got, bh_oracle(frame.loc[done, "dwt_vs_magnitude_mcnemar_p"]), rtol=1e-12)
    np.testing.assert_allclose(got, false_discovery_control(frame.loc[done, "dwt_vs_magnitude_mcnemar_p"]), rtol=1e-12)
    assert out.loc[~done, "dwt_vs_magnitude_p_adj"].isna().all()
    # make_frame's interval [-0.01, 0.07] contains 0: never significant, whatever p says
    assert set(out.loc[done, "dwt_vs_magnitude_verdict"]) == {"not significant (CI contains 0)"}
    frame.loc[0, ["dwt_vs_magnitude_ci_low", "dwt_vs_magnitude_mcnemar_p"]] = [0.01, 1e-6]
    assert report.with_significance(frame).loc[0, "dwt_vs_magnitude_verdict"] == "significant"
    frame.loc[0, "dwt_vs_magnitude_mcnemar_p"] = np.nan  # an interval without a p-value: no verdict on p
    assert report.with_significance(frame).loc[0, "dwt_vs_magnitude_verdict"] == "no p-value"

    files = report.write_report(make_frame(12), tmp_path, study_name="s", objectives=[("top1", "maximize")],
                                importances={"top1": {"percentile": 0.6, "wavelet": 0.4}})  # fmt: skip
    md = files["summary_md"].read_text()
    n_p = int(trials_frame.complete(make_frame(12))["dwt_vs_magnitude_mcnemar_p"].notna().sum())
    assert 0 < n_p < 12  # some trials are not complete: the count is of the tested ones
    assert (f"Benjamini-Hochberg (scipy.stats.false_discovery_control), applied to each baseline separately, as its own "
            f"family: the {n_p} dwt-vs-magnitude McNemar p-values, one per distinct configuration") in md  # fmt: skip
    # every trial over replicate seeds (no McNemar p anywhere): said so, not "over the 0 complete trials"
    frame = make_frame(12).assign(dwt_vs_magnitude_mcnemar_p=np.nan)
    md0 = report.write_report(frame, tmp_path / "rep", study_name="s", objectives=[("top1", "maximize")])["summary_md"].read_text()
    assert "over the 0 complete trials" not in md0 and "No complete trial has a McNemar p, so no p is adjusted" in md0
    summary = pd.read_csv(files["summary_csv"])
    best = summary[summary["selection"] == "best top1 (maximize)"].iloc[0]
    assert best["dwt_vs_magnitude_verdict"] == "not significant (CI contains 0)"
    line = next(l for l in md.splitlines() if l.startswith(f"- trial {best['trial']} (best top1"))
    assert "not significant (CI contains 0)" in line and "adjusted p" in line


@pytest.mark.slow  # a subprocess or a fresh MLflow store: seconds, not milliseconds
def test_importances_from_few_trials_say_so(tmp_path, monkeypatch):
    figs = _capture(monkeypatch)
    imp = {"top1": {"percentile": 0.6, "wavelet": 0.4}}
    files = report.write_report(make_frame(12), tmp_path / "few", study_name="s", objectives=[("top1", "maximize")], importances=imp)
    md = files["summary_md"].read_text()
    n = int((make_frame(12)["state"] == "COMPLETE").sum())
    assert f"**Caution:** importances computed from only {n} distinct complete configurations (< 20)" in md
    fig = next(f for f in figs if f._suptitle is not None and "CAUTION" in f._suptitle.get_text())
    assert f"only {n} distinct complete configurations" in fig._suptitle.get_text()
    files = report.write_report(make_frame(40), tmp_path / "many", study_name="s", objectives=[("top1", "maximize")], importances=imp)
    assert "Caution" not in files["summary_md"].read_text()
    assert "Computed from 32 distinct complete configurations." in files["summary_md"].read_text()


@pytest.mark.slow  # renders every figure again, for a person to open; every file is checked above
def test_report_pngs_for_the_reader(tmp_path):
    """Every figure is written (and, for a person reviewing a change, worth opening)."""
    out = tmp_path / "r"
    files = report.write_report(make_frame(24), out, study_name="demo", objectives=OBJ2,
                                importances={"top1": {"percentile": 0.7, "wavelet": 0.3}})  # fmt: skip
    for key in ("accuracy_vs_stored_mb", "gap_vs_pruned_fraction", "gap_by_wavelet_family", "gap_by_layout", "levels"):
        assert_png(files[key])
    if os.environ.get("WAVESWEEP_REPORT_OUT"):
        shutil.copytree(out, os.environ["WAVESWEEP_REPORT_OUT"], dirs_exist_ok=True)


def test_summary_columns_are_schema_names():
    """The report's columns name metrics a trial records (``wavesweep.schema``), the significance
    columns the report adds, or the replicate interval ends of recorded metrics: a misspelt name
    cannot silently drop a column."""
    from wavesweep import schema

    recorded = set(schema.headline_names())
    added = {f"dwt_vs_{b}_{k}" for b in schema.BASELINES for k in ("p_adj", "verdict")}
    assert set(report.SUMMARY_METRICS) <= recorded | added, set(report.SUMMARY_METRICS) - recorded - added
    for name in report.REPLICATE_METRICS:
        assert name == "n_replicates" or name.rsplit("_ci_", 1)[0] in recorded, name


def test_one_fraction_is_not_drawn_zoomed_in_on_the_side_by_side_offsets(tmp_path, monkeypatch):
    """Every trial at one pruned fraction: the axis zoomed in on the methods' side-by-side offsets
    (ticks 0.5483, 0.5495, 0.5507 read as three fractions). It spans at least 0.1 around it now,
    and every drawn point is inside it."""
    frame = make_frame(6).assign(**{f"{m}{c}": v for m in ("", "magnitude_", "random_")
                                    for c, v in (("pruned_fraction", 0.55), ("stored_bytes", 2.4e6))})
    figs = _capture(monkeypatch)
    figures.plot_accuracy_vs_pruned_fraction(frame, tmp_path / "a.png")
    figures.plot_accuracy_vs_stored_mb(frame, tmp_path / "b.png")
    for fig, (lo_needed, hi_needed) in zip(figs, [(0.5, 0.6), (2.4 * 0.95, 2.4 * 1.05)]):
        for ax in (a for a in fig.axes if a.get_title()):
            lo, hi = ax.get_xlim()
            assert lo <= lo_needed and hi >= hi_needed, (ax.get_title(), lo, hi)
            xs = np.concatenate([c.lines[0].get_xydata()[:, 0] for c in ax.containers])
            assert ((xs > lo) & (xs < hi)).all()


def test_one_compression_ratio_is_not_drawn_zoomed_in_on_its_rounding(tmp_path, monkeypatch):
    """A recovery setting with one trial (a small study: dwt 2.88115, magnitude 2.88141): the axis
    was zoomed in on the 0.0003 between them and labelled 0.00015 ... 0.00040 with an offset
    '+2.881' in the corner, so the two methods read as far apart in compression. It spans at least
    10 % of the ratio now (as the stored-size axis does), with plain tick labels."""
    frame = make_frame(3).assign(state="COMPLETE", recovery=["bn", "bn", "finetune"], compression_ratio=[1.8447, 2.0273, 2.88115],
                                 magnitude_compression_ratio=[1.8447, 2.0273, 2.88141],
                                 random_compression_ratio=[1.8447, 2.0273, 2.88141])  # fmt: skip
    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_compression(frame, tmp_path / "c.png"))
    fig = figs[-1]
    fig.canvas.draw()
    for ax in (a for a in fig.axes if a.get_title()):
        lo, hi = ax.get_xlim()
        xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
        assert hi - lo >= 0.1 * xs.max(), (ax.get_title(), lo, hi)
        assert ((xs > lo) & (xs < hi)).all()
        assert ax.xaxis.get_offset_text().get_text() == "", (ax.get_title(), ax.xaxis.get_offset_text().get_text())


def test_methods_of_equal_accuracy_are_drawn_side_by_side_not_on_top_of_each_other(tmp_path, monkeypatch):
    """dwt and magnitude of the same top-1 at the same size (an effective-level-0 trial; often after
    ``bn``): accuracy_vs_stored_mb offset them by a share of the trials' span alone, before the
    dense model's line widened the axis; under a pixel apart there, magnitude's square hid dwt's
    circle. Each figure's markers are at least half a marker apart on the axis as drawn."""
    frame = make_frame(4).assign(state="COMPLETE", recovery=["none", "bn", "none", "bn"], dense_bytes=378560.0,
                                 magnitude_top1=lambda f: f["top1"],
                                 **{f"{m}stored_bytes": [205220.0, 205220.0, 131392.0, 131392.0] for m in ("", "magnitude_", "random_")})  # fmt: skip
    figs = _capture(monkeypatch)
    figures.plot_accuracy_vs_pruned_fraction(frame, tmp_path / "a.png")
    figures.plot_accuracy_vs_stored_mb(frame, tmp_path / "b.png")
    for fig in figs:
        fig.canvas.draw()
        for ax in (a for a in fig.axes if a.get_title()):
            at = {}
            for c in ax.containers:  # an errorbar per method, labelled with it
                at[c.get_label()] = ax.transData.transform(c.lines[0].get_xydata())
            assert {"dwt", "magnitude"} <= set(at), (ax.get_title(), list(at))
            size_px = 6 * fig.dpi / 72  # the markers' size, 6 points
            apart = np.hypot(*(at["dwt"] - at["magnitude"]).T)
            assert (apart >= size_px / 2).all(), (ax.get_title(), apart, size_px)


def test_dense_model_line_in_the_legend_is_drawn(tmp_path, monkeypatch):
    """accuracy_vs_stored_mb listed a 'dense model' line in its legend while the axis, zoomed in on
    the trials' stored sizes (0.13 to 0.21 MB of a 0.38 MB model), left it out of every panel."""
    frame = make_frame(3).assign(state="COMPLETE", recovery=["bn", "bn", "finetune"], dense_bytes=378560.0,
                                 **{f"{m}stored_bytes": [205220.0, 186732.0, 131392.0] for m in ("", "magnitude_", "random_")})  # fmt: skip
    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_stored_mb(frame, tmp_path / "s.png"))
    fig = figs[-1]
    assert "dense model" in [t.get_text() for t in fig.legends[0].get_texts()]
    for ax in (a for a in fig.axes if a.get_title()):
        (line,) = [l for l in ax.get_lines() if l.get_label() == "dense model"]
        lo, hi = ax.get_xlim()
        assert lo < line.get_xdata()[0] < hi, (ax.get_title(), lo, hi)


def _data_under_a_legend(fig) -> list[str]:
    """What a legend drawn inside an axes covers, in display pixels: markers and bars."""
    fig.canvas.draw()
    covered = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent()
        for c in ax.collections:
            for x, y in ax.transData.transform(np.asarray(c.get_offsets(), float)):
                if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1:
                    covered.append(f"{ax.get_title()}: marker of {c.get_label()!r}")
        for p in ax.patches:
            ext = p.get_window_extent()
            if ext.height > 0 and ext.width > 0 and box.overlaps(ext):
                covered.append(f"{ax.get_title()}: bar of {p.get_label()!r}")
    return covered


def test_no_legend_hides_a_point_or_a_bar(tmp_path, monkeypatch):
    """Seen in a small Fashion-MNIST study's report: the legend of gap_by_wavelet_family's `haar`
    panel sat on its only trial's marker, levels_best's on the first layer's requested level,
    and at a high percentile layer_sparsity_best's on the bars. Their legends are outside the axes
    now, as the accuracy figures' are."""
    frame = make_frame(4).assign(state="COMPLETE", recovery=["bn", "bn", "bn", "finetune"],
                                 wavelet=["bior4.4", "bior2.2", "bior4.4", "haar"], layout="filter",
                                 pruned_fraction=[0.5, 0.5, 0.55, 0.6997], gain_top1_vs_magnitude=[0.005, 0.015, -0.02, -0.015],
                                 dwt_vs_magnitude_ci_low=[-0.035, -0.01, -0.065, -0.09],
                                 dwt_vs_magnitude_ci_high=[0.045, 0.04, 0.03, 0.065])  # fmt: skip
    layers = {"name": ["features.0", "features.3", "features.7"], "level_requested": [5, 5, 5], "level_effective": [0, 5, 5],
              "dwt_coeff_sparsity": [0.95, 0.95, 0.95], "dwt_weight_sparsity": [0.95, 0.01, 0.0],
              "magnitude_weight_sparsity": [0.95, 0.95, 0.95]}  # fmt: skip
    figs = _capture(monkeypatch)
    figures.plot_gap(frame, tmp_path / "g.png", facet="wavelet_family")
    figures.plot_levels(layers, tmp_path / "l.png", title="trial 0")
    figures.plot_layer_sparsity(layers, tmp_path / "s.png", title="trial 0")
    for fig in figs:
        assert _data_under_a_legend(fig) == []
        texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert texts, "a legend is still drawn"
    assert "recovery finetune: CI contains 0 (not significant)" in [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert {"requested", "effective", "clamped below request"} <= {t.get_text() for t in figs[1].legends[0].get_texts()}
    assert {"dwt_coeff_sparsity", "magnitude_weight_sparsity"} <= {t.get_text() for t in figs[2].legends[0].get_texts()}


def test_trials_with_dwt_at_effective_level_0_are_reported_as_such(tmp_path, monkeypatch):
    """A 3x3 kernel in the `kernel` layout with db2 has effective level 0: no transform, dwt is
    magnitude pruning (gain 0 over magnitude by construction). Seen in a small digits study: the
    best trial was such a one, and summary.md named it "db2, kernel" with a "significant" gain over
    random and the level nowhere; gap_by_layout drew the kernel trials as ordinary dwt points at
    gap 0. DESIGN.md: "it degenerates; report it, do not hide it"."""
    frame = make_frame(6).assign(state="COMPLETE", recovery="none", layout=["kernel", "kernel", "filter", "filter", "kernel", "filter"],
                                 level_effective_min=[0, 0, 3, 0, 0, 3], level_effective_max=[0, 0, 3, 3, 0, 3],
                                 pruned_fraction=[0.4, 0.6, 0.5, 0.7, 0.8, 0.9])  # fmt: skip
    frame.loc[[0, 1, 4], "gain_top1_vs_magnitude"] = 0.0
    frame.loc[[0, 1, 4], ["dwt_vs_magnitude_ci_low", "dwt_vs_magnitude_ci_high"]] = 0.0
    frame["value_0"] = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]  # trial 0, at level 0, is the best
    figs = _capture(monkeypatch)
    files = report.write_report(frame, tmp_path, study_name="s", objectives=[("top1", "maximize")], importances={})
    summary = pd.read_csv(files["summary_csv"])
    assert summary.loc[0, "trial"] == 0 and summary.loc[0, "level_effective_max"] == 0 and summary.loc[0, "level_effective_min"] == 0
    md = files["summary_md"].read_text()
    assert "3 of the 6 distinct complete trials (trials 0, 1, 4) ran dwt at effective level 0 in every target layer" in md
    assert "1 more distinct complete trial ran some layers at effective level 0" in md
    gap = next(f for f in figs if f.axes[0].get_title() == "dwt - magnitude top-1 gap")
    marks = {c.get_label(): sorted(tuple(p) for p in c.get_offsets()) for c in gap.axes[0].collections if not c.get_label().startswith("_")}
    assert marks[figures.LEVEL0_LABEL] == [(0.4, 0.0), (0.6, 0.0), (0.8, 0.0)]
    assert all((0.4, 0.0) not in pts for label, pts in marks.items() if label != figures.LEVEL0_LABEL)
    # none at level 0: no note
    plain = frame.assign(level_effective_min=3, level_effective_max=3)
    md = report.write_report(plain, tmp_path / "p", study_name="s", objectives=[("top1", "maximize")])["summary_md"].read_text()
    assert "effective level 0" not in md


def test_dense_model_line_is_not_drawn_on_the_frame(tmp_path, monkeypatch):
    """One trial at 19.35 MB of a 44.73 MB model (a one-trial digits study): the axis was widened
    to the dense line plus 5 % of the trials' own span (0.1 MB of a 26 MB axis), so the dash-dot
    line lay on the panel's right edge, hidden by the frame. It is at least 2 % of the axis inside."""
    frame = make_frame(1).assign(state="COMPLETE", recovery="none", dense_bytes=44729800.0,
                                 **{f"{m}stored_bytes": 19345304.0 for m in ("", "magnitude_", "random_")})  # fmt: skip
    figs = _capture(monkeypatch)
    assert_png(figures.plot_accuracy_vs_stored_mb(frame, tmp_path / "s.png"))
    ax = next(a for a in figs[-1].axes if a.get_title())
    (line,) = [l for l in ax.get_lines() if l.get_label() == "dense model"]
    lo, hi = ax.get_xlim()
    x = line.get_xdata()[0]
    assert min(x - lo, hi - x) >= 0.02 * (hi - lo), (lo, x, hi)


def test_failed_trials_are_told_apart_retried_surplus_and_failed(tmp_path):
    """"fail 3" said nothing of why: a trial interrupted (or whose worker died) and run again with
    the same params, a surplus trial no worker needed, and a trial that failed on its own. The
    frame links a failed trial to its retry (Optuna's ``failed_trial``, set by the retry callback
    ``storage.retry`` uses) and the summary counts each kind."""
    import optuna

    from wavesweep.study import frame as study_frame
    from wavesweep.study import storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    t = study.ask({"percentile": optuna.distributions.FloatDistribution(10, 90)})
    t.set_user_attr("interrupted", True)
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    storage.retry(study, study.trials[0])  # trial 1: the same params, waiting
    t = study.ask()
    assert t.number == 1 and t.params == study.trials[0].params
    study.tell(t, 0.9)
    for attr in ({"surplus": True}, {"error": "ValueError: bad"}):
        t = study.ask()
        for k, v in attr.items():
            t.set_user_attr(k, v)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    frame = study_frame.trials_frame(study)
    assert frame["retried_by"].tolist()[:1] == [1] and frame["retried_by"].iloc[1:].isna().all()
    assert frame["surplus"].tolist() == [False, False, True, False]

    # a retry interrupted in turn and retried again: 4 -> 5 -> 6. Optuna's callback names the chain's
    # first trial (4) in failed_trial of both retries; the trial each replaced is its retry_history's last
    for _ in range(2):
        t = study.ask({"percentile": optuna.distributions.FloatDistribution(10, 90)})
        t.set_user_attr("interrupted", True)
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        storage.retry(study, study.trials[-1])
    t = study.ask()
    study.tell(t, 0.8)
    assert [study.trials[n].system_attrs["failed_trial"] for n in (5, 6)] == [4, 4]  # what Optuna records
    assert study.trials[6].system_attrs["retry_history"] == [4, 5]
    chain = study_frame.trials_frame(study).set_index("number")["retried_by"]
    assert (chain[4], chain[5]) == (5, 6) and np.isnan(chain[6])

    rows = make_frame(4).assign(state=["FAIL", "COMPLETE", "FAIL", "FAIL"], retried_by=[1, np.nan, np.nan, np.nan],
                                surplus=[False, False, True, False])  # fmt: skip
    md = report.write_report(rows, tmp_path, study_name="s", objectives=[("top1", "maximize")], importances={})["summary_md"]
    assert "Trials: 4 (complete 1; fail 3: 1 run again with the same params, 1 surplus, not needed, 1 failed)." in md.read_text()
    plain = report.write_report(make_frame(4), tmp_path / "b", study_name="s", objectives=[("top1", "maximize")], importances={})
    assert "Trials: 4 (complete 4)." in plain["summary_md"].read_text()  # no failures: as before


def test_an_adjusted_p_is_never_written_rounded_across_its_threshold():
    """The verdict says significant for p_adj < 0.05; "adjusted p = 0.05: **significant**" (0.04996
    to 3 digits) contradicted itself. More digits are written where 3 would cross 0.05."""
    from wavesweep.report import _verdicts, p_text

    assert p_text(0.04996) == "0.04996" and p_text(0.0499999999) == "0.0499999999"
    assert p_text(0.05) == "0.05" and p_text(0.0500004) == "0.05" and p_text(0.0123456) == "0.0123" and p_text(0.51234) == "0.512"
    assert p_text(float("nan")) == "n/a" and p_text(None) == "n/a"
    for p in np.concatenate([np.linspace(0.0499, 0.0501, 2001), np.logspace(-6, 0, 500)]):
        assert (float(p_text(float(p))) < 0.05) == (p < 0.05), p
    row = {"trial": 3, "selection": "best top1 (maximize)", "gain_top1_vs_magnitude": 0.05, "dwt_vs_magnitude_ci_low": 0.01,
           "dwt_vs_magnitude_ci_high": 0.09, "dwt_vs_magnitude_p_adj": 0.04996, "dwt_vs_magnitude_verdict": "significant"}  # fmt: skip
    [line] = _verdicts(pd.DataFrame([row]))
    assert "adjusted p = 0.04996: **significant**" in line, line
    # the summary table beside it: its p columns too (4 digits, more where 4 would cross 0.05)
    table = pd.DataFrame([{"top1": 0.123456, "n_eval": 10000.0, "dwt_vs_magnitude_mcnemar_p": 0.049996,
                           "dwt_vs_magnitude_p_adj": 0.049996, "dwt_vs_random_p_adj": 0.0123456,
                           "dwt_vs_random_mcnemar_p": float("nan"), "dwt_vs_magnitude_verdict": "significant"}])  # fmt: skip
    cells = report.to_markdown(table).splitlines()[2].split(" | ")
    assert cells == ["| 0.1235", "10000", "0.049996", "0.049996", "0.01235", "", "significant |"], cells


def test_summary_csv_writes_counts_as_whole_numbers_beside_a_failed_trial(tmp_path):
    """A study with a failed trial (no effective levels, no n_eval) read its count columns back as
    floats, and summary.csv wrote ``level_effective_min`` 1.0 where a study without one wrote 1."""
    frame = make_frame().assign(level_effective_min=1, level_effective_max=3, n_replicates=3.0)  # as aggregate() logs it
    frame.loc[len(frame)] = {"number": len(frame), "state": "FAIL", "mlflow_run_id": "failed"}  # NaN elsewhere
    assert frame["level_effective_min"].dtype == float and frame["n_eval"].dtype == float
    table = report.summary_table(frame, [("top1", "maximize")])  # what write_report writes as summary.csv (to_csv)
    text = table.to_csv(index=False).splitlines()
    values = dict(zip(text[0].split(","), text[1].split(",")))
    best = int(table.loc[0, "trial"])
    assert [values[c] for c in ("trial", "level_effective_min", "level_effective_max", "n_eval", "n_replicates")] == [
        str(best), "1", "3", "360", "3"]
    assert "| 1 | 3 |" in report.to_markdown(report.with_intervals(table))  # summary.md's table
