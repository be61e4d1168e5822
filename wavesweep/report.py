"""Study reports: plots (PNG) and summary tables (CSV, Markdown) from a DataFrame of trials.

Pure functions over a frame with one row per trial (``study.trials_frame`` builds it from
Optuna storage; tests build it by hand), so nothing here knows Optuna or MLflow. Columns used:

* ``number``, ``state`` (COMPLETE, PRUNED, FAIL, ...), ``value_0``.. (objective values, in order)
* trial parameters (TrialConfig field names: wavelet, level, percentile, layout, ...)
* recorded metrics: ``top1`` (dwt), ``magnitude_top1``, ``random_top1``, ``base_top1``,
  ``pruned_fraction`` (fraction of dwt coefficients zeroed; the baselines zero the same fraction
  of weights), ``compression_ratio`` (dense bytes / stored bytes, per method with prefixes),
  ``gain_top1_vs_magnitude``, ``dwt_vs_magnitude_ci_low`` ... ``_mcnemar_p``
* ``layers``: per-layer sparsity lists of the trial (dict of equal-length lists) or None

A dwt reconstruction is dense in the weight domain: its compression is in the coefficients.
Every report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from wavesweep import schema
from wavesweep.fileio import atomic_write

METHODS = ("dwt", *schema.BASELINES)
DENSE_NOTE = (
    "dwt weights are dense after reconstruction: its compression is in the coefficient domain "
    "(coefficient sparsity), while magnitude and random pruning are sparse in the weight domain; "
    "stored bytes use one encoding for all methods (kept values + 1-bit position bitmap)."
)
SUMMARY_PARAMS = ("wavelet", "level", "percentile", "layout", "mode", "scope", "keep_approx")
SUMMARY_METRICS = (
    "top1", *(f"{m}_top1" for m in schema.BASELINES), "base_top1", "pruned_fraction", "compression_ratio", "coeff_sparsity",
    *(f"{k}{m}{end}" for m in schema.BASELINES
      for k, end in (("gain_top1_vs_", ""), ("dwt_vs_", "_ci_low"), ("dwt_vs_", "_ci_high"), ("dwt_vs_", "_mcnemar_p"))),
)  # fmt: skip


def complete(frame: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE trials (the only ones with every metric)."""
    if frame.empty or "state" not in frame:
        return frame.iloc[0:0]
    return frame[frame["state"] == "COMPLETE"]


