"""Study figures (PNG) from the trials frame (:mod:`wavesweep.trials_frame`): accuracy against
the pruned fraction, the stored size and the compression ratio per method, the dwt-baseline
gap, the optimisation history, parameter importances and one trial's layers. Pure functions
over the frame, so nothing here knows Optuna or MLflow; :func:`wavesweep.report.write_report`
draws them all.

A dwt reconstruction is dense in the weight domain: its compression is in the coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from wavesweep.fileio import atomic_write
from wavesweep.trials_frame import CONFIG_COLUMNS, METHODS, complete, front_staircase, importance_caveat, pareto_mask


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


MARKERS = {"dwt": "o", "magnitude": "s", "random": "^"}
DODGE = {"dwt": -1.0, "magnitude": 0.0, "random": 1.0}  # side-by-side offsets, so no marker hides another
INTERVAL_NOTE = (
    "error bars: the 95 % t-interval over a trial's replicate seeds where it has them (clipped to [0, 1]; one "
    "configuration tried several times: the envelope),\nelse the range over the seeds of single-seed trials of one configuration, "
    "else the 95 % Wilson interval of the accuracy on the n_eval examples"
)


def _colors() -> dict[str, Any]:
    return dict(zip(METHODS, sns.color_palette(n_colors=len(METHODS))))


def wilson_interval(top1: float, n: float) -> tuple[float, float]:
    """95 % Wilson interval of an accuracy ``top1`` measured on ``n`` examples (scipy)."""
    from scipy.stats import binomtest

    n = int(n)
    ci = binomtest(int(round(top1 * n)), n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _weighted_mean(values: pd.Series, weights: pd.Series) -> float:
    """Mean of the non-NaN ``values`` weighted by ``weights`` (NaN when there are none)."""
    ok = values.notna()
    return float(np.average(values[ok].astype(float), weights=weights[ok])) if ok.any() else float("nan")


def method_points(frame: pd.DataFrame, x: str, y: str = "top1") -> pd.DataFrame:
    """One row per (configuration, method) of the COMPLETE trials: mean ``x`` and ``y`` over the
    configuration's runs, an interval ``low``..``high``, ``n_runs`` (seeds), ``recovery`` and
    ``prerec`` (the mean ``prerec_<y>``: before recovery). Configurations are the
    ``CONFIG_COLUMNS`` present. A configuration sampled again with the same ``seed`` is the same
    run (deterministic): only its first trial counts (a trial with no ``seed`` is its own run).
    The interval: a trial run over replicate seeds (``n_replicates``,
    ``<y>_ci_low``/``_ci_high``) has its 95 % t-interval (for top-1 clipped to [0, 1]: with few
    seeds it reaches beyond), and several trials of one configuration
    the envelope of theirs (a single-seed trial counts as its value); single-seed trials at several
    seeds, their range; one seed, the Wilson interval on ``n_eval`` examples. Means are
    weighted by each trial's number of replicates."""
    done = complete(frame)
    keys = [c for c in CONFIG_COLUMNS if c in done]
    if len(done):  # one row per (configuration, seed): the same seed twice is one run, not two replicates
        seed = done["seed"] if "seed" in done else pd.Series(np.nan, index=done.index)
        runs = done.assign(_seed=seed.astype(object).where(seed.notna(), "trial " + done["number"].astype(str)))
        done = done[~runs.duplicated(subset=[*keys, "_seed"])]
    rows = []
    for m in METHODS:
        prefix = "" if m == "dwt" else f"{m}_"
        ycol, xcol = f"{prefix}{y}", f"{prefix}{x}" if f"{prefix}{x}" in done else x
        if ycol not in done or xcol not in done:
            continue
        pre = done[f"{prefix}prerec_{y}"] if f"{prefix}prerec_{y}" in done else np.nan
        reps = done["n_replicates"].fillna(1) if "n_replicates" in done else 1
        lo, hi = (done[f"{ycol}_{e}"] if f"{ycol}_{e}" in done else np.nan for e in ("ci_low", "ci_high"))
        part = done.assign(_x=done[xcol], _y=done[ycol], _pre=pre, _n=reps, _lo=lo, _hi=hi).dropna(subset=["_x", "_y"])
        groups = part.groupby(keys, dropna=False, sort=False) if keys else [((), part)]
        for _key, g in groups:
            w = g["_n"].astype(float)
            mean = _weighted_mean(g["_y"], w)
            if g["_lo"].notna().any() and g["_hi"].notna().any():
                low, high, kind = float(g["_lo"].fillna(g["_y"]).min()), float(g["_hi"].fillna(g["_y"]).max()), "replicate t-interval"
                if y == "top1":  # an accuracy: the interval intersected with what is possible
                    low, high = max(low, 0.0), min(high, 1.0)
            elif len(g) > 1:
                low, high, kind = float(g["_y"].min()), float(g["_y"].max()), "replicate range"
            elif "n_eval" in g and pd.notna(g["n_eval"].iloc[0]) and y == "top1":
                (low, high), kind = wilson_interval(mean, g["n_eval"].iloc[0]), "wilson"
            else:
                low = high = mean
                kind = "none"
            rows.append({
                "method": m, x: _weighted_mean(g["_x"], w), y: mean, "low": low, "high": high, "n_runs": int(w.sum()),
                "interval": kind, "prerec": _weighted_mean(g["_pre"], w), "numbers": list(g["number"]),
                **{k: g[k].iloc[0] for k in ("recovery", "wavelet", "layout") if k in g},
            })  # fmt: skip
    return pd.DataFrame(rows)


