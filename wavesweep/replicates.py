"""Replicates: one configuration run over several seeds, and what is reported across them.

Pure Python/NumPy/SciPy: no MLflow, no Optuna (``tracked_config`` records replicates in MLflow,
``study.objective`` runs them as one Optuna trial).

Replicate ``i`` (``i = 0 .. n-1``) of a configuration is the same :class:`TrialConfig` with
``seed = cfg.seed + i``. The trial seed drives the data split (digits), the stratified
evaluation subset, the base model's training (``train.get_base_model``: a new seed trains and
caches a new base model), random pruning and the recovery batches' order. With a fixed base
model (``weights`` set, or resnet18 on imagenet: torchvision's pretrained weights) the base model
does not change: only those data and pruning seeds vary
(on digits, whose split is drawn from the seed, fixed weights may have trained on another
seed's test examples: :func:`seeds_note` says so).

Across replicates every shared numeric metric ``m`` is reported as ``m_mean``, ``m_std`` (sample
standard deviation, ddof=1), ``m_ci_low`` and ``m_ci_high`` (the 95 % Student-t interval for the
mean: ``mean -+ t(0.975, n-1) * std / sqrt(n)``), plus ``n_replicates``. The names are not
fixed: whatever metrics the replicate trials record are aggregated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wavesweep import schema
from wavesweep.config import MAX_SEED, TrialConfig, coerce, fixed_base

MAX_REPLICATES = 100  # replicates are whole trials: a typo must not start a thousand of them
SEEDED_SPLITS = ("digits",)  # datasets whose train/test split is drawn from the seed (data_sources._digits)
CONFIDENCE = 0.95
STATS = ("mean", "std", "ci_low", "ci_high")


def check_replicates(value: Any, name: str = "replicates") -> int:
    """``value`` as an integer in 1..MAX_REPLICATES, else a one-line ``ValueError`` naming it."""
    n = coerce(name, value, int)
    if not 1 <= n <= MAX_REPLICATES:
        raise ValueError(f"{name}={value!r} must be an integer from 1 to {MAX_REPLICATES}")
    return n


def check_replicate_seeds(seed: int, n: int) -> None:
    """The seeds ``seed .. seed + n - 1`` of ``n`` replicates are all valid trial seeds, else a
    one-line ``ValueError`` naming the seed, the count and the highest seed that fits."""
    if seed + n - 1 > MAX_SEED:
        raise ValueError(f"seed={seed} with replicates={n}: the last replicate's seed {seed + n - 1} is above "
                         f"{MAX_SEED}; use seed <= {MAX_SEED - n + 1}")  # fmt: skip


def replicate_configs(cfg: TrialConfig, n: int) -> list[TrialConfig]:
    """The ``n`` replicate configurations of ``cfg``: the same values with seeds ``cfg.seed + i``."""
    n = check_replicates(n)
    check_replicate_seeds(cfg.seed, n)
    return [dataclasses.replace(cfg, seed=cfg.seed + i) for i in range(n)]


def config_id(cfg: TrialConfig) -> str:
    """A short, stable id of the configuration without its seed (equal for all its replicates)."""
    values = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def split_caution(cfg: TrialConfig) -> bool:
    """Fixed weights on a dataset whose split is drawn from the seed: other seeds' test examples
    may be the weights' training examples."""
    return bool(cfg.weights) and cfg.dataset in SEEDED_SPLITS


def seeds_note(cfg: TrialConfig, n: int) -> str:
    """One sentence saying what the replicate seeds vary (for the log and the CLI)."""
    seeds = ", ".join(str(cfg.seed + i) for i in range(n))
    fixed = fixed_base(cfg.model, cfg.dataset, cfg.weights)
    if fixed:
        note = (f"{n} replicates, seeds {seeds}; the base model is {fixed}, the same for every seed, so only the "
                "data split/evaluation subset, random-pruning and recovery-order seeds vary")  # fmt: skip
        if split_caution(cfg):
            note += (f" (caution: {cfg.dataset}'s train/test split is drawn from the seed, so fixed weights trained on "
                     "one seed's split may have seen other seeds' test examples)")  # fmt: skip
        return note
    return f"{n} replicates, seeds {seeds}: each seed has its own base model (trained once and cached), data split/subset and random pruning"


def _number(v: Any) -> float | None:
    """``v`` as a finite float: an int or a real number, NumPy's too (an np.float32 metric was left
    out of the aggregates); None for a bool, a string, a non-finite value or anything else."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def aggregate(rows: Sequence[Mapping[str, Any]], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean, sample std, and Student-t interval of every metric that all ``rows`` share as a finite number.

    ``rows``: one ``{metric: value}`` per replicate. Returns ``{m_mean, m_std, m_ci_low, m_ci_high}``
    for each such metric ``m`` and ``n_replicates``; with one row only the mean (no spread is
    measured). A metric missing from a row, or non-finite in one, is left out.
    """
    if not rows:
        raise ValueError("aggregate needs at least one replicate")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    from scipy.stats import t as student_t

    n = len(rows)
    shared = [k for k in rows[0] if all(_number(r.get(k)) is not None for r in rows)]
    out: dict[str, float] = {"n_replicates": float(n)}
    q = float(student_t.ppf(0.5 + confidence / 2, n - 1)) if n > 1 else math.nan
    for k in shared:
        x = np.array([float(r[k]) for r in rows], dtype=float)
        mean = float(x.mean())
        out[f"{k}_mean"] = mean
        if n > 1:
            std = float(x.std(ddof=1))
            half = q * std / math.sqrt(n)
            out |= {f"{k}_std": std, f"{k}_ci_low": mean - half, f"{k}_ci_high": mean + half}
    return out


def means(agg: Mapping[str, float]) -> dict[str, float]:
    """``{m: m_mean}`` of an :func:`aggregate` result (the plain names, as a single trial has them)."""
    return {k[: -len("_mean")]: v for k, v in agg.items() if k.endswith("_mean")}


def half_width(agg: Mapping[str, float], metric: str) -> float | None:
    """Half the interval of ``metric`` (None with one replicate or when absent)."""
    lo, hi = agg.get(f"{metric}_ci_low"), agg.get(f"{metric}_ci_high")
    return None if lo is None or hi is None else (hi - lo) / 2


def summary_lines(agg: Mapping[str, float]) -> list[str]:
    """The aggregate table the CLI prints: top-1 per method (and the base model) as mean +- the
    interval's half-width, then the dwt-vs-baseline gains with their interval."""
    n = int(agg["n_replicates"])
    lines = [f"over {n} replicates: mean +- half of the 95 % t-interval (std: sample standard deviation across seeds)",
             f"{'method':<10} {'top1 mean':>9} {'+-':>7} {'std':>7}"]  # fmt: skip
    for name, key in (("base", "base_top1"), ("dwt", "top1"), *((b, f"{b}_top1") for b in schema.BASELINES)):
        if f"{key}_mean" in agg:
            hw, std = half_width(agg, key), agg.get(f"{key}_std")
            lines.append(f"{name:<10} {agg[f'{key}_mean']:9.4f} {_fmt(hw, '7.4f')} {_fmt(std, '7.4f')}")
    for b in schema.BASELINES:
        key = f"gain_top1_vs_{b}"
        if f"{key}_mean" in agg:
            lo, hi = agg.get(f"{key}_ci_low"), agg.get(f"{key}_ci_high")
            ci = f" [95% CI {lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else ""
            lines.append(f"dwt_vs_{b}: gain {agg[f'{key}_mean']:+.4f}{ci} over {n} replicates")
    return lines


def _fmt(v: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if v is None else format(v, spec)
