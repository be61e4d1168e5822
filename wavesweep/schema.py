"""The name of every metric a trial records, defined once.

``trial.TrialResult.metrics()`` computes the values under these names; ``tracking`` logs them,
``study`` takes its objectives and the trial records it keeps in Optuna from them, and ``report``
reads them back. A test checks that the computed keys and these names are the same set.

* per method (the same names in every method run): ``PER_METHOD`` and ``BASE`` and ``n_eval``;
* headline (the trial run): the dwt values under the plain names, each baseline's per-method
  values prefixed ``magnitude_``/``random_``, the paired comparisons ``dwt_vs_<baseline>_<key>``
  and the gains ``gain_top1_vs_<baseline>`` (plus ``seconds_<phase>``, which is not a result).
"""

from __future__ import annotations

from dataclasses import fields

from wavesweep.stats import PairedComparison

BASELINES = ("magnitude", "random")

EVAL = ("top1", "top5", "loss", "f1_macro", "recall_macro", "precision_macro", "f1_weighted")  # EvalResult.metrics()
TIMING = ("infer_median_ms", "infer_p95_ms", "infer_ms_per_example", "infer_examples_per_s")  # Timing.metrics()
STATS = (
    "weight_sparsity_target", "weight_sparsity_model", "coeff_sparsity", "stored_bytes", "dense_bytes",
    "compression_ratio", "mean_rel_l2_error", "target_params", "target_zero_weights", "model_params",
    "coeffs", "zeroed_coeffs",
)  # fmt: skip  # accounting.ModelStats totals
DROPS = ("drop_top1", "drop_top5", "drop_f1_macro", "increase_loss")  # base minus pruned (loss: pruned minus base)

PREREC = tuple(f"prerec_{k}" for k in EVAL)  # the same model before recovery (recorded when recovery != none)
RECOVERY = ("recovery_seconds", "recovery_bn_layers", "recovery_bn_batches", "recovery_finetune_steps")
FINETUNE = ("recovery_train_loss",)  # recovery.RecoveryReport.metrics(): last fine-tuning loss (recovery=finetune)

PER_METHOD = (*EVAL, *PREREC, *RECOVERY, *FINETUNE, *STATS, "pruned_fraction", *TIMING, *DROPS)
BASE = tuple(f"base_{k}" for k in (*EVAL, *TIMING))
PAIRED = tuple(f.name for f in fields(PairedComparison) if f.name != "n_boot")
TIMING_METRICS = frozenset(k for k in (*PER_METHOD, *BASE) if "infer_" in k)  # absent when timing_batches=0


def _recorded(recovery: str | None) -> list[str]:
    """``PER_METHOD`` less the names a trial with this recovery does not record (None: all names)."""
    skip = set()
    if recovery == "none":
        skip |= {*PREREC, *FINETUNE}
    elif recovery == "bn":
        skip |= set(FINETUNE)
    return [k for k in PER_METHOD if k not in skip]


def method_names(recovery: str | None = None) -> list[str]:
    """Metric names of a method run (dwt, magnitude or random); all of them, or those a trial
    with ``recovery`` records (``prerec_*`` only after a recovery, ``recovery_train_loss`` only
    after fine-tuning)."""
    return [*_recorded(recovery), *BASE, "n_eval"]


def headline_names(recovery: str | None = None) -> list[str]:
    """Metric names of the trial run (the names a study objective may use)."""
    names = method_names(recovery)
    names += [f"{m}_{k}" for m in BASELINES for k in _recorded(recovery)]
    names += [f"dwt_vs_{m}_{k}" for m in BASELINES for k in PAIRED]
    names += [f"gain_top1_vs_{m}" for m in BASELINES]
    return names


def is_timing(name: str) -> bool:
    """Whether ``name`` is an inference-timing metric (only recorded when timing_batches > 0)."""
    return name in TIMING_METRICS or any(name == f"{m}_{k}" for m in BASELINES for k in TIMING_METRICS)