def chance_level(frame: pd.DataFrame) -> float | None:
    """1 / number of classes: from the trials' ``num_classes``, else the dataset registry."""
    if "num_classes" in frame and frame["num_classes"].notna().any():
        return 1.0 / float(frame["num_classes"].dropna().iloc[0])
    if "dataset" in frame and frame["dataset"].notna().any():
        try:
            from wavesweep.data import dataset_shape

            return 1.0 / dataset_shape(str(frame["dataset"].dropna().iloc[0]))["num_classes"]
        except (ValueError, KeyError, OSError):  # a dataset that needs files to count its classes
            return None
    return None


NOT_RECORDED = "not recorded"  # the recovery of trials recorded before recovery existed


def _recoveries(frame: pd.DataFrame) -> list[Any]:
    """The recovery settings of the complete trials, one panel each (a missing one: ``NOT_RECORDED``);
    ``[None]`` when no trial records one (one panel for all)."""
    done = complete(frame)
    if "recovery" not in done or done["recovery"].isna().all():
        return [None]
    order = {"none": 0, "bn": 1, "finetune": 2}
    return sorted(done["recovery"].fillna(NOT_RECORDED).unique(), key=lambda r: (order.get(r, 9), str(r)))


def _of_recovery(data: pd.DataFrame, rec: Any) -> pd.DataFrame:
    """The rows of ``data`` under recovery ``rec`` (one of :func:`_recoveries`; None: all rows)."""
    if rec is None or "recovery" not in data:
        return data
    return data[data["recovery"].fillna(NOT_RECORDED) == rec]


def _errorbars(ax: plt.Axes, pts: pd.DataFrame, x: str, y: str, *, scale: float = 1.0, dodge: float = 0.0,
               prerec: bool = False) -> None:  # fmt: skip
    """Each method's points with their intervals, side by side, never joined by lines."""
    colors = _colors()
    for m in METHODS:
        d = pts[pts["method"] == m]
        if d.empty:
            continue
        xs = d[x].to_numpy() * scale + DODGE[m] * dodge
        ys = d[y].to_numpy()
        err = np.vstack([ys - d["low"].to_numpy(), d["high"].to_numpy() - ys]).clip(min=0)
        ax.errorbar(xs, ys, yerr=err, fmt=MARKERS[m], color=colors[m], ms=6, alpha=0.85, capsize=2, lw=0.9,
                    elinewidth=0.9, linestyle="none", label=m)  # fmt: skip
        if prerec and d["prerec"].notna().any():
            ax.scatter(xs, d["prerec"], marker=MARKERS[m], facecolors="none", edgecolors=colors[m], alpha=0.6, s=30,
                       label=f"{m} before recovery")  # fmt: skip


def _reference_lines(ax: plt.Axes, frame: pd.DataFrame) -> None:
    done = complete(frame)
    if "base_top1" in done and done["base_top1"].notna().any():
        ax.axhline(float(done["base_top1"].dropna().iloc[0]), color="grey", ls="--", lw=1, label="unpruned")
    chance = chance_level(frame)
    if chance is not None:
        ax.axhline(chance, color="firebrick", ls=":", lw=1.2, label=f"chance (1/{round(1 / chance)})")


