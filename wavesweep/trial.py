"""One trial: prune a base model three ways at the same budget and evaluate all three.

Pure PyTorch/NumPy: this module knows nothing of MLflow or Optuna. ``tracking`` records
a ``TrialResult``; ``study`` calls ``run_trial`` with a ``reporter`` for early stopping.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
import zipfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from wavesweep import accounting, baselines, data, evaluate, evalsplit, pruning, recovery, schema, train
from wavesweep.config import TrialConfig
from wavesweep.fileio import atomic_write
from wavesweep.models import build_model
from wavesweep.prune_record import target_layers
from wavesweep.stats import PairedComparison, paired_comparison
from wavesweep.wavelets import LevelClampedWarning, StructuralZerosWarning

log = logging.getLogger(__name__)

# Number of evaluation chunks the dwt model is scored in, so a reporter (an Optuna
# pruner) can stop a hopeless trial before the whole evaluation set has been seen.
N_CHUNKS = 4

Reporter = Callable[[evaluate.Chunk], None]  # a dwt evaluation chunk -> may raise to stop the trial


@dataclass
class MethodOutcome:
    """One pruned model: what was pruned, what it costs to store, how well it does.

    ``eval`` is the final model's (after recovery) on the test part of the evaluation examples;
    ``val_eval`` its score on the validation part (None without one); ``prerec_eval`` the same
    model's before recovery on the test part (None when ``recovery=none``: then they are the same model).
    """

    method: str
    prune: pruning.PruneResult
    stats: accounting.ModelStats
    eval: evaluate.EvalResult
    timing: evaluate.Timing | None
    recovery: recovery.RecoveryReport | None = None
    prerec_eval: evaluate.EvalResult | None = None
    val_eval: evaluate.EvalResult | None = None


@dataclass
class TrialResult:
    config: TrialConfig
    base: train.BaseModel
    base_eval: evaluate.EvalResult
    base_timing: evaluate.Timing | None
    outcomes: dict[str, MethodOutcome]  # keys: dwt, magnitude, random
    paired: dict[str, PairedComparison]  # keys: dwt_vs_magnitude, dwt_vs_random
    phase_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    eval_info: dict[str, object] = field(default_factory=dict)
    base_val_eval: evaluate.EvalResult | None = None  # the base model on the validation part

    def release(self) -> None:
        """Drop the three pruned models and their records (:meth:`PruneResult.release`) once the
        trial is recorded: every number (:meth:`metrics`, ``stats``, evaluations) stays."""
        for o in self.outcomes.values():
            o.prune.release()

    def metrics(self) -> dict[str, dict[str, float]]:
        """Every recorded metric: ``{method: {name: value}}`` and ``"parent"`` (the headline).

        Names are ``wavesweep.schema``'s: ``method_names()`` per method, ``headline_names()``
        (plus ``seconds_<phase>``) for the parent; timing metrics only when timing ran.
        """
        base = {f"base_{k}": v for k, v in self.base_eval.metrics().items()}
        if self.base_val_eval is not None:
            base |= {f"base_val_{k}": v for k, v in self.base_val_eval.metrics().items()}
            base["n_val"] = float(self.base_val_eval.n)
        if self.base_timing is not None:
            base |= {f"base_{k}": v for k, v in self.base_timing.metrics().items()}
        out: dict[str, dict[str, float]] = {}
        for m, o in self.outcomes.items():
            d = dict(o.eval.metrics())
            if o.prerec_eval is not None:  # the same model before recovery
                d |= {f"prerec_{k}": v for k, v in o.prerec_eval.metrics().items()}
            if o.val_eval is not None:  # the same final model on the validation part
                d |= {f"val_{k}": v for k, v in o.val_eval.metrics().items()}
            if o.recovery is not None:
                d |= o.recovery.metrics()
            totals = o.stats.totals()
            d |= {k: totals[k] for k in schema.STATS}
            # what pruning dropped: dwt's positions that are zero whatever the weights left out (the budget
            # the baselines are matched to); for magnitude and random their weights zeroed
            d["pruned_fraction"] = o.prune.matched_fraction
            if o.timing is not None:
                d |= o.timing.metrics()
            # base minus pruned (positive = the pruned model is worse), loss the other way round
            d |= {f"drop_{k}": base[f"base_{k}"] - d[k] for k in ("top1", "top5", "f1_macro")}
            d["increase_loss"] = d["loss"] - base["base_loss"]
            out[m] = d | base | {"n_eval": float(self.eval_info["n_eval"])}
        parent = dict(out["dwt"])  # headline: dwt under plain names, baselines prefixed
        for m in schema.BASELINES:
            parent |= {f"{m}_{k}": v for k, v in out[m].items() if k in schema.PER_METHOD}
            parent |= self.paired[f"dwt_vs_{m}"].metrics(f"dwt_vs_{m}")
            parent[f"gain_top1_vs_{m}"] = out["dwt"]["top1"] - out[m]["top1"]
            if "val_top1" in out[m]:
                parent[f"val_gain_top1_vs_{m}"] = out["dwt"]["val_top1"] - out[m]["val_top1"]
        parent |= {f"seconds_{k}": v for k, v in self.phase_seconds.items()}
        return out | {"parent": parent}


class _Phases:
    """Wall-clock seconds per named phase (for the benchmark's breakdown)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def load_eval_set(cfg: TrialConfig) -> tuple[data.DatasetBundle, torch.utils.data.Dataset]:
    bundle = data.load_dataset(cfg.dataset, root=cfg.data_root or None, seed=cfg.seed)
    subset = data.eval_subset(bundle.test, cfg.eval_limit or None, seed=cfg.seed)
    return bundle, subset


def eval_parts(cfg: TrialConfig) -> tuple[data.DatasetBundle, torch.utils.data.Dataset,
                                            torch.utils.data.Dataset | None, torch.utils.data.Dataset, dict[str, str]]:
    """``(bundle, examples, validation part or None, test part, selections)``: what
    :func:`load_eval_set` and :func:`~wavesweep.evalsplit.split_eval_set` give, plus each part's
    selection, a digest of the positions of its examples in the dataset's evaluation split (the
    base evaluation's cache key: another subset or split of the same files, whether from other
    settings or from another version of the code or of scikit-learn, is another entry)."""
    bundle = data.load_dataset(cfg.dataset, root=cfg.data_root or None, seed=cfg.seed)
    chosen = data.eval_subset_positions(bundle.test, cfg.eval_limit or None, seed=cfg.seed)
    examples = bundle.test if chosen is None else data.take(bundle.test, chosen)
    if chosen is None:
        chosen = np.arange(len(bundle.test), dtype=np.int64)
    if cfg.val_fraction == 0:  # no labels read: a dataset that does not expose them is not read twice
        val_pos, test_pos = np.arange(0, dtype=np.int64), np.arange(len(examples), dtype=np.int64)
        val_set, test_set = None, examples
    else:
        val_pos, test_pos = evalsplit.validation_indices(data.dataset_targets(examples), cfg.val_fraction, seed=cfg.seed)
        val_set, test_set = data.take(examples, val_pos), data.take(examples, test_pos)

    def digest(pos: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(chosen[pos], dtype="<i8").tobytes()).hexdigest()[:16]

    return bundle, examples, val_set, test_set, {"test": digest(test_pos), "val": digest(val_pos)}


def _base_eval_cached(
    base: train.BaseModel, cfg: TrialConfig, eval_set: torch.utils.data.Dataset, device: torch.device,
    fingerprint: str, selection: str, part: str = "test", layout: str = "contiguous",
) -> evaluate.EvalResult:
    """Evaluate the unpruned base once per (weights checksum, data fingerprint, selected
    examples, device type, batch size, memory format ``layout``: :func:`evaluate.compute_layout`)
    and cache the logits (``selection``: the part's digest from :func:`eval_parts`).

    The cache is a .npz of logits and targets; metrics are recomputed from it, so a cached
    result is exactly what a fresh evaluation would give for the same model and examples on the
    same kind of device (``fingerprint``: :func:`~wavesweep.data.eval_fingerprint` of the dataset,
    so other files or labels under the same name are evaluated afresh; the training split is not
    in it, as it does not enter the logits).
    """
    key = hashlib.sha256((
        f"{base.checksum}|{cfg.dataset}|{fingerprint}|{selection}|{cfg.eval_limit}|{cfg.seed}|{len(eval_set)}|{cfg.val_fraction}|{part}"
        f"|{device.type}|{cfg.batch_size}" + ("" if layout == "contiguous" else f"|{layout}")
    ).encode()).hexdigest()[:24]
    path = train.cache_dir() / "base-evals" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return evaluate.metrics_from_logits(torch.from_numpy(z["logits"]).to(device), torch.from_numpy(z["targets"]))
        # a damaged cache entry is recomputed, not trusted: a truncated .npz is no zip (BadZipFile), an
        # empty one no data (EOFError); neither is an OSError or ValueError
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable base-evaluation cache %s: %s", path, exc)
    logits, targets = evaluate.predict(base.model, eval_set, batch_size=cfg.batch_size, device=device)
    with atomic_write(path) as fh:
        np.savez(fh, logits=logits.numpy(), targets=targets.numpy())
    # scored on the trial's device, cached or not, as the pruned models are (evaluate_many): the
    # same arithmetic for the base's loss as for theirs
    return evaluate.metrics_from_logits(logits.to(device), targets)


def check_training_split(recovery: str, bundle: data.DatasetBundle) -> None:
    """A one-line ValueError when ``recovery`` needs the training split and ``bundle`` has none
    (an ImageNet validation folder alone), saying where it was looked for or why the one found is
    not used."""
    if recovery == "none" or bundle.train is not None:
        return
    what = f"the training split of dataset {bundle.name!r}"
    looked = bundle.info.get("train_looked_for")  # imagenet: where a train/ folder would be
    if unusable := bundle.info.get("train_unusable"):  # imagenet: a train/ there, but not that split
        raise ValueError(f"recovery={recovery!r} needs {what}; the one found is not used: {unusable}")
    where = f" (looked for a train/ folder of synset folders at {looked!r})" if looked else ""
    raise ValueError(
        f"recovery={recovery!r} needs {what}, which is not available here (e.g. an ImageNet validation "
        f"folder alone){where}; use recovery=none"
    )


def check_model_fits(cfg: TrialConfig) -> None:
    """Raise ValueError when ``cfg.model`` has no layers of ``cfg.targets``' kinds or ``cfg.layout``
    cannot take one's weight (a Linear in ``kernel``): checked on the shapes of a model built on
    the meta device (milliseconds), before any base model is trained or loaded."""
    ds = data.DATASETS.get(cfg.dataset)  # its registered input shape: the shapes printed are the real model's
    with torch.device("meta"):
        net = build_model(cfg.model, num_classes=ds.num_classes or 2, in_channels=ds.in_channels, image_size=ds.image_size)
    pruning.check_layout(net, cfg.target_kinds, cfg.layout)


def run_trial(
    cfg: TrialConfig,
    *,
    base: train.BaseModel | None = None,
    reporter: Reporter | None = None,
    progress: bool = False,
) -> TrialResult:
    """Run one trial; returns every number the trackers record.

    ``reporter(chunk)`` is called with each of the ``N_CHUNKS`` evaluation chunks of the dwt
    model (an ``evaluate.Chunk``: step, cumulative result, the chunk's size and correct count) over
    the validation part when there is one (``val_fraction > 0``), else over the evaluation
    examples; it may raise (e.g. ``optuna.TrialPruned``) to stop the trial early. Every model is
    scored on both parts; the headline metrics are the test part's. A ``base`` given here is
    moved to the trial's device in place, and on a CPU a conv model is put in channels-last
    memory format (:func:`evaluate.compute_layout`; its values unchanged).
    """
    opened: list[torch.utils.data.Dataset] = []
    try:
        return _run_trial(cfg, base, reporter, progress, opened)
    finally:  # file datasets: stop the persistent evaluation and recovery workers, also when the trial stops early
        # (pruned by the reporter, or failed): else they live on until a garbage collection. Every
        # part is closed even when closing another raised (an ExitStack runs each callback)
        with ExitStack() as closing:
            for part in opened:
                closing.callback(data.close_loaders, part)


def _run_trial(
    cfg: TrialConfig, base: train.BaseModel | None, reporter: Reporter | None, progress: bool,
    opened: list[torch.utils.data.Dataset],
) -> TrialResult:
    """:func:`run_trial`'s work; the evaluation sets and training split it loads are appended to ``opened``."""
    phases = _Phases()
    device = evaluate.resolve_device(cfg.device)
    caught: list[str] = []

    @contextmanager
    def recording_warnings():
        """Record the pruning step's warnings on the result (clamped levels are on the dwt result already)."""
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            yield
        caught.extend(f"{w.category.__name__}: {w.message}" for w in wlist if not issubclass(w.category, (LevelClampedWarning, StructuralZerosWarning)))

    if base is None:  # before a base model is loaded, data included
        check_model_fits(cfg)
    with phases("load_data"):
        bundle, eval_all, val_set, eval_set, selections = eval_parts(cfg)
        opened.append(eval_all)
        if bundle.train is not None:  # recovery's decoding workers (recovery.training_batches), kept
            opened.append(bundle.train)  # for the three methods, stop with the trial too
    # before any other work: a recovery that needs training data must have it
    settings = cfg.recovery_settings()
    check_training_split(cfg.recovery, bundle)
    with phases("load_base"):
        if base is None:
            base = train.get_base_model(
                cfg.model,
                cfg.dataset,
                seed=cfg.seed,
                data_root=cfg.data_root or None,
                weights=cfg.weights or None,
                device=cfg.device,
                progress=progress,
                bundle=bundle,
            )
        # Pruning, recovery and evaluation all run on the trial's device: the pruned models are
        # copies of this one, so on an accelerator dwt prunes through the torch transform and
        # magnitude/random select there too (no NumPy round trip). Whether the base evaluation
        # came from its cache must not decide where pruning runs.
        base.model.to(device)
        layout = evaluate.compute_layout(base.model, device)  # channels-last on a CPU: faster convolutions
        # random's keys depend on the seed and the target layers' sizes alone: drawn on a thread
        # from here, beside the base evaluation and dwt's pruning (the same keys, the same masks)
        random_keys = baselines.RandomKeys(
            cfg.seed, [m.weight.numel() for _, m in target_layers(base.model, cfg.target_kinds)],
            joint=cfg.scope == "global", pin=device.type == "cuda",
        )
    with phases("eval_base"):
        fingerprint = data.eval_fingerprint(bundle)  # the base's logits depend on the evaluation split alone
        base_eval = _base_eval_cached(base, cfg, eval_set, device, fingerprint, selections["test"], layout=layout)
        base_val_eval = (None if val_set is None
                         else _base_eval_cached(base, cfg, val_set, device, fingerprint, selections["val"], part="val", layout=layout))

    prerec: dict[str, evaluate.EvalResult] = {}
    reports: dict[str, recovery.RecoveryReport] = {}

    def evaluate_all(models: dict[str, torch.nn.Module], examples=eval_set) -> dict[str, evaluate.EvalResult]:
        """One pass over the (test) examples feeds every model (exactly as separate passes)."""
        return evaluate.evaluate_many(models, examples, batch_size=cfg.batch_size, device=device)

    def recover(results: dict[str, pruning.PruneResult]) -> None:
        """Evaluate before recovery, then recover in place (the same for every method)."""
        if settings.recovery == "none":
            reports.update({m: recovery.RecoveryReport("none") for m in results})
            return
        with phases("eval"):
            prerec.update(evaluate_all({m: r.model for m, r in results.items()}))
        for m, r in results.items():
            with phases("recovery"):
                reports[m] = recovery.recover(r, bundle.train, settings, device=device, progress=progress)

    with phases("prune"), recording_warnings():
        dwt = pruning.prune_dwt(
            base.model,
            wavelet=cfg.wavelet,
            level=cfg.level,
            percentile=cfg.percentile,
            layout=cfg.layout,
            mode=cfg.mode,
            scope=cfg.scope,
            keep_approx=cfg.keep_approx,
            targets=cfg.target_kinds,
        )
    recover({"dwt": dwt})
    with phases("eval"):  # selection examples first (the pruner sees the validation part), then the test part
        selection = eval_set if val_set is None else val_set
        for chunk in evaluate.evaluate_chunks(dwt.model, selection, n_chunks=N_CHUNKS, batch_size=cfg.batch_size, device=device):
            if reporter is not None:
                reporter(chunk)
        dwt_val = None if val_set is None else chunk.result
        dwt_eval = chunk.result if val_set is None else None  # with a validation part: scored with the baselines below

    with phases("prune"), recording_warnings():
        # base.model's target weights: found finite by prune_dwt above, unchanged since (dwt's
        # recovery and evaluation ran on its copy)
        matched = pruning.prune_matched(base.model, dwt, scope=cfg.scope, seed=cfg.seed, targets=cfg.target_kinds,
                                        keys=random_keys, finite_checked=True)
        del random_keys  # its buffer: the random model's scores are made
    prunes = {"dwt": dwt, **matched}
    recover(matched)
    with phases("eval"):
        # one pass over the test part feeds the baselines (and dwt, when its chunks were the validation part)
        evals = evaluate_all({m: r.model for m, r in (prunes if dwt_eval is None else matched).items()})
        evals = {"dwt": evals["dwt"] if dwt_eval is None else dwt_eval, **{m: evals[m] for m in matched}}
        val_evals = {m: None for m in prunes}
        if val_set is not None:
            val_evals |= {"dwt": dwt_val, **evaluate_all({m: r.model for m, r in matched.items()}, val_set)}
    with phases("accounting"):
        base_cache: dict = {}  # base-layer float64 weights and norms, shared by the three methods
        stats = {m: accounting.model_stats(base.model, r, base_cache=base_cache) for m, r in prunes.items()}
        del base_cache
    timings: dict[str, evaluate.Timing | None] = {m: None for m in prunes}
    base_timing = None
    if cfg.timing_batches:
        with phases("timing"):
            # One warm-up batch reaches steady state on CPU and CUDA; every model gets the same.
            kw = dict(batch_size=cfg.batch_size, n_warmup=1, n_batches=cfg.timing_batches, device=device)
            base_timing = evaluate.time_inference(base.model, eval_set, **kw)
            for m, r in prunes.items():
                timings[m] = evaluate.time_inference(r.model, eval_set, **kw)
    with phases("paired_stats"):
        paired = {
            f"dwt_vs_{m}": paired_comparison(evals["dwt"].correct, evals[m].correct, seed=cfg.seed)
            for m in schema.BASELINES
        }
    for text in caught:
        log.warning("%s", text)
    outcomes = {
        m: MethodOutcome(m, prunes[m], stats[m], evals[m], timings[m], reports[m], prerec.get(m), val_evals[m])
        for m in prunes
    }
    eval_info = {"n_eval": len(eval_set), "n_val": 0 if val_set is None else len(val_set), "n_test_split": len(bundle.test),
                 "device": str(device),  # what cfg.device ("auto") resolved to: the base's recipe and the timings depend on it
                 "memory_format": layout,  # what the models computed in (evaluate.compute_layout)
                 **{f"data_{k}": v for k, v in bundle.info.items()}}  # fmt: skip
    notes = [r.note for r in reports.values() if r.note]
    all_warnings = list(dict.fromkeys([*base.warnings, *dwt.warnings, *caught, *notes]))
    return TrialResult(
        config=cfg,
        base=base,
        base_eval=base_eval,
        base_timing=base_timing,
        outcomes=outcomes,
        paired=paired,
        phase_seconds=phases.seconds,
        warnings=all_warnings,
        eval_info=eval_info,
        base_val_eval=base_val_eval,
    )
