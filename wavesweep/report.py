"""Study reports: every figure (:mod:`wavesweep.figures`) and the summary tables (CSV,
Markdown) from the trials frame (:mod:`wavesweep.trials_frame`: one row per trial, its columns).

Pure functions over the frame, so nothing here knows Optuna or MLflow. :func:`write_report` is
the entry point. A dwt reconstruction is dense in the weight domain: its compression is in the
coefficients. Every report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from wavesweep import figures, schema
from wavesweep.config import fixed_base
from wavesweep.fileio import atomic_write
from wavesweep.trials_frame import CONFIG_COLUMNS, SUMMARY_PARAMS, complete, distinct, importance_caveat, pareto_mask

DENSE_NOTE = (
    "dwt weights are dense after reconstruction: its compression is in the coefficient domain "
    "(coefficient sparsity), while magnitude and random pruning are sparse in the weight domain; "
    "stored bytes use one encoding for all methods (kept values + 1-bit position bitmap)."
)
SUMMARY_METRICS = (
    "val_top1", *(f"{m}_val_top1" for m in schema.BASELINES),
    "top1", *(f"{m}_top1" for m in schema.BASELINES), "base_top1", "pruned_fraction", "compression_ratio", "coeff_sparsity",
    *(f"{k}{m}{end}" for m in schema.BASELINES
      for k, end in (("gain_top1_vs_", ""), ("dwt_vs_", "_ci_low"), ("dwt_vs_", "_ci_high"), ("dwt_vs_", "_mcnemar_p"),
                     ("dwt_vs_", "_p_adj"), ("dwt_vs_", "_verdict"))),
)  # fmt: skip
#: a trial's effective DWT levels, lowest and highest over its target layers (0: no transform)
LEVEL_COLUMNS = ("level_effective_min", "level_effective_max")
#: a trial over replicate seeds: how many, and the 95 % t-interval over seeds of top-1 and the gains
REPLICATE_METRICS = (
    "n_replicates", *(f"{k}_{e}" for k in ("top1", *(f"{m}_top1" for m in schema.BASELINES),
                                            *(f"gain_top1_vs_{m}" for m in schema.BASELINES)) for e in ("ci_low", "ci_high")),
)  # fmt: skip


def best_label(metric: str, direction: str) -> str:
    """The ``selection`` of the best trial on one objective in :func:`best_rows`."""
    return f"best {metric} ({direction})"


def best_rows(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """The best COMPLETE trial per objective, plus (multi-objective) every Pareto-optimal trial.

    Multi-objective: the best on one objective is taken from the Pareto front, so of the trials
    tied on it the one no other trial dominates is named (the study's ``best_trial``, which
    ``--register-best`` registers), not a dominated one; ties left: the lowest trial number.
    A repeat of an earlier trial's configuration (``repeat_of``) is that trial: never a row."""
    done = distinct(frame)
    front = None
    if len(objectives) > 1 and not done.empty:
        vals = done[[f"value_{i}" for i in range(len(objectives))]].to_numpy()
        front = done[pareto_mask(vals, [d for _m, d in objectives])]
    pool = done if front is None else front
    out = []
    for i, (metric, direction) in enumerate(objectives):
        col = f"value_{i}"
        if pool.empty or col not in pool or pool[col].isna().all():
            continue
        idx = pool[col].idxmax() if direction == "maximize" else pool[col].idxmin()
        out.append(pool.loc[[idx]].assign(selection=best_label(metric, direction)))
    if front is not None:
        out.append(front.assign(selection="pareto front"))
    if not out:
        return pd.DataFrame()
    return pd.concat(out, ignore_index=True)


