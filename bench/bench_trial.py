"""Where one trial's time goes, on the embedded default (ResNet-18 on digits).

Prints: process start + imports; in-process phases (base-model load, data, base evaluation,
pruning, evaluation, timing, accounting, paired stats, checkpoint writing, MLflow logging);
the share of in-process time that is NOT model forward passes (target <= 25 %); and the wall
time of a whole `mlflow run . --env-manager local` of the default trial once the base model is
cached (target <= 20 s). Runs in a temporary directory; the base-model cache is the user's
(WAVESWEEP_CACHE), so the first run also trains and caches the base model.

    python bench/bench_trial.py [--model resnet18] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORWARD_PHASES = ("eval_base", "eval", "timing")  # phases that are model forward passes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import wavesweep.runner"], env=env, check=True)
        t_imports = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        t_bare = time.perf_counter() - t0
        print(f"process start + imports: {t_imports:6.2f} s (bare interpreter {t_bare:.2f} s)")

        from wavesweep.config import TrialConfig
        from wavesweep.runner import run_tracked_trial

        cfg = TrialConfig(model=args.model)
        run_tracked_trial(cfg)  # warm: trains/caches the base model and the base evaluation
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            result, _ = run_tracked_trial(cfg)
            total = time.perf_counter() - t0
            ph = result.phase_seconds
            forward = sum(ph.get(k, 0.0) for k in FORWARD_PHASES)
            print(f"\nin-process trial #{rep + 1}: {total:6.2f} s")
            for k, v in sorted(ph.items(), key=lambda kv: -kv[1]):
                print(f"  {k:<18} {v:7.3f} s  {'(forward passes)' if k in FORWARD_PHASES else ''}")
            other = total - forward
            share = other / total
            print(f"  {'(unaccounted)':<18} {total - sum(ph.values()):7.3f} s  (run creation, param logging, status)")
            print(f"  not forward passes: {other:.2f} s = {100 * share:.1f} % of in-process time "
                  f"(target <= 25 %: {'PASS' if share <= 0.25 else 'FAIL'})")  # fmt: skip

        cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-P", f"model={args.model}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-2000:])
        print(f"\nmlflow run (default trial, cached base): {wall:6.2f} s (target <= 20 s: {'PASS' if wall <= 20 else 'FAIL'})")


if __name__ == "__main__":
    main()
