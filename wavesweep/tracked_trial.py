"""The tracked trial: ``trial.run_trial`` recorded by ``tracking``; one code path for
``mlflow run``, ``wavesweep trial`` and every Optuna study trial.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wavesweep import checkpoint, interrupt, model_registry, models, tracking, train
from wavesweep.config import TrialConfig
from wavesweep.failures import error_text
from wavesweep.trial import Reporter, TrialResult, check_model_fits, load_eval_set, run_trial

log = logging.getLogger(__name__)

URI_SCHEMES = ("models:/", "runs:/")


def resolve_base(cfg: TrialConfig, *, progress: bool = False) -> train.BaseModel:
    """Load (or train once and cache) the base model; an MLflow model URI is materialised first."""
    weights = cfg.weights or None
    uri = ""
    if weights and weights.startswith(URI_SCHEMES):
        path, uri = model_registry.weights_from_uri(weights, train.cache_dir())
        weights = str(path)
    try:
        base = train.get_base_model(
            cfg.model, cfg.dataset, seed=cfg.seed, data_root=cfg.data_root or None, weights=weights,
            device=cfg.device, progress=progress,
        )  # fmt: skip
    except ValueError as exc:  # name the model URI given, not the file it is cached in
        if not uri:
            raise
        raise ValueError(str(exc).replace(f"weights file {weights!r}", uri).replace(str(weights), uri)) from None
    if uri:
        base = dataclasses.replace(base, source="mlflow", uri=uri)
    return base


def _write_checkpoints(result: TrialResult, folder: Path, methods: tuple[str, ...]) -> dict[str, Path]:
    """Write the compressed checkpoints of ``methods`` into ``folder``; returns their paths."""
    files = {}
    base = result.base
    meta = {"trial": result.config.to_dict(), "base_checksum": base.checksum, "build_kwargs": base.build_kwargs}
    for m in methods:
        files[m] = folder / f"{m}.wsz"
        size = checkpoint.save_compressed(result.outcomes[m].prune, files[m], metadata=meta)
        # Upload only complete files: a short write (a full disk) must not reach the artifact store.
        if files[m].stat().st_size != size:
            raise OSError(f"checkpoint {files[m].name} is {files[m].stat().st_size} bytes on disk, {size} were written")
    return files


def run_tracked_trial(
    cfg: TrialConfig,
    *,
    parent_run_id: str | None = None,
    adopt_run_id: str | None = None,
    experiment: str | None = None,
    reporter: Reporter | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = False,
    on_run: Callable[[str], None] | None = None,
    early_stop: tuple[type[BaseException], ...] = (),
) -> tuple[TrialResult, str]:
    """Run one trial and record it in MLflow; returns the result and the trial's run id.

    The trial's run is created below ``parent_run_id`` (a study run), or is ``adopt_run_id`` (the
    run ``mlflow run`` created; its experiment is used), or is created in ``experiment``.

    Any exception (including a reporter's early stop) closes the runs with status FAILED, or
    KILLED for ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM as ``interrupt.Terminated``), records the error on them, and is re-raised. The caller
    passes its early-stop exception types in ``early_stop``: those close the runs KILLED with tag
    ``early_stopped=true`` (MLflow has no "pruned" status), and are re-raised for the caller. ``on_run(run_id)`` is
    called as soon as the run exists, so a study can cross-reference it before work starts.
    """
    t_start = time.perf_counter()
    client, exp_id = tracking.init_tracking(experiment=experiment, run_id=None if parent_run_id else adopt_run_id)
    if parent_run_id is None:  # a trial of its own: tidy what a killed one left RUNNING in its experiment
        tracking.close_runs_of_dead_processes(client, exp_id)
    run = tracking.TrialRun(client, exp_id, cfg, parent_run_id=parent_run_id, adopt_run_id=adopt_run_id, extra_tags=tags)
    t_setup = time.perf_counter() - t_start
    try:
        if on_run is not None:
            on_run(run.run_id)
        check_model_fits(cfg)  # before the base model is trained or loaded
        t0 = time.perf_counter()
        base = resolve_base(cfg, progress=progress)
        t_base = time.perf_counter() - t0
        result = run_trial(cfg, base=base, reporter=reporter, progress=progress)
        result.phase_seconds["load_base"] = t_base
        result.phase_seconds["mlflow_setup"] = t_setup
        methods = ("dwt", "magnitude", "random") if cfg.save_baselines else ("dwt",)
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.perf_counter()
            files = _write_checkpoints(result, Path(tmp), methods)
            t2 = time.perf_counter()
            tracking.log_trial(run, result, checkpoint_files=files)
            result.phase_seconds["checkpoint_write"] = t2 - t1
            result.phase_seconds["mlflow_logging"] = time.perf_counter() - t2
        # Closing FINISHED is part of the work: a stop or an error while the parent and its
        # children are closed (several writes) closes them KILLED or FAILED below, not RUNNING.
        run.finish("FINISHED")
    # Closing is best-effort here (tracking.close_quietly): the exception being handled is what
    # is re-raised, never a failure to close (a locked database would turn a stop into an error).
    # Signals are ignored while the runs close, as for a stop: a SIGTERM landing in the close of
    # a failed or early-stopped trial would cut it short and leave the runs RUNNING.
    except early_stop as exc:
        error = f"early-stopped: {exc}"
        with interrupt.ignored():
            tracking.close_quietly(lambda: run.finish("KILLED", error=error, tags={"early_stopped": "true"}), "the trial's runs")
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (interrupt.Terminated)
        error = f"interrupted ({interrupt.caught(exc)})"
        with interrupt.ignored():
            tracking.close_quietly(lambda: run.finish("KILLED", error=error), "the trial's runs")
        raise
    except BaseException as exc:
        error = error_text(exc)
        with interrupt.ignored():
            tracking.close_quietly(lambda: run.finish("FAILED", error=error), "the trial's runs")
        raise
    return result, run.run_id


def _input_example(cfg: TrialConfig, kwargs: dict[str, int]) -> Any:
    """A registered model's input example: two of the trial's evaluation inputs, or, where its
    dataset cannot be read here (another machine, files moved since), two zero inputs of the
    model's input shape. The model itself comes from the run's checkpoint, not from the data."""
    try:
        _, eval_set = load_eval_set(cfg)
    except (OSError, ValueError) as exc:
        shape = (2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
        log.warning("input example: zeros of shape %s, since the trial's dataset %r cannot be read here (%s)",
                    shape, cfg.dataset, str(exc).splitlines()[0].split(";")[0])  # fmt: skip
        return torch.zeros(shape).numpy()
    return torch.stack([eval_set[i][0] for i in range(min(2, len(eval_set)))]).numpy()


def register_trial_model(run_id: str, *, name: str, alias: str | None = "champion", method: str | None = None) -> Any:
    """Register a trial's pruned model as an MLflow model version: an ordinary PyTorch module
    (state dict + architecture, see ``pruned_model``) that loads without wavesweep.

    ``method``: which of the trial's models; default dwt, or the method of ``run_id`` when that
    is a method run (a ``method`` that contradicts it is a ValueError).

    The model is rebuilt from the run's compressed checkpoint (the exact weights that were
    evaluated), with two real evaluation inputs as its input example (zeros of their shape where
    the dataset cannot be read here); the version is tagged with
    the trial's configuration and results and given ``alias``. The run must be FINISHED. A run's
    method already registered under ``name`` is that version again (``alias`` moved to it).
    """
    from wavesweep.names import check_alias, check_model_name

    check_model_name(name)
    if alias is not None:
        check_alias(alias)
    client, _ = tracking.init_tracking()
    run = tracking.get_trial_run(client, run_id)
    if run.info.run_id != run_id and (given := client.get_run(run_id).data.tags).get("wavesweep.kind") == "method":
        if method is not None and method != given.get("method"):
            raise ValueError(f"run {run_id} is the {given.get('method')} run of trial run {run.info.run_id}, not its {method} "
                             f"model: pass the trial run id with --method {method}, or drop --method")  # fmt: skip
        method = given.get("method")
    method = method or "dwt"
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run.info.run_id} is {run.info.status}: only a FINISHED trial run can be registered")
    cfg = tracking.trial_config_of(run)
    params, metrics = run.data.params, run.data.metrics
    missing = [f"base_{k}" for k in ("num_classes", "in_channels", "image_size") if f"base_{k}" not in params]
    if missing:
        raise ValueError(f"run {run.info.run_id} has no {', '.join(missing)}: not a trial run wavesweep finished")
    kwargs = {k: int(params[f"base_{k}"]) for k in ("num_classes", "in_channels", "image_size")}
    if (known := model_registry.existing_version(name, run.info.run_id, method)) is not None:
        log.info("run %s's %s model is version %s of %s already: no second version", run.info.run_id, method, known.version, name)
        model_registry.mark_wavesweep(name)  # an earlier registration may have stopped before marking it
        return model_registry.move_alias(known, alias)  # the same model: nothing uploaded
    prefix = "" if method == "dwt" else f"{method}_"
    tags = {
        "method": method, "wavelet": cfg.wavelet, "level": cfg.level, "percentile": cfg.percentile,
        "layout": cfg.layout, "mode": cfg.mode, "model": cfg.model, "dataset": cfg.dataset,
        # what else decides which weights were pruned: two models that differ only there differ here
        "scope": cfg.scope, "keep_approx": cfg.keep_approx, "targets": cfg.targets,
        "recovery": cfg.recovery, "seed": cfg.seed,  # a bn and a finetune model of one configuration differ here only
        # the base model pruned (the weights given, else wavesweep's own; its file's sha256 either way)
        "weights": cfg.weights or None, "base_checksum": params.get("base_checksum"),
        # and how they recovered: the settings the recovery read (finetune models of two lrs differ here)
        **({"recovery_batches": cfg.recovery_batches, "recovery_batch_size": cfg.recovery_batch_size}
           if cfg.recovery != "none" else {}),
        **({k: getattr(cfg, k) for k in ("finetune_steps", "finetune_lr", "finetune_optimizer", "finetune_schedule")}
           if cfg.recovery == "finetune" else {}),
        "top1": metrics.get(f"{prefix}top1"), "compression_ratio": metrics.get(f"{prefix}compression_ratio"),
        "stored_bytes": metrics.get(f"{prefix}stored_bytes"), "source_run_id": run.info.run_id,
        "checkpoint": f"{method}.wsz",
    }  # fmt: skip
    stored = sorted(Path(f.path).stem for f in client.list_artifacts(run.info.run_id, tracking.CHECKPOINT_DIR) if f.path.endswith(".wsz"))
    if method not in stored:
        raise ValueError(f"run {run.info.run_id} has no {method} checkpoint (it has: {', '.join(stored) or 'none'}); "
                         "the magnitude and random ones are stored when the trial runs with save_baselines=true")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tracking.download_checkpoint(client, run.info.run_id, method, Path(tmp))
        try:
            model, _meta = checkpoint.load_compressed(ckpt, models.build_model(cfg.model, **kwargs))
        except ValueError as exc:  # name the artifact, not the temporary download folder
            where = f"runs:/{run.info.run_id}/{tracking.CHECKPOINT_DIR}/{method}.wsz"
            raise ValueError(str(exc).replace(str(ckpt), where)) from None
        model.eval()
        example = _input_example(cfg, kwargs)
        architecture = {"model": cfg.model, **kwargs}
        return model_registry.register_model(model, architecture=architecture, input_example=example, checkpoint=ckpt,
                                             run_id=run.info.run_id, name=name, alias=alias, method=method, tags=tags)  # fmt: skip