def _figure_legend(fig: plt.Figure, axes: Sequence[plt.Axes]) -> None:
    """One legend for all panels, outside them (a legend inside would hide points)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _at_least_span(ax: plt.Axes, xs: pd.Series, span: float) -> None:
    """An x-axis at least ``span`` wide around the data: one fraction (or a narrow range) drawn
    alone zoomed in on the side-by-side offsets, with ticks such as 0.5483, 0.5495, 0.5507 that
    read as three pruned fractions where there is one."""
    lo, hi = float(xs.min()), float(xs.max())
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_xlim(mid - 0.6 * span, mid + 0.6 * span)


def plot_accuracy_vs_pruned_fraction(frame: pd.DataFrame, path: Path) -> Path:
    """Top-1 of dwt, magnitude and random against the fraction pruned, one panel per recovery
    setting; each configuration a point with its interval (no lines between configurations);
    hollow markers: the same models before recovery; the unpruned and chance levels."""
    recoveries = _recoveries(frame)
    fig, axes = plt.subplots(1, len(recoveries), figsize=(6.4 * len(recoveries), 4.8), squeeze=False, sharey=True)
    pts = method_points(frame, "pruned_fraction")
    for ax, rec in zip(axes[0], recoveries):
        d = _of_recovery(pts, rec)
        if d.empty:
            _empty(ax, "no complete trials")
            continue
        span = max(float(d["pruned_fraction"].max() - d["pruned_fraction"].min()), 0.1)
        _errorbars(ax, d, "pruned_fraction", "top1", dodge=0.012 * span, prerec=rec not in (None, "none"))
        _at_least_span(ax, d["pruned_fraction"], span)
        _reference_lines(ax, frame)
        ax.set_xlabel("fraction pruned (dwt: coefficients dropped, structural zeros\nleft out; baselines: weights zeroed, matched)")
        ax.set_title(f"recovery: {rec}" if rec is not None else "accuracy vs pruned fraction")
    _figure_legend(fig, axes[0])
    axes[0, 0].set_ylabel("top-1 accuracy")
    fig.suptitle("accuracy vs pruned fraction, per recovery setting", y=1.0)
    fig.text(0.01, -0.02, INTERVAL_NOTE + "; methods drawn side by side at each fraction", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_stored_mb(frame: pd.DataFrame, path: Path) -> Path:
    """Top-1 of each method against the stored megabytes of its model (one encoding for all)."""
    recoveries = _recoveries(frame)
    fig, axes = plt.subplots(1, len(recoveries), figsize=(6.4 * len(recoveries), 4.8), squeeze=False, sharey=True)
    pts = method_points(frame, "stored_bytes")
    for ax, rec in zip(axes[0], recoveries):
        d = _of_recovery(pts, rec)
        if d.empty:
            _empty(ax, "no complete trials")
            continue
        mb = d["stored_bytes"] / 1e6
        span = max(float(mb.max() - mb.min()), 0.1 * float(mb.max()))
        dense = float(frame["dense_bytes"].dropna().iloc[0]) / 1e6 if "dense_bytes" in frame and frame["dense_bytes"].notna().any() else None
        # the offsets are a share of the axis as drawn, the dense model's line included: of the
        # trials' span alone they were under a pixel there, and magnitude's marker hid dwt's
        shown = span if dense is None else max(span, max(float(mb.max()), dense) - min(float(mb.min()), dense))
        _errorbars(ax, d, "stored_bytes", "top1", scale=1e-6, dodge=0.012 * shown)
        _at_least_span(ax, mb, span)
        _reference_lines(ax, frame)
        if dense is not None:
            ax.axvline(dense, color="grey", ls="-.", lw=1, label="dense model")
            lo, hi = ax.get_xlim()  # the line the legend lists is inside the panel, not past a zoomed-in axis,
            pad = 0.03 * (max(hi, dense) - min(lo, dense))  # nor on its frame (a margin of the axis it ends up on)
            ax.set_xlim(min(lo, dense - pad), max(hi, dense + pad))
        ax.set_xlabel("stored megabytes (kept values + 1-bit position bitmap + unpruned tensors)")
        ax.set_title(f"recovery: {rec}" if rec is not None else "accuracy vs stored size")
    _figure_legend(fig, axes[0])
    axes[0, 0].set_ylabel("top-1 accuracy")
    fig.suptitle("accuracy vs stored megabytes", y=1.0)
    fig.text(0.01, -0.02, INTERVAL_NOTE, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def wavelet_family(name: Any) -> str:
    """``bior4.4`` -> ``bior``, ``db2`` -> ``db``, ``haar`` -> ``haar`` (PyWavelets' family short names)."""
    import re

    m = re.match(r"[a-z]+", str(name))
    return m.group(0) if m else str(name)


#: a trial whose dwt ran at effective level 0 in every layer: the coefficients are the weights
LEVEL0_LABEL = "dwt at effective level 0 in every layer (no transform: magnitude pruning)"


def plot_gap(frame: pd.DataFrame, path: Path, *, facet: str | None = None, baseline: str = "magnitude") -> Path:
    """dwt top-1 minus the matched ``baseline``'s (same examples) against the pruned fraction, with
    each trial's 95 % paired bootstrap interval, or for a trial over replicate seeds the 95 %
    t-interval of its gain across them; hollow markers: the interval contains 0 (not
    significant); crosses: no interval recorded; grey: a trial whose dwt ran at effective level 0
    in every layer (``level_effective_max`` 0: no transform, its dwt is magnitude pruning).
    ``facet``: one panel per ``"wavelet_family"`` or ``"layout"`` value."""
    done = complete(frame)
    gap = f"gain_top1_vs_{baseline}"
    ok = not done.empty and {gap, "pruned_fraction"} <= set(done)
    if ok:
        done = done.assign(wavelet_family=done["wavelet"].map(wavelet_family)) if "wavelet" in done else done
        done = done.dropna(subset=[gap, "pruned_fraction"])
        nan = pd.Series(np.nan, index=done.index)
        col = lambda name: done[name] if name in done else nan  # noqa: E731
        # the paired interval of one evaluation, else the replicates' t-interval of the gain
        paired = col(f"dwt_vs_{baseline}_ci_low").notna() & col(f"dwt_vs_{baseline}_ci_high").notna()
        done = done.assign(
            _lo=col(f"dwt_vs_{baseline}_ci_low").where(paired, col(f"{gap}_ci_low")),
            _hi=col(f"dwt_vs_{baseline}_ci_high").where(paired, col(f"{gap}_ci_high")),
        )
    values = sorted(done[facet].dropna().unique()) if ok and facet in done else [None]
    fig, axes = plt.subplots(1, len(values), figsize=(max(5.0, 4.2 * len(values)), 4.4), squeeze=False, sharey=True)
    recs = _recoveries(frame)
    markers = dict(zip(recs, ["o", "s", "D", "v"]))
    for ax, v in zip(axes[0], values):
        d = done if v is None or not ok else done[done[facet] == v]
        if not ok or d.empty:
            _empty(ax, "no complete trials with a gain")
            continue
        for rec in recs:
            r = _of_recovery(d, rec)
            prefix = f"recovery {rec}: " if rec is not None and len(recs) > 1 else ""
            if "level_effective_max" in r:  # no transform in any layer: not a wavelet's gap, drawn apart
                flat = r[r["level_effective_max"] == 0]
                r = r[r["level_effective_max"] != 0]
                if len(flat):
                    err = np.vstack([flat[gap] - flat["_lo"].fillna(flat[gap]), flat["_hi"].fillna(flat[gap]) - flat[gap]]).clip(min=0)
                    ax.errorbar(flat["pruned_fraction"], flat[gap], yerr=err, fmt="none", ecolor="grey", alpha=0.6, capsize=2, lw=0.9)
                    ax.scatter(flat["pruned_fraction"], flat[gap], marker=markers.get(rec, "o"), facecolors="none", edgecolors="grey",
                               s=36, label=prefix + LEVEL0_LABEL)  # fmt: skip
            if r.empty:
                continue
            has = r["_lo"].notna() & r["_hi"].notna()
            sig = has & ((r["_lo"] > 0) | (r["_hi"] < 0))
            w = r[has]
            err = np.vstack([w[gap] - w["_lo"], w["_hi"] - w[gap]]).clip(min=0)
            ax.errorbar(w["pruned_fraction"], w[gap], yerr=err, fmt="none", ecolor="C0", alpha=0.6, capsize=2, lw=0.9)
            for which, face, text in ((sig, "C0", "CI excludes 0"), (has & ~sig, "none", "CI contains 0 (not significant)")):
                s = r[which]
                if len(s):
                    ax.scatter(s["pruned_fraction"], s[gap], marker=markers.get(rec, "o"), facecolors=face, edgecolors="C0",
                               s=36, label=prefix + text)  # fmt: skip
            if (~has).any():
                s = r[~has]
                ax.scatter(s["pruned_fraction"], s[gap], marker="x", color="C0", s=36, label=prefix + "no interval recorded")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("fraction pruned")
        ax.set_title(f"{facet.replace('_', ' ')}: {v}" if v is not None else f"dwt - {baseline} top-1 gap")
    _figure_legend(fig, axes[0])
    axes[0, 0].set_ylabel(f"top-1 gap, dwt - {baseline}")
    fig.text(0.01, -0.04, "error bars: 95 % paired bootstrap interval of each trial (same examples),\nor over replicate "
                          "seeds the 95 % t-interval of the gain; hollow: contains 0; x: no interval", fontsize=7)  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def plot_levels(layers: dict[str, list[Any]] | None, path: Path, *, title: str = "best trial") -> Path:
    """Requested vs effective DWT level per layer of one trial (the level is clamped per layer)."""
    names = (layers or {}).get("name") or []
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.2))
    if not names or "level_effective" not in layers:
        _empty(ax, "no per-layer levels recorded")
    else:
        idx = np.arange(len(names))
        eff = np.array([np.nan if v is None else v for v in layers["level_effective"]], dtype=float)
        req = np.array([np.nan if v is None else v for v in layers.get("level_requested", [np.nan] * len(names))], dtype=float)
        ax.bar(idx - 0.2, req, width=0.4, color="none", edgecolor="C0", hatch="//", label="requested")
        ax.bar(idx + 0.2, eff, width=0.4, color="C1", label="effective")
        low = np.flatnonzero(eff < req)
        if len(low):
            ax.scatter(idx[low] + 0.2, eff[low] + 0.15, marker="v", color="firebrick", s=18, label="clamped below request")
        ax.set_xticks(idx, names, rotation=75, fontsize=7)
        top = np.nanmax(np.concatenate([req, eff, [1.0]]))
        ax.set_ylim(0, top + 0.8)
        ax.set_yticks(range(int(top) + 1))
        ax.set_ylabel("DWT level")
        _figure_legend(fig, [ax])
    ax.set_title(f"requested vs effective level per layer, {title}")
    fig.tight_layout()
    return _save(fig, path)


