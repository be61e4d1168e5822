"""The trials frame the reports read, one row per trial (``study.trials_frame`` builds it from
Optuna storage; tests build it by hand), and what is shared by its tables (:mod:`wavesweep.report`)
and figures (:mod:`wavesweep.figures`): the methods, the configuration columns, which trials
count (COMPLETE), the Pareto front and when parameter importances deserve a caveat.

Columns used:

* ``number``, ``state`` (COMPLETE, PRUNED, FAIL, ...), ``value_0``.. (objective values, in order)
* ``repeat_of``: on a COMPLETE trial whose configuration an earlier COMPLETE trial ran, that
  trial's number (a repeat: the same test, not a second one); empty otherwise
* trial parameters (TrialConfig field names: wavelet, level, percentile, layout, ...)
* recorded metrics: ``top1`` (dwt), ``magnitude_top1``, ``random_top1``, ``base_top1``,
  ``pruned_fraction`` (fraction of dwt coefficients dropped, positions zero whatever the weights left out; the baselines zero the same fraction
  of weights), ``compression_ratio`` (dense bytes / stored bytes, per method with prefixes),
  ``gain_top1_vs_magnitude``, ``dwt_vs_magnitude_ci_low`` ... ``_mcnemar_p``
* ``layers``: per-layer sparsity lists of the trial (dict of equal-length lists) or None
* a trial run over replicate seeds (``replicates`` in the spec): the metrics above are means over
  the seeds, with ``n_replicates`` and, for top-1 and the gains, ``<name>_ci_low``/``_ci_high``
  (95 % t-interval over the seeds) and ``<name>_std``
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from wavesweep import schema

METHODS = ("dwt", *schema.BASELINES)
SUMMARY_PARAMS = ("wavelet", "level", "percentile", "layout", "mode", "scope", "keep_approx")

#: the columns that define a configuration: runs equal in all of them (other seeds) are replicates
CONFIG_COLUMNS = (
    "model", "dataset", "weights", "eval_limit", *SUMMARY_PARAMS, "targets", "recovery", "recovery_batches",
    "recovery_batch_size", "finetune_steps", "finetune_lr", "finetune_optimizer", "finetune_schedule",
)  # fmt: skip


def complete(frame: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE trials (the only ones with every metric)."""
    if frame.empty or "state" not in frame:
        return frame.iloc[0:0]
    return frame[frame["state"] == "COMPLETE"]


def distinct(frame: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE trials less the repeats (``repeat_of`` set): each configuration once, as the
    trial that ran it. What is tested, adjusted for multiple testing and ranked."""
    done = complete(frame)
    return done[done["repeat_of"].isna()] if "repeat_of" in done else done


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


def front_staircase(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the attainment staircase of the points (x, y), both maximised.

    The front's points sorted by x ascending have y descending. Between two neighbours
    x_i < x_{i+1}, what is attained is y_{i+1} (the point at x_{i+1} dominates everything below
    and to its left), so the line drops at x_i, not at x_{i+1}: every vertex is weakly dominated
    by a measured point and the line never claims an accuracy beyond a measured compression.
    Returns the vertex coordinates (empty when no point is finite).
    """
    pts = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    front = pts[pareto_mask(pts, ["maximize", "maximize"])]
    front = front[np.lexsort((-front[:, 1], front[:, 0]))]
    if not len(front):
        return np.array([]), np.array([])
    xs, ys = [front[0, 0]], [front[0, 1]]
    for (x0, _y0), (x1, y1) in zip(front[:-1], front[1:]):
        xs += [x0, x1]
        ys += [y1, y1]
    return np.array(xs), np.array(ys)


#: fewer COMPLETE trials than this: parameter importances are flagged as indicative only
MIN_TRIALS_FOR_IMPORTANCE = 20


def importance_caveat(n_configs: int) -> str | None:
    """The warning printed on the importance figure and in summary.md, or None when there are
    enough: ``n_configs`` is the number of distinct configurations among the complete trials (a
    repeat is not another point; :func:`wavesweep.study.frame.distinct_study`)."""
    if n_configs >= MIN_TRIALS_FOR_IMPORTANCE:
        return None
    return (f"computed from only {n_configs} distinct complete configurations (< {MIN_TRIALS_FOR_IMPORTANCE}): "
            "indicative at best; rankings change with more trials")  # fmt: skip
