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

VAL = tuple(f"val_{k}" for k in EVAL)  # the validation part of the evaluation examples (val_fraction > 0)

PER_METHOD = (*EVAL, *PREREC, *VAL, *RECOVERY, *FINETUNE, *STATS, "pruned_fraction", *TIMING, *DROPS)
BASE = tuple(f"base_{k}" for k in (*EVAL, *TIMING))
BASE_VAL = tuple(f"base_{k}" for k in VAL)
PAIRED = tuple(f.name for f in fields(PairedComparison) if f.name != "n_boot")
TIMING_METRICS = frozenset(k for k in (*PER_METHOD, *BASE) if "infer_" in k)  # absent when timing_batches=0


def _recorded(recovery: str | None, validation: bool | None = None) -> list[str]:
    """``PER_METHOD`` less the names a trial with this recovery (and with or without a validation
    part) does not record (None: all names)."""
    skip = set() if validation is None or validation else set(VAL)
    if recovery == "none":
        skip |= {*PREREC, *FINETUNE}
    elif recovery == "bn":
        skip |= set(FINETUNE)
    return [k for k in PER_METHOD if k not in skip]


def method_names(recovery: str | None = None, validation: bool | None = None) -> list[str]:
    """Metric names of a method run (dwt, magnitude or random); all of them, or those a trial
    with ``recovery`` records (``prerec_*`` only after a recovery, ``recovery_train_loss`` only
    after fine-tuning) and ``validation`` (``val_*``, ``base_val_*``, ``n_val`` only when the
    evaluation examples have a validation part)."""
    val = [] if validation is False else [*BASE_VAL, "n_val"]
    return [*_recorded(recovery, validation), *BASE, *val, "n_eval"]


def headline_names(recovery: str | None = None, validation: bool | None = None) -> list[str]:
    """Metric names of the trial run (the names a study objective may use)."""
    names = method_names(recovery, validation)
    names += [f"{m}_{k}" for m in BASELINES for k in _recorded(recovery, validation)]
    names += [f"dwt_vs_{m}_{k}" for m in BASELINES for k in PAIRED]
    names += [f"gain_top1_vs_{m}" for m in BASELINES]
    if validation is not False:
        names += [f"val_gain_top1_vs_{m}" for m in BASELINES]
    return names


#: example-independent metrics: the same on validation and test (what the pruning did to the weights,
#: and recovery's counts and last fine-tuning loss, on training batches)
_EXAMPLE_FREE = frozenset((*STATS, "pruned_fraction", *RECOVERY, *FINETUNE))


def selection_name(name: str) -> str | None:
    """The metric a study selects on for objective ``name`` when the trial has a validation part:
    ``top1`` -> ``val_top1``, ``magnitude_top1`` -> ``magnitude_val_top1``,
    ``gain_top1_vs_random`` -> ``val_gain_top1_vs_random``; an example-independent metric
    (sparsity, bytes, compression, pruned fraction, timing) is itself; None for a metric measured
    on the test examples only (paired intervals, drops, before-recovery scores), which a study
    with a validation part cannot select on."""
    if name in VAL or name.startswith("val_") or any(name.startswith(f"{m}_val_") for m in BASELINES):
        return name
    if name.startswith("gain_top1_vs_"):
        return f"val_{name}"
    prefix, bare = "", name
    for m in BASELINES:
        if name.startswith(f"{m}_"):
            prefix, bare = f"{m}_", name[len(m) + 1 :]
    if bare in EVAL:
        return f"{prefix}val_{bare}"
    if bare in _EXAMPLE_FREE or name in TIMING_METRICS or is_timing(name):
        return name
    return None


def is_example_free(name: str) -> bool:
    """Whether ``name`` (a method's, or a baseline's ``magnitude_``/``random_`` one) is the same on
    any evaluation examples: what pruning did to the weights (sparsity, bytes, compression, pruned
    fraction), recovery's counts, timing."""
    bare = next((name[len(m) + 1 :] for m in BASELINES if name.startswith(f"{m}_")), name)
    return bare in _EXAMPLE_FREE or is_timing(name)


def is_timing(name: str) -> bool:
    """Whether ``name`` is an inference-timing metric (only recorded when timing_batches > 0)."""
    return name in TIMING_METRICS or any(name == f"{m}_{k}" for m in BASELINES for k in TIMING_METRICS)
