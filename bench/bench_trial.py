"""Where one trial's time goes, on the embedded default (ResNet-18 on digits).

Prints: process start + imports; in-process phases (MLflow setup, base-model load, data, base
evaluation, pruning, evaluation, timing, accounting, paired stats, checkpoint writing, MLflow
logging); the time spent inside model forward passes, measured directly (global module hooks
around every top-level ``model(x)`` call, so batching, metrics and data movement in the
evaluation phases count as overhead, not as forward passes), also per phase (on CUDA each phase
waits for the device at its start and end, so queued work is timed where it was queued), and how
long random pruning waited for its keys (drawn on a thread); the share of in-process time that
is NOT forward passes (target <= 25 %); and the wall time of a whole
`mlflow run . --env-manager local` of the default trial once the base model is cached (target
<= 20 s), beside its floor measured in the same run: starting the mlflow CLI, starting a
process that imports everything a trial process imports, and the in-process trial. Runs in a temporary directory; the base-model
cache is the user's (WAVESWEEP_CACHE), so the first run also trains and caches the base model.

    python bench/bench_trial.py [--model resnet18] [--repeats 3]
    python bench/bench_trial.py --untracked [--device cuda]   # no MLflow: wavesweep.trial.run_trial only

``--untracked`` times ``wavesweep.trial.run_trial`` (the trial without MLflow: what a machine
without MLflow installed can run, e.g. a GPU box) and skips the `mlflow run` part.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout under test, installed or not
EVAL_PHASES = ("eval_base", "eval", "timing")  # phases whose work is mostly forward passes
OVERLAPPED: tuple[str, ...] = ()  # phases run in a thread beside others (none since the checkpoint is written before logging)
# what a trial process imports once its scikit-learn arrays are cached (wavesweep.splits): no
# scikit-learn (tests/test_splits.py checks a trial process does not import it)
TRIAL_IMPORTS = "import wavesweep.cli, wavesweep.tracked_trial, torchvision, mlflow.store.tracking.sqlalchemy_store"


class ForwardClock:
    """Seconds spent inside top-level ``nn.Module.__call__``s (a forward nested in another is not
    counted twice), via torch's global forward pre-/post-hooks. CUDA work is synchronised at
    the start of each top-level call, so work queued before it (pruning, copies) is not counted
    as the forward pass's, and at its end, so its own time lands inside the call."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.seconds = 0.0
        self.calls = 0
        self.by_phase: dict[str, float] = {}  # forward seconds inside each trial phase (phase_clock)
        self.phase = "(outside the timed phases)"
        self.keys_wait = 0.0  # seconds random pruning waited for its keys (phase_clock)
        self._depth = 0
        self._t0 = 0.0
        self._handles = []

    def _sync(self) -> None:
        if self.torch.cuda.is_initialized():
            self.torch.cuda.synchronize()

    def _pre(self, module, args):
        if self._depth == 0:
            self._sync()
            self._t0 = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self._sync()
            dt = time.perf_counter() - self._t0
            self.seconds += dt
            self.by_phase[self.phase] = self.by_phase.get(self.phase, 0.0) + dt
            self.calls += 1

    def __enter__(self):
        from torch.nn.modules import module as M

        self._handles = [M.register_module_forward_pre_hook(self._pre), M.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def phase_clock(clock: ForwardClock):
    """While open, the trial's phase timer (``trial._Phases``) tells ``clock`` which phase a
    forward pass runs in, and on CUDA waits for the device at the start and end of every phase, so
    work queued in one phase (pruning's kernels, copies) is timed in it, not in the next that
    waits for the device. The syncs add a few each trial; without them the phases' split is a guess."""
    from wavesweep import baselines, trial

    real = trial._Phases.__call__
    real_take = baselines.RandomKeys.take

    def take(self, *args, **kwargs):  # how long random pruning waits for its keys (drawn on a thread)
        t0 = time.perf_counter()
        self._thread.join()
        clock.keys_wait += time.perf_counter() - t0
        return real_take(self, *args, **kwargs)

    @contextlib.contextmanager
    def timed(self, name):
        outer = clock.phase
        clock._sync()
        clock.phase = name
        try:
            with real(self, name):
                try:
                    yield
                finally:
                    clock._sync()
        finally:
            clock.phase = outer

    trial._Phases.__call__ = timed
    baselines.RandomKeys.take = take
    try:
        yield
    finally:
        trial._Phases.__call__ = real
        baselines.RandomKeys.take = real_take


def _report(rep: int, total: float, phases: dict[str, float], clock: ForwardClock, overlapped: tuple[str, ...]) -> float:
    """Print one in-process trial's phases (the forward passes inside each, where
    :func:`phase_clock` told the clock) and forward-pass time; returns its non-forward share."""
    print(f"\nin-process trial #{rep + 1}: {total:6.2f} s")
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        fwd = clock.by_phase.get(k)
        inside = f"   forward {fwd:6.3f} s, other {v - fwd:6.3f} s" if fwd is not None else ""
        print(f"  {k:<18} {v:7.3f} s{inside}{'  (in a thread, beside mlflow_logging)' if k in overlapped else ''}")
    sequential = sum(v for k, v in phases.items() if k not in overlapped)
    print(f"  {'(unaccounted)':<18} {total - sequential:7.3f} s  (outside the timed phases)")
    in_eval = sum(phases.get(k, 0.0) for k in EVAL_PHASES)
    print(f"  forward passes     {clock.seconds:7.3f} s  ({clock.calls} model calls; the evaluation phases took {in_eval:.3f} s)")
    print(f"  random's keys      {clock.keys_wait:7.3f} s  waited for in prune (drawn on a thread since the base model was loaded)")
    share = (total - clock.seconds) / total
    print(f"  not forward passes: {total - clock.seconds:.2f} s = {100 * share:.1f} % of in-process time "
          f"(target <= 25 %: {'PASS' if share <= 0.25 else 'FAIL'})")  # fmt: skip
    return share


def untracked(args: argparse.Namespace) -> None:
    """The default trial through ``wavesweep.trial.run_trial`` (no MLflow), on ``--device``."""
    import torch

    from wavesweep import evaluate
    from wavesweep.config import TrialConfig
    from wavesweep.trial import run_trial

    cfg = TrialConfig(model=args.model, device=args.device)
    device = evaluate.resolve_device(cfg.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"default trial without MLflow ({args.model} on {cfg.dataset}, recovery={cfg.recovery}) on {device} ({name})")
    run_trial(cfg)  # warm: trains/caches the base model, first CUDA kernels
    shares = []
    for rep in range(args.repeats):
        with ForwardClock() as clock, phase_clock(clock):
            t0 = time.perf_counter()
            result = run_trial(cfg)
            total = time.perf_counter() - t0
        shares.append(_report(rep, total, result.phase_seconds, clock, ()))
    print(f"\nnot forward passes, median of {len(shares)}: {100 * statistics.median(shares):.1f} % (target <= 25 %)")


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repeats", type=int, default=3, help="in-process trials")
    ap.add_argument("--runs", type=int, default=3, help="whole `mlflow run`s")
    ap.add_argument("--untracked", action="store_true", help="time wavesweep.trial.run_trial (no MLflow) only")
    ap.add_argument("--device", default="auto", help="TrialConfig.device (auto, cpu, cuda, cuda:N)")
    args = ap.parse_args()
    if args.untracked:
        untracked(args)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        t_bare = _wall([sys.executable, "-c", "pass"], env)
        t_runner = _wall([sys.executable, "-c", "import wavesweep.tracked_trial"], env)
        print(f"process start + imports of wavesweep.tracked_trial: {t_runner:6.2f} s (bare interpreter {t_bare:.2f} s)")

        from wavesweep.config import TrialConfig
        from wavesweep.tracked_trial import run_tracked_trial

        cfg = TrialConfig(model=args.model, device=args.device)
        run_tracked_trial(cfg)  # warm: trains/caches the base model and the base evaluation
        shares, totals = [], []
        for rep in range(args.repeats):
            with ForwardClock() as clock, phase_clock(clock):
                t0 = time.perf_counter()
                result, _ = run_tracked_trial(cfg)
                total = time.perf_counter() - t0
            share = _report(rep, total, result.phase_seconds, clock, OVERLAPPED)
            shares.append(share)
            totals.append(total)

        # The floor of a whole `mlflow run`, measured here (median of 3 each): starting the mlflow
        # CLI, and a process importing everything a trial process imports, some of it lazily:
        # torchvision (the model), MLflow's SQL store (first client call).
        t_cli = sorted(_wall([sys.executable, "-c", "import mlflow.cli"], env) for _ in range(3))[1]
        t_imports = sorted(_wall([sys.executable, "-c", TRIAL_IMPORTS], env) for _ in range(3))[1]
        print(f"\nprocess start + imports of the mlflow CLI:        {t_cli:6.2f} s (median of 3)")
        print(f"process start + every import of a trial process: {t_imports:6.2f} s (median of 3)")
        cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-P", f"model={args.model}",
               "-P", f"device={args.device}"]  # the in-process trials' device, so the floor is of one device
        walls = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if proc.returncode:
                print(proc.stderr[-2000:])
        floor = t_cli + t_imports + min(totals)  # what `mlflow run` cannot avoid: its CLI, the imports, the trial
        print(f"\nnot forward passes, median of {len(shares)}: {100 * statistics.median(shares):.1f} % (target <= 25 %)")
        ok = sum(w <= 20 for w in walls)
        print(f"mlflow run (default trial, cached base): {', '.join(f'{w:.2f}' for w in walls)} s; "
              f"median {statistics.median(walls):.2f} s; {ok} of {len(walls)} within 20 s (target <= 20 s)")  # fmt: skip
        print(f"  floor measured in this run: mlflow CLI start {t_cli:.2f} + trial process imports {t_imports:.2f} "
              f"+ in-process trial {min(totals):.2f} = {floor:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
