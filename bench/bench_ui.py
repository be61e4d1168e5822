"""Benchmark of ``wavesweep ui``: seconds from the command to the server's first answer.

    python bench/bench_ui.py [--repeats 5] [--keep DIR]

A fresh MLflow store (SQLite, in a temporary directory) with one recorded run; then, in rounds
(the variants' order rotates each round, so load from other processes spreads over all of them):

* ``wavesweep ui`` (one process serving MLflow's app, one worker, no job executor);
* ``mlflow ui --backend-store-uri URI`` as MLflow starts it by default (the reference: 4 uvicorn
  workers and the job executor);
* ``mlflow ui ... --workers 1`` with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (what
  ``wavesweep ui`` ran before: MLflow's own command with the same settings).

Per start: ``health`` (first HTTP 200 on /health), ``api`` (the experiments API lists the run's
experiment, asked right after), and for ``wavesweep ui`` ``url`` (it printed its URL). Figures:
median and spread (min-max) of each, in seconds, then every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 180.0
RECORD_RUN = """
from wavesweep import tracking
client, exp = tracking.init_tracking()
run = client.create_run(exp, run_name="bench run").info.run_id
tracking.log_batch(client, run, params={"method": "dwt", "wavelet": "haar"}, metrics={"top1": 0.9, "compression_ratio": 4.0},
                   tags={"method": "dwt"})
client.set_terminated(run)
"""


def env_for(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def variants(uri: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """{name: (command with PORT, extra environment)}."""
    mlflow = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", "PORT"]
    return {
        "wavesweep ui": ([sys.executable, "-m", "wavesweep", "ui", "--port", "PORT"], {}),
        "mlflow ui (defaults)": (mlflow, {}),
        "mlflow ui --workers 1, no job executor": (mlflow + ["--workers", "1"], {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
    }


def _get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read() if r.status == 200 else None
    except OSError:
        return None


def start_once(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Start ``cmd``, time its first answers, stop it (its whole process group)."""
    port = free_port()
    cmd = [str(port) if c == "PORT" else c for c in cmd]
    url = f"http://127.0.0.1:{port}"
    out: dict[str, float] = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip

    def read() -> None:  # drain the output (a full pipe would stall the server); note the URL line
        for line in proc.stdout:
            if line.startswith("MLflow UI: ") and "url" not in out:
                out["url"] = time.monotonic() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while _get(f"{url}/health", timeout=1.0) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} before answering")
            if time.monotonic() - t0 > LIMIT_S:
                raise RuntimeError(f"{' '.join(cmd)}: no answer within {LIMIT_S:.0f} s")
            time.sleep(0.05)
        out["health"] = time.monotonic() - t0
        while True:
            body = _get(f"{url}/ajax-api/2.0/mlflow/experiments/search?max_results=50", timeout=30)
            if body and any(e["name"] == "wavesweep" for e in json.loads(body).get("experiments", [])):
                out["api"] = time.monotonic() - t0
                break
            time.sleep(0.05)
        if "url" not in out:  # the line comes right after the answer: give the reader a moment
            deadline = time.monotonic() + 2
            while "url" not in out and time.monotonic() < deadline and "wavesweep" in cmd:
                time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="starts of each variant (default 5)")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = env_for(work)
        subprocess.run([sys.executable, "-c", RECORD_RUN], cwd=work, env=env, check=True, capture_output=True)
        runs = variants(env["MLFLOW_TRACKING_URI"])
        names = list(runs)
        results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        print(f"store {env['MLFLOW_TRACKING_URI']} (one run); {args.repeats} rounds; {os.cpu_count()} CPUs; "
              f"load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                cmd, extra = runs[name]
                res = start_once(cmd, {**env, **extra}, work)
                results[name].append(res)
                shown = "  ".join(f"{k} {res[k]:5.2f}" for k in ("health", "api", "url") if k in res)
                print(f"round {r + 1} {name:<40} {shown}   (load {os.getloadavg()[0]:.2f})", flush=True)
        print(f"\nseconds from the command to the first answer: median [min-max] of {args.repeats}")
        print(f"{'':<40} {'health':>20} {'api (experiments)':>20} {'url printed':>20}")
        for name in names:
            cells = []
            for key in ("health", "api", "url"):
                xs = [res[key] for res in results[name] if key in res]
                cells.append(f"{statistics.median(xs):6.2f} [{min(xs):5.2f}-{max(xs):5.2f}]" if xs else "-")
            print(f"{name:<40} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20}")
        ref = statistics.median(res["health"] for res in results[names[1]])
        ours = statistics.median(res["health"] for res in results[names[0]])
        print(f"\nwavesweep ui answers {ref / ours:.1f}x sooner than mlflow ui with its defaults (medians)")


if __name__ == "__main__":
    main()
