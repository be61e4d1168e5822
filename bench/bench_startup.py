"""A trial process's wall time with scikit-learn's arrays kept in the cache (``wavesweep.splits``:
what every process after the first gets) against the same process with them removed (scikit-learn
imported, as every process did before), alternating in one run; beside them, the import of
``sklearn.model_selection`` after torch and MLflow, in a process of its own.

Every process runs the same tracked trial (``wavesweep trial``) on digits with a validation split
(the study default's 0.5), into one MLflow store created before the first, with one base model
trained before the first: only the kept arrays differ.

    python bench/bench_startup.py [--rounds 5] [--model cnn]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SKLEARN_IMPORT = ("import time, torch, mlflow, mlflow.store.tracking.sqlalchemy_store\n"
                  "t = time.perf_counter()\nimport sklearn.model_selection, sklearn.datasets\n"
                  "print(time.perf_counter() - t)\n")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="cnn")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    cache = work / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(WAVESWEEP_CACHE=str(cache), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))  # fmt: skip
    trial = [sys.executable, "-m", "wavesweep", "trial", "-q", "--model", args.model, "--dataset", "digits",
             "--eval-limit", "200", "--val-fraction", "0.5", "--timing-batches", "0", "--recovery", "none"]  # fmt: skip

    def run(argv: list[str]) -> tuple[float, str]:
        t = time.perf_counter()
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"bench_startup: {' '.join(argv[:4])} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        return time.perf_counter() - t, proc.stdout

    print(f"setup: base model and MLflow store ({run(trial)[0]:.1f} s)", flush=True)
    kept, computed, imports = [], [], []
    for i in range(args.rounds):
        for folder in ("splits", "datasets"):
            shutil.rmtree(cache / folder, ignore_errors=True)
        computed.append(run(trial)[0])  # scikit-learn imported, the arrays computed and kept
        kept.append(run(trial)[0])  # the arrays read back
        imports.append(float(run([sys.executable, "-c", SKLEARN_IMPORT])[1].strip().splitlines()[-1]))
        print(f"round {i + 1}: computed {computed[-1]:.2f} s, kept {kept[-1]:.2f} s, sklearn import {imports[-1]:.2f} s", flush=True)
    mc, mk, mi = statistics.median(computed), statistics.median(kept), statistics.median(imports)
    print(f"\nmedian of {args.rounds}, {os.cpu_count()} CPUs, {args.model} on digits:")
    print(f"  trial process, arrays computed (scikit-learn imported): {mc:.2f} s")
    saved = statistics.median(c - k for c, k in zip(computed, kept))  # paired: the two runs of a round
    print(f"  trial process, arrays kept (no scikit-learn):           {mk:.2f} s  ({mk / mc:.2f}x the time)")
    print(f"  saved, median over rounds of computed - kept:           {saved:+.2f} s")
    print(f"  import of sklearn.model_selection + datasets alone:     {mi:.2f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