def pareto_mask(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (n, k) under ``directions`` (maximize/minimize).

    A row is dominated when another row is at least as good in every objective and strictly
    better in one. Rows with a NaN are never on the front.
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != len(directions):
        raise ValueError(f"points must be (n, {len(directions)}), got {pts.shape}")
    signs = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    p = pts * signs  # now every objective is maximised
    ok = ~np.isnan(p).any(axis=1)
    mask = np.zeros(len(p), dtype=bool)
    for i in np.flatnonzero(ok):
        others = p[ok]
        dominated = np.any(np.all(others >= p[i], axis=1) & np.any(others > p[i], axis=1))
        mask[i] = not dominated
    return mask


def _long_by_method(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """Long format: one row per (trial, method) with ``x`` and ``top1`` of that method."""
    rows = []
    for m in METHODS:
        prefix = "" if m == "dwt" else f"{m}_"
        xcol = f"{prefix}{x}" if f"{prefix}{x}" in frame else x
        if f"{prefix}top1" not in frame or xcol not in frame:
            continue
        part = pd.DataFrame({"number": frame["number"], x: frame[xcol], "top1": frame[f"{prefix}top1"], "method": m})
        rows.append(part)
    return pd.concat(rows, ignore_index=True).dropna(subset=[x, "top1"]) if rows else pd.DataFrame(columns=["number", x, "top1", "method"])


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _empty(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_accuracy_vs_pruned_fraction(frame: pd.DataFrame, path: Path) -> Path:
    """Top-1 of dwt, magnitude and random against the fraction pruned (the seed study's central figure)."""
    done = complete(frame)
    data = _long_by_method(done, "pruned_fraction")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if data.empty:
        _empty(ax, "no complete trials")
    else:
        style = "layout" if "layout" in done and done["layout"].nunique() > 1 else None
        if style:
            data = data.merge(done[["number", "layout"]], on="number")
        sns.scatterplot(data=data, x="pruned_fraction", y="top1", hue="method", hue_order=list(METHODS), style=style, ax=ax, s=45)
        for m, color in zip(METHODS, sns.color_palette(n_colors=3)):
            d = data[data["method"] == m]
            trend = d.groupby(d["pruned_fraction"].round(3))["top1"].mean()  # mean over trials at one fraction
            if len(trend) > 1:
                ax.plot(trend.index, trend.values, color=color, alpha=0.4, lw=1)
        if "base_top1" in done and done["base_top1"].notna().any():
            ax.axhline(float(done["base_top1"].dropna().iloc[0]), color="grey", ls="--", lw=1, label="unpruned")
        ax.set_xlabel("fraction pruned (dwt: coefficients zeroed; baselines: weights zeroed, matched)")
        ax.set_ylabel("top-1 accuracy")
        ax.legend(fontsize=8, loc="best")
    ax.set_title("accuracy vs pruned fraction")
    return _save(fig, path)


def plot_accuracy_vs_compression(frame: pd.DataFrame, path: Path) -> Path:
    """Top-1 against compression ratio for each method, with the dwt Pareto front (max both)."""
    done = complete(frame)
    data = _long_by_method(done, "compression_ratio")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if data.empty:
        _empty(ax, "no complete trials")
    else:
        sns.scatterplot(data=data, x="compression_ratio", y="top1", hue="method", hue_order=list(METHODS), ax=ax, s=45)
        dwt = data[data["method"] == "dwt"]
        front = dwt[pareto_mask(dwt[["compression_ratio", "top1"]].to_numpy(), ["maximize", "maximize"])]
        front = front.sort_values("compression_ratio")
        if len(front):
            ax.step(front["compression_ratio"], front["top1"], where="post", color="black", lw=1.2, label="dwt Pareto front")
            for r in front.itertuples():
                ax.annotate(f"#{int(r.number)}", (r.compression_ratio, r.top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("compression ratio (dense bytes / stored bytes)")
        ax.set_ylabel("top-1 accuracy")
        ax.legend(fontsize=8, loc="best")
    ax.set_title("accuracy vs compression")
    return _save(fig, path)


def plot_history(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]], path: Path) -> Path:
    """Objective value per trial with the best so far (one panel per objective); pruned trials marked."""
    n = max(1, len(objectives))
    fig, axes = plt.subplots(n, 1, figsize=(7, 3.2 * n), squeeze=False)
    for i, (metric, direction) in enumerate(objectives or [("value_0", "maximize")]):
        ax = axes[i, 0]
        col = f"value_{i}"
        done = complete(frame)
        if done.empty or col not in done:
            _empty(ax, "no complete trials")
            continue
        d = done.sort_values("number")
        ax.scatter(d["number"], d[col], s=20, label="complete")
        best = d[col].cummax() if direction == "maximize" else d[col].cummin()
        ax.step(d["number"], best, where="post", color="C3", label="best so far")
        pruned = frame[frame["state"] == "PRUNED"]
        if len(pruned) and "partial_top1" in pruned and metric == "top1":
            ax.scatter(pruned["number"], pruned["partial_top1"], marker="x", color="grey", s=20, label="pruned (partial top1)")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{metric} ({direction})")
        ax.legend(fontsize=8)
    axes[0, 0].set_title("optimisation history")
    fig.tight_layout()
    return _save(fig, path)


def plot_importances(importances: dict[str, dict[str, float]], path: Path) -> Path:
    """Horizontal bars of parameter importance per objective (as computed by the study)."""
    items = [(k, v) for k, v in importances.items() if v]
    fig, axes = plt.subplots(1, max(1, len(items)), figsize=(5 * max(1, len(items)), 3.5), squeeze=False)
    if not items:
        _empty(axes[0, 0], "parameter importances need at least two complete trials\nwith varying parameters")
    for ax, (metric, imp) in zip(axes[0], items):
        s = pd.Series(imp, dtype=float).sort_values()
        ax.barh(s.index, s.values, color="C0")
        ax.set_xlabel("importance (normalised)")
        ax.set_title(f"parameter importance for {metric}")
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_sparsity(layers: dict[str, list[Any]] | None, path: Path, *, title: str = "best trial") -> Path:
    """Per-layer sparsity of one trial: dwt coefficient sparsity, dwt and magnitude weight sparsity."""
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len((layers or {}).get("name", [])) + 2), 4.5))
    if not layers or not layers.get("name"):
        _empty(ax, "no per-layer record")
    else:
        frame = pd.DataFrame(layers)
        cols = [c for c in ("dwt_coeff_sparsity", "dwt_weight_sparsity", "magnitude_weight_sparsity") if c in frame]
        long = frame.melt(id_vars="name", value_vars=cols, var_name="quantity", value_name="sparsity")
        sns.barplot(data=long, x="name", y="sparsity", hue="quantity", ax=ax)
        ax.tick_params(axis="x", rotation=75, labelsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction zero")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    ax.set_title(f"per-layer sparsity, {title}")
    return _save(fig, path)


def best_rows(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The best COMPLETE trial per objective, plus (multi-objective) every Pareto-optimal trial."""
    done = complete(frame)
    out = []
    for i, (metric, direction) in enumerate(objectives):
        col = f"value_{i}"
        if done.empty or col not in done or done[col].isna().all():
            continue
        idx = done[col].idxmax() if direction == "maximize" else done[col].idxmin()
        out.append(done.loc[[idx]].assign(selection=f"best {metric} ({direction})"))
    if len(objectives) > 1 and not done.empty:
        vals = done[[f"value_{i}" for i in range(len(objectives))]].to_numpy()
        front = done[pareto_mask(vals, [d for _m, d in objectives])]
        out.append(front.assign(selection="pareto front"))
    if not out:
        return pd.DataFrame()
    return pd.concat(out, ignore_index=True)


def summary_table(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Best configurations per objective with their matched baselines and paired statistics."""
    rows = best_rows(frame, objectives)
    if rows.empty:
        return pd.DataFrame(columns=["selection", "trial"])
    cols = ["selection", "number"]
    cols += [f"value_{i}" for i in range(len(objectives))]
    cols += [c for c in SUMMARY_PARAMS if c in rows]
    cols += [c for c in SUMMARY_METRICS if c in rows]
    cols += [c for c in ("n_eval", "mlflow_run_id") if c in rows]
    table = rows[cols].rename(columns={"number": "trial", **{f"value_{i}": f"objective {m}" for i, (m, _d) in enumerate(objectives)}})
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame, *, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path


def write_report(
    frame: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str,
    objectives: Sequence[tuple[str, str]],
    importances: dict[str, dict[str, float]] | None = None,
) -> dict[str, Path]:
    """Write every plot, ``summary.csv``, ``summary.md`` and ``trials.csv`` into ``out_dir``."""
    matplotlib.use("Agg")  # files only, never a display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objectives = [tuple(o) for o in objectives]
    files = {
        "accuracy_vs_pruned_fraction": plot_accuracy_vs_pruned_fraction(frame, out_dir / "accuracy_vs_pruned_fraction.png"),
        "accuracy_vs_compression": plot_accuracy_vs_compression(frame, out_dir / "accuracy_vs_compression.png"),
        "history": plot_history(frame, objectives, out_dir / "optimization_history.png"),
        "importances": plot_importances(importances or {}, out_dir / "param_importances.png"),
    }
    table = summary_table(frame, objectives)
    best = best_rows(frame, objectives[:1])
    layers = best["layers"].iloc[0] if len(best) and "layers" in best else None
    title = f"trial {int(best['number'].iloc[0])}" if len(best) else "best trial"
    files["layer_sparsity"] = plot_layer_sparsity(layers if isinstance(layers, dict) else None, out_dir / "layer_sparsity_best.png", title=title)
    files["summary_csv"] = _write_text(out_dir / "summary.csv", table.to_csv(index=False))
    trials = frame.drop(columns=[c for c in ("layers",) if c in frame])
    files["trials_csv"] = _write_text(out_dir / "trials.csv", trials.to_csv(index=False))
    states = frame["state"].value_counts().to_dict() if "state" in frame else {}
    md = [
        f"# Study {study_name}",
        "",
        f"Trials: {len(frame)} ({', '.join(f'{k.lower()} {v}' for k, v in sorted(states.items())) or 'none'}). "
        f"Objectives: {', '.join(f'{m} ({d})' for m, d in objectives)}.",
        "",
        f"Note: {DENSE_NOTE}",
        "",
        "## Best configurations",
        "",
        to_markdown(table) if len(table) else "_no complete trials_\n",
        "Gains are dwt top-1 minus the matched baseline's on the same examples; the interval is a "
        "95 % paired bootstrap interval and p the exact McNemar test on discordant examples.",
        "",
        "## Plots",
        "",
        *(f"![{k}]({p.name})" for k, p in files.items() if p.suffix == ".png"),
        "",
    ]
    files["summary_md"] = _write_text(out_dir / "summary.md", "\n".join(md))
    return files
