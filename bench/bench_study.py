"""Benchmark of studies: throughput, Optuna/MLflow overhead per trial, compute saved by the pruner.

    python bench/bench_study.py [--trials 4] [--prune-trials 12] [--keep DIR]

Everything is written in a temporary directory (Optuna and MLflow SQLite stores, reports);
base models come from the usual cache ($WAVESWEEP_CACHE or ~/.cache/wavesweep), trained first
if absent (not timed). Figures printed:

1. trials per minute for sweeps/digits-resnet18.yaml with 1 and 2 workers (``--trials`` each,
   through the CLI as a user runs it): from Optuna's trial timestamps (first start to last
   finish) and from the command's wall clock (process start-up, study set-up, report included);
2. Optuna and MLflow overhead per trial, from an instrumented in-process study of the same
   spec: time inside Optuna calls (ask, tell, suggest, user attrs, reports, trial counts), inside
   wavesweep.tracking (MLflow runs, params, metrics, tables, artifacts), in the compressed
   checkpoint write, and in the trial's own compute (``trial.run_trial``);
3. the pruner on a space with many hopeless configurations (percentiles up to 99.9): the same
   random-sampler sequence of configurations with and without a median pruner; examples
   evaluated, wall time, and whether the best configuration survived.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEC = ROOT / "sweeps" / "digits-resnet18.yaml"


def env_for(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def throughput(workdir: Path, name: str) -> tuple[int, float]:
    """(counted trials, trials per minute between the first start and the last finish)."""
    import optuna

    s = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    done = [t for t in s.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return len(done), 60.0 * len(done) / span


def bench_workers(tmp: Path, trials: int) -> None:
    print(f"\n== trials per minute, {SPEC.relative_to(ROOT)} ({trials} trials per run) ==")
    print(f"{'workers':>7} {'trials':>6} {'trials/min (trials only)':>25} {'trials/min (whole command)':>27} {'wall s':>7}")
    for workers in (1, 2):
        wd = tmp / f"workers{workers}"
        wd.mkdir()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "wavesweep", "study", str(SPEC), "--n-trials", str(trials), "--workers", str(workers), "-q"],
            cwd=wd, env=env_for(wd), capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"study with {workers} workers failed:\n{proc.stderr[-3000:]}")
        n, tpm = throughput(wd, "digits-resnet18")
        print(f"{workers:>7} {n:>6} {tpm:>25.2f} {60 * n / wall:>27.2f} {wall:>7.1f}")


class Timers:
    """Wall time spent inside wrapped functions, outermost calls only per category, within ``scope``."""

    def __init__(self, scope: str) -> None:
        self.scope = scope  # only calls made inside this category's outermost call are timed
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner, attr: str, category: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if category != self.scope and self.depth[self.scope] == 0:
                return fn(*args, **kwargs)  # study set-up (e.g. creating the stores) is not per-trial overhead
            self.depth[category] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[category] -= 1
                if self.depth[category] == 0:
                    self.seconds[category] += time.perf_counter() - t0

        setattr(owner, attr, timed)


def bench_overhead(tmp: Path, trials: int) -> None:
    import optuna

    from wavesweep import checkpoint, study, tracked_trial, tracking
    from wavesweep.study import workers

    wd = tmp / "overhead"
    wd.mkdir()
    os.chdir(wd)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{wd / 'mlflow.db'}"
    timers = Timers(scope="trial_total")
    for attr in ("ask", "get_trials", "set_user_attr"):
        timers.wrap(optuna.study.Study, attr, "optuna")
    for attr in ("suggest_categorical", "suggest_int", "suggest_float", "set_user_attr", "report", "should_prune"):
        timers.wrap(optuna.trial.Trial, attr, "optuna")
    timers.wrap(optuna.study._optimize, "_tell_with_warning", "optuna")
    timers.wrap(optuna.storages, "fail_stale_trials", "optuna")
    for attr in ("init_tracking", "log_trial", "log_batch", "close_run"):
        timers.wrap(tracking, attr, "mlflow")
    timers.wrap(tracking.TrialRun, "__init__", "mlflow")
    timers.wrap(tracking.TrialRun, "finish", "mlflow")
    timers.wrap(checkpoint, "save_compressed", "checkpoint")
    timers.wrap(tracked_trial, "run_trial", "compute")
    timers.wrap(tracked_trial, "resolve_base", "base_load")
    timers.wrap(workers, "_worker_loop", "trial_total")  # the whole trial loop of the (single) worker

    spec = study.load_spec(SPEC)
    t0 = time.perf_counter()
    s = study.run_study(spec, n_trials=trials).study
    wall = time.perf_counter() - t0
    n = len(s.get_trials())
    sec = {k: v / n for k, v in timers.seconds.items()}
    # everything else in the loop: suggest -> TrialConfig, user-attr records, slot lock, progress, sleeps
    other = sec["trial_total"] - sum(sec.get(k, 0.0) for k in ("optuna", "mlflow", "checkpoint", "compute", "base_load"))
    print(f"\n== overhead per trial, in-process, {n} trials of {SPEC.name} (1 worker, SQLite stores) ==")
    print(f"study wall clock {wall:.1f} s (set-up + trials, report not included)")
    print(f"{'part':<44} {'s/trial':>8} {'share':>6}")
    rows = [
        ("trial compute (prune x3, evaluate, accounting)", sec.get("compute", 0.0)),
        ("base model load from cache", sec.get("base_load", 0.0)),
        ("MLflow (wavesweep.tracking: runs, logging)", sec.get("mlflow", 0.0)),
        ("compressed checkpoint write (MLflow artifact)", sec.get("checkpoint", 0.0)),
        ("Optuna (ask/tell/suggest/attrs/counts)", sec.get("optuna", 0.0)),
        ("other study bookkeeping", other),
    ]
    for label, v in rows:
        print(f"{label:<44} {v:>8.3f} {100 * v / sec['trial_total']:>5.1f}%")
    print(f"{'total per trial (worker loop / trials)':<44} {sec['trial_total']:>8.3f}")


HOPELESS = {
    "study": "prune-bench",
    "base": {"model": "resnet18", "dataset": "digits", "eval_limit": 0, "seed": 0},
    "fixed": {"timing_batches": 0, "layout": "filter", "level": 3, "mode": "periodization"},
    "space": {"percentile": [30, 50, 97, 98, 99, 99.3, 99.5, 99.7, 99.8, 99.9], "wavelet": ["haar", "bior2.2", "db2"]},
    "objectives": {"top1": "maximize"},
    "sampler": {"name": "random", "seed": 7},  # with --sampler-seed 7: the same configurations in both runs, whatever the results
}


def bench_pruner(tmp: Path, trials: int) -> None:
    import optuna

    print(f"\n== pruner on a space of mostly hopeless configurations ({trials} trials, random sampler, same sequence) ==")
    results = {}
    for label, pruner in (("no pruning", "none"), ("median pruner", {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0})):
        wd = tmp / label.replace(" ", "-")
        wd.mkdir()
        spec = wd / "prune-bench.yaml"
        spec.write_text(yaml.safe_dump({**HOPELESS, "pruner": pruner, "n_trials": trials}, sort_keys=False))
        t0 = time.perf_counter()
        # --sampler-seed: a launch salts the spec's seed unless given one, and both runs must
        # propose the same configurations (one worker: seed as given)
        cmd = [sys.executable, "-m", "wavesweep", "study", str(spec), "-q", "--sampler-seed", str(HOPELESS["sampler"]["seed"])]
        proc = subprocess.run(cmd, cwd=wd, env=env_for(wd), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
        s = optuna.load_study(study_name="prune-bench", storage=f"sqlite:///{wd / 'optuna.db'}")
        ts = s.get_trials()
        trial_s = sum(t.duration.total_seconds() for t in ts)
        examples = sum(t.user_attrs.get("examples_evaluated", 0) for t in ts)  # scalar user attribute
        results[label] = (s, ts, examples, trial_s, wall)
    print(f"{'':<15} {'complete':>8} {'pruned':>6} {'examples evaluated':>19} {'trial s':>8} {'best top1':>9}  best config")
    for label, (s, ts, examples, trial_s, _wall) in results.items():
        b = s.best_trial
        print(f"{label:<15} {sum(t.state.name == 'COMPLETE' for t in ts):>8} {sum(t.state.name == 'PRUNED' for t in ts):>6} "
              f"{examples:>19} {trial_s:>8.1f} {b.value:>9.4f}  #{b.number} {b.params}")  # fmt: skip
    (s0, t0_, ex0, sec0, _), (s1, t1_, ex1, sec1, _) = results.values()
    same = [a.params for a in t0_] == [b.params for b in t1_]
    kept = s1.best_trial.params == s0.best_trial.params and s1.best_value == s0.best_value
    print(f"same configurations in both runs: {same}")
    print(f"examples evaluated saved by pruning: {ex0 - ex1} of {ex0} ({100 * (ex0 - ex1) / ex0:.1f}%); "
          f"trial time saved: {sec0 - sec1:.1f} of {sec0:.1f} s ({100 * (sec0 - sec1) / sec0:.1f}%)")  # fmt: skip
    print(f"best trial kept by the pruned study: {kept}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4, help="trials per throughput run and for the overhead run")
    ap.add_argument("--prune-trials", type=int, default=12)
    ap.add_argument("--keep", default=None, help="keep the working directories here instead of a temp dir")
    ap.add_argument("--skip", nargs="*", default=[], choices=["workers", "overhead", "pruner"])
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from wavesweep import train

    t0 = time.perf_counter()
    train.get_base_model("resnet18", "digits", seed=0, progress=False)  # trained once and cached; not timed
    print(f"base model ready ({time.perf_counter() - t0:.1f} s); cache {train.cache_dir()}")
    with contextlib.ExitStack() as stack:
        tmp = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-study-")))
        tmp.mkdir(parents=True, exist_ok=True)
        if "workers" not in args.skip:
            bench_workers(tmp, args.trials)
        if "pruner" not in args.skip:
            bench_pruner(tmp, args.prune_trials)
        if "overhead" not in args.skip:
            bench_overhead(tmp, args.trials)


if __name__ == "__main__":
    main()