def _front_numbers(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> list[int]:
    """The trial numbers of a multi-objective study's Pareto front (:func:`best_rows`' "pareto
    front" rows, as summary.md lists them); none for a single objective."""
    rows = best_rows(frame, objectives) if len(objectives) > 1 else pd.DataFrame()
    return [] if rows.empty else [int(n) for n in rows.loc[rows["selection"] == "pareto front", "number"]]


def with_significance(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` plus, per baseline, ``dwt_vs_<b>_p_adj`` and ``dwt_vs_<b>_verdict``.

    ``p_adj``: Benjamini-Hochberg (``scipy.stats.false_discovery_control``) over that baseline's
    McNemar p-values, one per distinct configuration (:func:`tested`): each baseline is its own
    family (dwt vs magnitude, dwt vs random). A repeat of an earlier trial's configuration is the
    same test: it is not counted again, and shows its original's adjusted p. ``verdict``:
    "significant" only when the paired interval excludes 0 and the adjusted p is below 0.05;
    "not significant (CI contains 0)" or "(adjusted p >= 0.05)" otherwise; "no p-value" for an
    interval that excludes 0 without one."""
    from scipy.stats import false_discovery_control

    out = frame.copy()
    for b in schema.BASELINES:
        p, lo, hi = f"dwt_vs_{b}_mcnemar_p", f"dwt_vs_{b}_ci_low", f"dwt_vs_{b}_ci_high"
        if not {p, lo, hi} <= set(frame):
            continue
        ps = tested(frame, b)
        adj = pd.Series(np.nan, index=frame.index)
        if len(ps):
            adj.loc[ps.index] = false_discovery_control(ps.to_numpy(dtype=float), method="bh")
        if "repeat_of" in frame and len(ps):  # a repeat shows the adjusted p of the trial it repeats
            by_number = pd.Series(adj.loc[ps.index].to_numpy(), index=frame.loc[ps.index, "number"].to_numpy())
            repeats = complete(frame)["repeat_of"].dropna()
            adj.loc[repeats.index] = repeats.map(by_number).to_numpy(dtype=float)
        out[f"dwt_vs_{b}_p_adj"] = adj
        contains0 = (frame[lo] <= 0) & (frame[hi] >= 0)
        verdict = np.where(contains0, "not significant (CI contains 0)",
                           np.where(adj.isna(), "no p-value", np.where(adj < 0.05, "significant",
                                                                       "not significant (adjusted p >= 0.05)")))  # fmt: skip
        out[f"dwt_vs_{b}_verdict"] = pd.Series(verdict, index=frame.index).where(frame[lo].notna() & frame[hi].notna(), "")
    return out


def summary_table(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Best configurations per objective with their matched baselines, paired statistics,
    adjusted p-values and a significance verdict (``with_significance``). The configuration
    columns: ``SUMMARY_PARAMS`` and ``recovery``, and every other configuration column whose
    value differs between the complete trials (a searched ``finetune_lr``, ``targets``, ...)."""
    rows = best_rows(with_significance(frame), objectives)
    if rows.empty:
        return pd.DataFrame(columns=["selection", "trial"])
    done = complete(frame)
    cols = ["selection", "number"]
    cols += [f"value_{i}" for i in range(len(objectives))]
    cols += [c for c in (*SUMMARY_PARAMS, "recovery") if c in rows]
    cols += [c for c in CONFIG_COLUMNS if c in rows and c not in cols and done[c].astype(str).nunique() > 1]
    cols += [c for c in LEVEL_COLUMNS if c in rows]  # a requested level is not the level dwt ran at (0: none)
    cols += [c for c in SUMMARY_METRICS if c in rows]
    cols += [c for c in REPLICATE_METRICS if c in rows and rows[c].notna().any()]
    cols += [c for c in ("n_val", "n_eval", "mlflow_run_id") if c in rows]
    table = rows[cols].rename(columns={"number": "trial", **{f"value_{i}": f"objective {m}" for i, (m, _d) in enumerate(objectives)}})
    for c in ("trial", *LEVEL_COLUMNS, "n_val", "n_eval", "n_replicates"):
        # counts stay whole numbers in summary.csv: a column with a missing value (a trial of the
        # frame that failed) came back as floats, written 1.0 where a study without one wrote 1
        if c in table and pd.api.types.is_float_dtype(table[c]) and table[c].dropna().map(float.is_integer).all():
            table[c] = table[c].astype("Int64")
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame, *, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``). A whole number (a count
    such as ``n_eval``, a byte size) is written in full; other numbers with ``floatfmt``; a
    p-value (a column ending in ``_p_adj`` or ``_p``) with :func:`p_text` at 4 digits, so that none
    is rounded across 0.05 beside its verdict."""

    def cell(v: Any, is_p: bool) -> str:
        if v is pd.NA:
            return ""
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            if is_p:
                return p_text(v, digits=4)
            # metrics come back as floats: ".4g" would write n_eval 10000 as 1e+04 and 12345 as 1.234e+04
            return str(int(v)) if v.is_integer() else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    is_p = [str(c).endswith(("_p_adj", "_p")) for c in table.columns]
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v, p) for v, p in zip(row, is_p)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path


def p_text(p: float | None, alpha: float = 0.05, *, digits: int = 3) -> str:
    """``p`` to ``digits`` significant digits, or more where those would round it across ``alpha``
    (0.04996 is not written "0.05" beside the word significant, nor 0.05 written below it)."""
    if p is None or not math.isfinite(p):
        return "n/a"
    for digits in range(digits, 18):
        text = f"{p:.{digits}g}"
        if (float(text) < alpha) == (p < alpha):
            return text
    return repr(p)


def _verdicts(table: pd.DataFrame) -> list[str]:
    """One sentence per summary row, saying whether its gain over each baseline is significant."""
    lines = []
    for r in table.to_dict("records"):
        parts = []
        for b in schema.BASELINES:
            gap, lo, hi = r.get(f"gain_top1_vs_{b}"), r.get(f"dwt_vs_{b}_ci_low"), r.get(f"dwt_vs_{b}_ci_high")
            if gap is None or lo is None or pd.isna(gap) or pd.isna(lo):
                continue
            padj = r.get(f"dwt_vs_{b}_p_adj")
            parts.append(f"vs {b} {gap:+.4f} [95 % CI {lo:+.4f}, {hi:+.4f}], adjusted p = {p_text(padj)}: "
                         f"**{r.get(f'dwt_vs_{b}_verdict')}**")  # fmt: skip
        if parts:
            lines.append(f"- trial {r['trial']} ({r['selection']}): " + "; ".join(parts))
    return lines


def _selection_note(frame: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> str:
    """Which examples chose the best trials and which ones the reported numbers are on."""
    if complete(frame).empty:  # nothing to say of examples no trial was scored on (a failed trial records no n_val)
        return "Selection: no complete trial, so none was selected."
    n_val = frame["n_val"].dropna() if "n_val" in frame else pd.Series(dtype=float)
    n_test = frame["n_eval"].dropna() if "n_eval" in frame else pd.Series(dtype=float)
    test = f"{int(n_test.iloc[0])} " if len(n_test) else ""
    if any(m.startswith("val_") or "_val_" in m for m, _d in objectives) and len(n_val) and n_val.iloc[0] > 0:
        return (f"Selection: the objective and \"best\" use the **validation** part of the evaluation examples "
                f"({int(n_val.iloc[0])} examples, `val_*` columns); every other number (top1, gains, intervals, p) is "
                f"on the disjoint **test** part ({test}examples), stratified by class and seeded (`val_fraction`).")
    if objectives and all(schema.is_example_free(m) for m, _d in objectives):  # with or without a validation part
        return (f"Selection: the objectives do not depend on the evaluation examples (what pruning did to the "
                f"weights, or timing), so the scores reported (top1, gains, intervals, p, on the {test}test examples) "
                "were not selected on.")
    return (f"Selection: the objective and \"best\" use the same {test}test examples as the reported numbers "
            "(no validation part: `val_fraction` 0), so the best trial's scores are optimistic.")


def _accuracy_bounds(key: str, lo: float, hi: float) -> tuple[float, float]:
    """A top-1 t-interval clipped to [0, 1], as the figures draw it (with few seeds it can leave
    the range an accuracy has: -0.18 for a random top-1 of 0.14 over 3 seeds); gains as they are."""
    return (lo, hi) if key.startswith("gain") else (max(lo, 0.0), min(hi, 1.0))


def with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """For Markdown: each number with a replicate interval as ``mean [low, high]`` in one cell (a
    top-1's clipped to [0, 1]: :func:`_accuracy_bounds`), the interval's own columns dropped
    (summary.csv keeps them as numbers, unclipped)."""
    out = table.copy()
    for key in dict.fromkeys(c[: -len("_ci_low")] for c in table if c.endswith("_ci_low") and c in REPLICATE_METRICS):
        lo, hi = f"{key}_ci_low", f"{key}_ci_high"
        if key not in out or hi not in out:
            continue
        cell = lambda r: r[key] if pd.isna(r[lo]) else "{:.4g} [{:.4g}, {:.4g}]".format(r[key], *_accuracy_bounds(key, r[lo], r[hi]))  # noqa: E731
        out[key] = out.apply(cell, axis=1).astype(object)
        out = out.drop(columns=[lo, hi])
    return out


def tested(frame: pd.DataFrame, baseline: str) -> pd.Series:
    """The dwt-vs-``baseline`` McNemar p-values that enter the adjustment: those of the distinct
    configurations (``trials_frame.distinct``: COMPLETE trials, repeats left out) that have one
    (a trial over replicate seeds has none), indexed like ``frame``."""
    col = f"dwt_vs_{baseline}_mcnemar_p"
    return distinct(frame)[col].dropna() if col in frame else pd.Series(dtype=float)


def _adjustment_note(frame: pd.DataFrame) -> str:
    """What the adjustment did, exactly: the method, the families, how many p-values each."""
    counts = {b: len(tested(frame, b)) for b in schema.BASELINES}
    repeats = len(complete(frame)) - len(distinct(frame))
    why = ""
    if repeats:
        why = (f" {repeats} complete trial{'s' if repeats != 1 else ''} repeated the configuration of an earlier one: "
               "the same test, not counted again.")  # fmt: skip
    replicates = " A trial over replicate seeds has no McNemar p: its interval is the t-interval across the seeds."
    if not any(counts.values()):
        return f"No complete trial has a McNemar p, so no p is adjusted.{replicates}{why}"
    families = [f"the {n} dwt-vs-{b} McNemar p-value{'s' if n != 1 else ''}" for b, n in counts.items() if n]
    return ("Adjusted p: Benjamini-Hochberg (scipy.stats.false_discovery_control), applied to each baseline separately, "
            f"as {'its own family' if len(families) == 1 else 'two families'}: {' and '.join(families)}, one per distinct "
            f"configuration among the complete trials.{why}{replicates}")  # fmt: skip


def _states_text(frame: pd.DataFrame, states: dict[str, int]) -> str:
    """Each state's count; the failed ones split into those queued again with the same params
    (``retried_by``: interrupted, a lost worker, a grid point), the surplus ones (not needed: the
    study had its trials) and the rest (errors of the trial itself)."""
    parts = []
    for state, n in sorted(states.items()):
        text = f"{state.lower()} {n}"
        if state == "FAIL":
            fail = frame[frame["state"] == "FAIL"]
            surplus = fail["surplus"].fillna(False).astype(bool) if "surplus" in fail else pd.Series(False, index=fail.index)
            retried = fail["retried_by"].notna() & ~surplus if "retried_by" in fail else pd.Series(False, index=fail.index)
            if retried.any() or surplus.any():
                split = [f"{int(retried.sum())} run again with the same params" if retried.any() else "",
                         f"{int(surplus.sum())} surplus, not needed" if surplus.any() else "",
                         f"{int((~retried & ~surplus).sum())} failed" if (~retried & ~surplus).any() else ""]
                text += f": {', '.join(x for x in split if x)}"
        parts.append(text)
    return "; ".join(parts) if any(": " in x for x in parts) else ", ".join(parts) or "none"


def _level0_note(frame: pd.DataFrame) -> str | None:
    """The distinct complete trials whose dwt ran at effective level 0 (no transform) in every
    target layer, and how many more did in some layers; None when there are none."""
    done = distinct(frame)
    if "level_effective_max" not in done:
        return None
    low = done["level_effective_min"] if "level_effective_min" in done else done["level_effective_max"]
    every, some = done[done["level_effective_max"] == 0], done[(low == 0) & (done["level_effective_max"] > 0)]
    if every.empty and some.empty:
        return None
    text = ""
    if len(every):
        numbers = ", ".join(str(int(n)) for n in every["number"])
        text = (f"**Effective level 0:** {len(every)} of the {len(done)} distinct complete trials (trial{'s' if len(every) != 1 else ''} "
                f"{numbers}) ran dwt at effective level 0 in every target layer (the wavelet is longer than what the layout gives "
                "it, e.g. 3x3 kernels in `kernel`): no transform, so their dwt prunes the weights themselves, which is magnitude "
                "pruning (with `keep_approx`: no pruning), and its weights are as sparse as magnitude's; neither their gain over "
                "magnitude nor their gain over random says anything about a wavelet. ")  # fmt: skip
    if len(some):
        text += (f"{len(some)} {'more ' if len(every) else ''}distinct complete trial{'s' if len(some) != 1 else ''} ran some "
                 "layers at effective level 0 (`level_effective_min`).")  # fmt: skip
    return text.strip()


def _fixed_bases(frame: pd.DataFrame) -> dict[int, str]:
    """Trial number -> what its base model is, for the trials whose base model no seed changes
    (fixed weights, a pretrained pair: :func:`~wavesweep.config.fixed_base`)."""
    if not {"number", "model", "dataset"} <= set(frame.columns):
        return {}
    out = {}
    for r in frame.to_dict("records"):
        weights = r.get("weights")
        weights = weights if isinstance(weights, str) and weights else None
        if isinstance(r["model"], str) and isinstance(r["dataset"], str) and (fixed := fixed_base(r["model"], r["dataset"], weights)):
            out[int(r["number"])] = fixed
    return out


def _replicate_lines(table: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    """For each summary row of a trial run over replicate seeds: n, and every top-1 and gain as
    mean [95 % t-interval over the seeds]; a base model that is the same for every seed is named."""
    fixed_bases = _fixed_bases(frame)
    lines = []
    for r in table.to_dict("records"):
        n = r.get("n_replicates")
        if n is None or pd.isna(n) or n < 2:
            continue
        parts = []
        for label, key, sign in (("dwt top-1", "top1", ""), *((f"{b} top-1", f"{b}_top1", "") for b in schema.BASELINES),
                                 *((f"gain vs {b}", f"gain_top1_vs_{b}", "+") for b in schema.BASELINES)):  # fmt: skip
            v, lo, hi = r.get(key), r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
            if v is None or lo is None or hi is None or pd.isna(v) or pd.isna(lo):
                continue
            note = "" if not sign else (": interval contains 0" if lo <= 0 <= hi else ": interval excludes 0")
            lo, hi = _accuracy_bounds(key, lo, hi)
            parts.append(f"{label} {v:{sign}.4f} [{lo:{sign}.4f}, {hi:{sign}.4f}]{note}")
        if parts:
            fixed = fixed_bases.get(int(r["trial"]))
            lines.append(f"- trial {r['trial']} ({r['selection']}), mean [95 % t-interval] over n = {int(n)} replicate seeds"
                         + (f" (one base model for every seed: {fixed})" if fixed else "") + ": " + "; ".join(parts))  # fmt: skip
    if lines:
        lines.insert(0, "\nTrials run over replicate seeds (`replicates` in the spec) report the mean of each number over "
                        "the seeds; the interval is the 95 % Student-t interval for that mean: how the numbers move with the "
                        "seed (the base model's training where each seed trains its own, data split or evaluation subset, "
                        "random pruning), not the paired interval over examples; a top-1's interval is clipped to [0, 1] "
                        "as in the figures (summary.csv keeps it unclipped). "
                        "Each replicate's paired statistics are on its own MLflow run.\n")  # fmt: skip
    return lines


def write_report(
    frame: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str,
    objectives: Sequence[tuple[str, str]],
    importances: dict[str, dict[str, float]] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """Write every plot, ``summary.csv``, ``summary.md`` and ``trials.csv`` into ``out_dir``
    (``extra_files``: other files already there, e.g. the interactive HTML, linked from summary.md)."""
    matplotlib.use("Agg")  # files only, never a display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objectives = [tuple(o) for o in objectives]
    n_complete = len(complete(frame))
    n_distinct = len(distinct(frame))  # what importances are computed from (study.frame.distinct_study)
    files = {
        "accuracy_vs_pruned_fraction": figures.plot_accuracy_vs_pruned_fraction(frame, out_dir / "accuracy_vs_pruned_fraction.png"),
        "accuracy_vs_compression": figures.plot_accuracy_vs_compression(
            frame, out_dir / "accuracy_vs_compression.png", study_front=_front_numbers(frame, objectives),
            objectives=[m for m, _d in objectives]),
        "accuracy_vs_stored_mb": figures.plot_accuracy_vs_stored_mb(frame, out_dir / "accuracy_vs_stored_mb.png"),
        "gap_vs_pruned_fraction": figures.plot_gap(frame, out_dir / "gap_vs_pruned_fraction.png"),
        "gap_by_wavelet_family": figures.plot_gap(frame, out_dir / "gap_by_wavelet_family.png", facet="wavelet_family"),
        "gap_by_layout": figures.plot_gap(frame, out_dir / "gap_by_layout.png", facet="layout"),
        "history": figures.plot_history(frame, objectives, out_dir / "optimization_history.png"),
        "importances": figures.plot_importances(importances or {}, out_dir / "param_importances.png", n_complete=n_distinct),
    }
    table = summary_table(frame, objectives)
    rows = best_rows(frame, objectives)  # the best on the first objective: the trial whose layers the study fetched
    best = rows[rows["selection"] == best_label(*objectives[0])] if len(rows) and objectives else rows
    layers = best["layers"].iloc[0] if len(best) and "layers" in best else None
    layers = layers if isinstance(layers, dict) else None
    title = f"trial {int(best['number'].iloc[0])}" if len(best) else "best trial"
    files["layer_sparsity"] = figures.plot_layer_sparsity(layers, out_dir / "layer_sparsity_best.png", title=title)
    files["levels"] = figures.plot_levels(layers, out_dir / "levels_best.png", title=title)
    files["summary_csv"] = _write_text(out_dir / "summary.csv", table.to_csv(index=False))
    trials = with_significance(frame).drop(columns=[c for c in ("layers",) if c in frame])
    files["trials_csv"] = _write_text(out_dir / "trials.csv", trials.to_csv(index=False))
    states = frame["state"].value_counts().to_dict() if "state" in frame else {}
    caveat = importance_caveat(n_distinct) if any(importances.values() if importances else []) else None
    md = [
        f"# Study {study_name}",
        "",
        f"Trials: {len(frame)} ({_states_text(frame, states)}). "
        + (f"Distinct configurations among the complete trials: {len(distinct(frame))} (the others repeat an earlier "
           "trial's configuration; each configuration is counted once below). " if len(distinct(frame)) < n_complete else "")
        + f"Objectives: {', '.join(f'{m} ({d})' for m, d in objectives)}.",
        "",
        f"Note: {DENSE_NOTE}",
        "",
        _selection_note(frame, objectives),
        "",
        *((level0, "") if (level0 := _level0_note(frame)) else ()),
        "## Best configurations",
        "",
        to_markdown(with_intervals(table)) if len(table) else "_no complete trials_\n",
        "Gains are dwt top-1 minus the matched baseline's on the same examples; the interval is a "
        "95 % paired bootstrap interval and p the exact McNemar test on discordant examples. "
        + _adjustment_note(frame)
        + " A gain is called significant only when its interval "
        "excludes 0 and its adjusted p is below 0.05; \"best\" means best on the objective, not a "
        "significant improvement.",
        "",
        *_verdicts(table),
        *_replicate_lines(table, frame),
        "",
        "## Parameter importances",
        "",
        f"**Caution:** importances {caveat}." if caveat else
        (f"Computed from {n_distinct} distinct complete configurations." if importances else "Not computed."),
        "",
        "## Plots",
        "",
        *(f"![{k}]({p.name})" for k, p in files.items() if p.suffix == ".png"),
        *(f"- [{k}]({p.name})" for k, p in (extra_files or {}).items()),
        "",
    ]
    files |= extra_files or {}
    files["summary_md"] = _write_text(out_dir / "summary.md", "\n".join(md))
    return files