def _label_groups(front: pd.DataFrame, span: Sequence[float], near: float = 0.02) -> list[tuple[float, float, list[int]]]:
    """The front's trials grouped for labelling: a trial joins the first group whose first point is
    within ``near`` of each axis span of it; each group as (x, y of its first point, its sorted numbers)."""
    groups: list[tuple[float, float, list[int]]] = []
    for r in front.itertuples():
        x, y = float(r.compression_ratio), float(r.top1)
        for gx, gy, numbers in groups:
            if abs(x - gx) <= near * max(span[0], 1e-12) and abs(y - gy) <= near * max(span[1], 1e-12):
                numbers.append(int(r.number))
                break
        else:
            groups.append((x, y, [int(r.number)]))
    return [(x, y, sorted(numbers)) for x, y, numbers in groups]


def plot_accuracy_vs_compression(
    frame: pd.DataFrame, path: Path, study_front: Sequence[int] = (), objectives: Sequence[str] = ()
) -> Path:
    """Top-1 against compression ratio for each method, one panel per recovery setting, each with
    the dwt front (max both) of its own points as drawn: test top-1 against compression ratio.

    That front is of the scores drawn, not the study's: a multi-objective study's Pareto front
    is over its objectives (e.g. ``val_top1``, selected on the validation part), and can hold
    other trials. ``study_front``: the trial numbers of the study's front (summary.md's "pareto
    front" rows), ringed on the dwt points; ``objectives``: its metric names, for the legend."""
    done = complete(frame)
    recoveries = _recoveries(frame)
    fig, axes = plt.subplots(1, len(recoveries), figsize=(7 * len(recoveries), 4.5), squeeze=False, sharey=True)
    for ax, rec in zip(axes[0], recoveries):
        ax.set_title(f"recovery: {rec}" if rec is not None else "accuracy vs compression")
        data = _long_by_method(_of_recovery(done, rec), "compression_ratio")
        if data.empty:
            _empty(ax, "no complete trials")
            continue
        colors = _colors()
        for m in reversed(METHODS):  # dwt drawn last, on top; distinct markers and alpha show what lies beneath
            d = data[data["method"] == m]
            ax.scatter(d["compression_ratio"], d["top1"], marker=MARKERS[m], color=colors[m], s=42, alpha=0.75, label=m)
        # as the stored-size axis: one configuration is not zoomed in on its methods' rounding
        _at_least_span(ax, data["compression_ratio"], 0.1 * float(data["compression_ratio"].max()))
        _reference_lines(ax, frame)
        dwt = data[data["method"] == "dwt"]
        front = dwt[pareto_mask(dwt[["compression_ratio", "top1"]].to_numpy(), ["maximize", "maximize"])]
        front = front.sort_values("compression_ratio")
        if len(front):
            sx, sy = front_staircase(dwt["compression_ratio"].to_numpy(), dwt["top1"].to_numpy())
            ax.plot(sx, sy, color="black", lw=1.2, label="dwt front of the points drawn (test top-1, compression)")
            # trials at one point, or within 2 % of the axes of one another (a configuration sampled
            # twice, near ties), share one label instead of labels drawn over each other
            for x, y, numbers in _label_groups(front, span=[float(np.ptp(dwt[c])) for c in ("compression_ratio", "top1")]):
                ax.annotate(", ".join(f"#{n}" for n in numbers), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ringed = dwt[dwt["number"].isin(list(study_front))]
        if len(ringed):
            ax.scatter(ringed["compression_ratio"], ringed["top1"], marker="o", s=150, facecolors="none",
                       edgecolors="black", linewidths=1.0, label=f"the study's Pareto front ({', '.join(objectives) or 'its objectives'})")
        ax.set_xlabel("compression ratio (dense bytes / stored bytes)")
    _figure_legend(fig, axes[0])
    axes[0, 0].set_ylabel("top-1 accuracy")
    if recoveries != [None]:
        fig.suptitle("accuracy vs compression, per recovery setting", y=1.0)
    fig.tight_layout()
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
        if len(pruned) and "partial_top1" in pruned and metric.removeprefix("val_") == "top1":  # a study with a validation part: val_top1
            ax.scatter(pruned["number"], pruned["partial_top1"], marker="x", color="grey", s=20, label="pruned (partial top1)")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{metric} ({direction})")
        ax.legend(fontsize=8)
    axes[0, 0].set_title("optimisation history")
    fig.tight_layout()
    return _save(fig, path)


def plot_importances(importances: dict[str, dict[str, float]], path: Path, *, n_complete: int | None = None) -> Path:
    """Horizontal bars of parameter importance per objective (as computed by the study); with
    fewer than ``MIN_TRIALS_FOR_IMPORTANCE`` complete trials the figure says so."""
    items = [(k, v) for k, v in importances.items() if v]
    fig, axes = plt.subplots(1, max(1, len(items)), figsize=(5 * max(1, len(items)), 3.5), squeeze=False)
    if not items:
        _empty(axes[0, 0], "parameter importances need at least two complete trials\nwith varying parameters")
    for ax, (metric, imp) in zip(axes[0], items):
        s = pd.Series(imp, dtype=float).sort_values()
        ax.barh(s.index, s.values, color="C0")
        ax.set_xlabel("importance (normalised)")
        ax.set_title(f"parameter importance for {metric}")
    caveat = importance_caveat(n_complete) if n_complete is not None and items else None
    if caveat:
        fig.suptitle(f"CAUTION: {caveat}", color="firebrick", fontsize=9, y=1.02)
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
        if ax.get_legend() is not None:  # seaborn's, inside the axes: over the bars of a high percentile
            ax.get_legend().remove()
        _figure_legend(fig, [ax])
    ax.set_title(f"per-layer sparsity, {title}")
    return _save(fig, path)
