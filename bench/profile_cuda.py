"""Where the time goes on an accelerator (prints torch.profiler tables; not a test, not a target).

Three workloads, each once for warm-up and once under ``torch.profiler`` (CPU and CUDA
activities), the table sorted by self CPU time then by self device time, top ``--rows``:
(1) ``prune_dwt`` of ResNet-50 (random init, 224 px, conv targets; bior4.4 level 5 filter) on the
    device; (2) the default trial without MLflow (ResNet-18 on digits, recovery=bn); (3) 10
    wavelet-domain fine-tuning steps of that ResNet-18 (layout filter). On CUDA each is run once
    more under ``torch.cuda.set_sync_debug_mode("warn")`` and every synchronising call is
    counted by the line of wavesweep that made it.

    python bench/profile_cuda.py [--device cuda] [--rows 20] [--only prune,trial,finetune]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from wavesweep import pruning, recovery, train, trial  # noqa: E402
from wavesweep.config import TrialConfig  # noqa: E402
from wavesweep.data import load_dataset  # noqa: E402
from wavesweep.models import build_model  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def show(name: str, fn, dev: torch.device, rows: int, setup=None) -> None:
    """``fn()`` once for warm-up, then under the profiler; with ``setup``, ``fn(setup())``, its
    argument made before each run and outside the profiler (a copy of the model to prune in place:
    copying ResNet-50 is not pruning's time)."""
    make = (lambda: ()) if setup is None else (lambda: (setup(),))
    fn(*make())  # warm-up
    args = make()
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn(*args)
        _sync(dev)
    del args
    print(f"\n===== {name}: {time.perf_counter() - t0:.3f} s under the profiler")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if dev.type == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=rows // 2, max_name_column_width=60))
        args = make()
        syncs(lambda: fn(*args), dev, rows)


def syncs(fn, dev: torch.device, rows: int) -> None:
    """Every call that synchronises with the device during one more run of ``fn``, by where in
    the code it happens (``torch.cuda.set_sync_debug_mode("warn")`` warns on each: a value read
    back, a blocking copy). Each one leaves the GPU idle until the host queues more work."""
    import collections
    import traceback

    here = str(Path(__file__).resolve().parents[1])
    where: collections.Counter = collections.Counter()
    prev = torch.cuda.get_sync_debug_mode()
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(here) and "/bench/" not in f.filename]
            f = frames[-1] if frames else None
            where[f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else f"{Path(filename).name}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
            warnings.showwarning = original
    print(f"  synchronising calls: {sum(where.values())} (wavesweep's innermost frame, top {rows}; the "
          f"device's own timing of inference synchronises by design)")
    for loc, n in where.most_common(rows):
        print(f"    {n:5d}  {loc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--only", default="prune,trial,finetune")
    args = ap.parse_args()
    dev = torch.device(args.device)
    only = set(args.only.split(","))
    warnings.simplefilter("ignore")
    if "prune" in only:
        torch.manual_seed(0)
        r50 = build_model("resnet50", num_classes=1000, in_channels=3, image_size=224).eval().to(dev)
        show("prune_dwt resnet50 (filter, bior4.4, level 5)", lambda net: pruning.prune_dwt(
            net, wavelet="bior4.4", level=5, percentile=60, layout="filter", inplace=True), dev, args.rows,
            setup=lambda: copy.deepcopy(r50))  # each run's copy made outside the profiler
    if "trial" in only or "finetune" in only:
        cfg = TrialConfig(device=str(dev))
        base = train.get_base_model(cfg.model, cfg.dataset, seed=cfg.seed, device=str(dev), progress=False)
    if "trial" in only:
        show("default trial (resnet18 digits, recovery=bn)", lambda: trial.run_trial(cfg, base=base), dev, args.rows)
    if "finetune" in only:
        bundle = load_dataset("digits", seed=0)
        # on the device, as a trial's fine-tuning gets them: from pageable host memory each step's
        # copy may wait for the stream (CUDA stages it), a wait of the bench's own
        batches = list(recovery.training_batches(bundle.train, batch_size=64, n=10, seed=1, device=dev))
        dwt = pruning.prune_dwt(base.model, wavelet="bior4.4", level=5, percentile=70, layout="filter")
        settings = recovery.RecoverySettings("finetune", steps=10, batch_size=64)
        show("10 fine-tuning steps, dwt filter (wavelet domain)",
             lambda: recovery.finetune(dwt, iter(batches), settings, device=dev), dev, args.rows)


if __name__ == "__main__":
    main()
