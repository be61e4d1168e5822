"""The tracked trial: ``trial.run_trial`` recorded by ``tracking``; one code path for
``mlflow run``, ``wavesweep trial`` and every Optuna study trial.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wavesweep import accounting, tracking, train
from wavesweep.config import TrialConfig
from wavesweep.trial import Reporter, TrialResult, run_trial

log = logging.getLogger(__name__)

URI_SCHEMES = ("models:/", "runs:/")


def resolve_base(cfg: TrialConfig, *, progress: bool = False) -> train.BaseModel:
    """Load (or train once and cache) the base model; an MLflow model URI is materialised first."""
    weights = cfg.weights or None
    if weights and weights.startswith(URI_SCHEMES):
        weights = str(tracking.weights_from_uri(weights, train.cache_dir()))
    return train.get_base_model(
        cfg.model, cfg.dataset, seed=cfg.seed, data_root=cfg.data_root or None, weights=weights,
        device=cfg.device, progress=progress,
    )  # fmt: skip


def _write_checkpoints(result: TrialResult, base: train.BaseModel, folder: Path, methods: tuple[str, ...]) -> tuple[dict[str, Path], float]:
    """Write the compressed checkpoints of ``methods`` into ``folder``; their paths and the seconds it took."""
    t0 = time.perf_counter()
    files = {}
    meta = {"trial": result.config.to_dict(), "base_checksum": base.checksum, "build_kwargs": base.build_kwargs}
    for m in methods:
        files[m] = folder / f"{m}.wsz"
        accounting.save_compressed(result.outcomes[m].prune, files[m], metadata=meta)
    return files, time.perf_counter() - t0


def run_tracked_trial(
    cfg: TrialConfig,
    *,
    parent_run_id: str | None = None,
    experiment: str | None = None,
    reporter: Reporter | None = None,
    tags: dict[str, str] | None = None,
    progress: bool = False,
    on_run: Callable[[str], None] | None = None,
    early_stop: tuple[type[BaseException], ...] = (),
) -> tuple[TrialResult, str]:
    """Run one trial and record it in MLflow; returns the result and the trial's run id.

    Any exception (including a reporter's early stop) closes the runs with status FAILED, or
    KILLED for ``KeyboardInterrupt``, records the error on them, and is re-raised. The caller
    passes its early-stop exception types in ``early_stop``: those close the runs KILLED with tag
    ``early_stopped=true`` (MLflow has no "pruned" status), and are re-raised for the caller. ``on_run(run_id)`` is
    called as soon as the run exists, so a study can cross-reference it before work starts.
    """
    t_start = time.perf_counter()
    client, exp_id = tracking.init_tracking(experiment=experiment)
    run = tracking.TrialRun(client, exp_id, cfg, parent_run_id=parent_run_id, extra_tags=tags)
    t_setup = time.perf_counter() - t_start
    if on_run is not None:
        on_run(run.run_id)
    try:
        t0 = time.perf_counter()
        base = resolve_base(cfg, progress=progress)
        t_base = time.perf_counter() - t0
        result = run_trial(cfg, base=base, reporter=reporter, progress=progress)
        result.phase_seconds["load_base"] = t_base
        result.phase_seconds["mlflow_setup"] = t_setup
        methods = ("dwt", "magnitude", "random") if cfg.save_baselines else ("dwt",)
        # Checkpoint writing (packing, CRC, file I/O: mostly outside the GIL) runs beside the
        # MLflow logging (SQL, in Python); log_trial waits for the files just before its upload.
        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1, thread_name_prefix="wavesweep-checkpoint") as pool:
            written = pool.submit(_write_checkpoints, result, base, Path(tmp), methods)
            t1 = time.perf_counter()
            tracking.log_trial(run, result, checkpoint_files=lambda: written.result()[0])
            result.phase_seconds["mlflow_logging"] = time.perf_counter() - t1
            result.phase_seconds["checkpoint_write"] = written.result()[1]
    except early_stop as exc:
        run.finish("KILLED", error=f"early-stopped: {exc}", tags={"early_stopped": "true"})
        raise
    except KeyboardInterrupt:
        run.finish("KILLED", error="interrupted (KeyboardInterrupt)")
        raise
    except BaseException as exc:
        run.finish("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    run.finish("FINISHED")
    return result, run.run_id
