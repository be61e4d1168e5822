"""Recovery costs: BatchNorm re-estimation as a share of a default trial, and fine-tuning speed
of dwt (wavelet domain, W = IDWT(c * m)) against magnitude (masked weights) on the same model
and batches.

Prints, for each device (CPU, and CUDA when present):
- the default trial (ResNet-18 on digits, recovery=bn) in process, its phases, and
  ``recovery`` seconds / trial seconds (target <= 10 %);
- fine-tuning steps per second for dwt and magnitude on the same base model, the same
  training batches and the same optimizer (target: dwt >= 0.5x magnitude's speed).
No timed assertions: figures only, each beside its reference measured in the same run.

    python bench/bench_recovery.py [--steps 20] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout under test, installed or not

import torch  # noqa: E402

from wavesweep import pruning, recovery, train, trial  # noqa: E402
from wavesweep.config import TrialConfig  # noqa: E402
from wavesweep.data import load_dataset  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_trial_share(device: str, repeats: int) -> None:
    cfg = TrialConfig(device=device)  # the default trial: recovery=bn
    base = train.get_base_model(cfg.model, cfg.dataset, seed=cfg.seed, device=device, progress=False)
    trial.run_trial(cfg, base=base)  # warm-up: caches, lazy imports
    shares, totals, recs = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = trial.run_trial(cfg, base=base)
        total = time.perf_counter() - t0
        shares.append(r.phase_seconds.get("recovery", 0.0) / total)
        totals.append(total)
        recs.append(r.phase_seconds.get("recovery", 0.0))
    print(f"  default trial ({cfg.model} on {cfg.dataset}, recovery={cfg.recovery}, {cfg.recovery_batches} batches "
          f"of {cfg.recovery_batch_size}, 3 methods): trial {statistics.median(totals):.2f} s "
          f"[{min(totals):.2f}-{max(totals):.2f}], BatchNorm re-estimation {statistics.median(recs):.3f} s "
          f"= {100 * statistics.median(shares):.1f} % of the trial [{100 * min(shares):.1f}-{100 * max(shares):.1f}] "
          f"(target <= 10 %)")  # fmt: skip
    phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.phase_seconds.items(), key=lambda kv: -kv[1]))
    print(f"  phases of the last run (s): {phases}")


def bench_finetune_speed(device: str, steps: int, repeats: int, model: str, layout: str) -> None:
    dev = torch.device(device)
    base = train.get_base_model(model, "digits", seed=0, device=device, progress=False)
    bundle = load_dataset("digits", seed=0)
    settings = recovery.RecoverySettings("finetune", steps=steps, batch_size=64)
    batches = list(recovery.training_batches(bundle.train, batch_size=64, n=steps + 2, seed=1))
    speeds: dict[str, list[float]] = {"dwt": [], "magnitude": []}
    for _ in range(repeats):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dwt = pruning.prune_dwt(base.model, wavelet="bior4.4", level=5, percentile=70, layout=layout)
        results = {"dwt": dwt, "magnitude": pruning.prune_matched(base.model, dwt)["magnitude"]}
        for name, res in results.items():
            # two warm-up steps (first-call costs: filter banks, allocator), then the timed ones
            recovery.finetune(res, iter(batches[:2]), recovery.RecoverySettings("finetune", steps=2), device=dev)
            _sync(dev)
            t0 = time.perf_counter()
            recovery.finetune(res, iter(batches[2:]), settings, device=dev)
            _sync(dev)
            speeds[name].append(steps / (time.perf_counter() - t0))
    d, m = statistics.median(speeds["dwt"]), statistics.median(speeds["magnitude"])
    print(f"  fine-tuning {model} on digits, {steps} steps of 64, AdamW, layout {layout}: "
          f"dwt (wavelet domain) {d:.2f} steps/s [{min(speeds['dwt']):.2f}-{max(speeds['dwt']):.2f}], "
          f"magnitude (masked) {m:.2f} steps/s [{min(speeds['magnitude']):.2f}-{max(speeds['magnitude']):.2f}]: "
          f"dwt at {d / m:.2f}x of magnitude's speed (target >= 0.5x)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="one device (default: cpu, and cuda when present)")
    ap.add_argument("--skip-trial-share", action="store_true", help="only the fine-tuning speed figures")
    args = ap.parse_args()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
        print(f"{device} ({name}), torch {torch.__version__}")
        if not args.skip_trial_share:
            bench_trial_share(device, args.repeats)
        for layout in ("filter", "kernel"):
            bench_finetune_speed(device, args.steps, args.repeats, "resnet18", layout)
    if not torch.cuda.is_available() and not args.device:
        print("cuda: not available here; the CUDA figures are still to be measured")


if __name__ == "__main__":
    main()
