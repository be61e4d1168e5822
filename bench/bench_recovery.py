"""Recovery costs: BatchNorm re-estimation as a share of a default trial, and fine-tuning speed
of dwt (wavelet domain, W = IDWT(c * m)) against magnitude (masked weights) on the same model
and batches.

Prints, for each device (CPU, and CUDA when present):
- the default trial (ResNet-18 on digits, recovery=bn) in process, its phases, and
  ``recovery`` seconds / trial seconds (target <= 10 %);
- fine-tuning steps per second for dwt and magnitude on the same base model, the same
  training batches and the same optimizer (target: dwt >= 0.5x magnitude's speed);
- BatchNorm re-estimation of one model (the default trial's dwt model, 50 training batches) with
  one forward pass per batch (PyTorch's own update) against the grouped passes the product runs
  on an accelerator (``recovery.reestimate_bn(group=n)``: each BatchNorm layer folds the group
  into its channels, so every batch is still normalised by its own statistics), with how far
  their statistics differ and how many operators each dispatches (each is a kernel launch on a
  GPU: a device-independent count). On the 2-core CPU grouping is 0.8-1.2x (compute-bound, so
  the product's CPU default stays one pass per batch); on a GPU the batches of 64 are
  launch-bound, which the grouping is for. On an accelerator the trial's share is printed for
  the product's default and for one pass per batch.
- BatchNorm re-estimation of ResNet-18 on an imagefolder of generated 224 px JPEGs (its training
  transform: flip, resize 256, center crop 224), the batches decoded in the main process (the old
  ``training_batches``) against the product's decoding workers, with their start-up and with them
  kept (a trial's first method and its other two), and each without the model (decoding alone);
  run with ``--file`` (beside the rest) or ``--file-only``; ``--file-batches``/``--file-batch-size``
  (default 50 x 64, on CPU 8 x 16). ``bash bench/gpu_checks.sh filedata`` runs it on a GPU.
  Measured on the 2-core CPU (shared, load average about 5; 8 batches of 16, 2 workers, median of
  3): re-estimation 20.58 s in the main process against 13.43 s with workers started (1.53x) and
  13.57 s with them kept (1.52x); decoding alone 7.28 s against 0.35 s / 0.25 s. Most of the old
  path's cost here is the main process's small tensor ops (ToTensor, Normalize) contending for
  torch's 2 threads on a loaded machine: the same decoding at 1 thread took 0.15 s (875 img/s,
  workers 518 img/s: the batches cross between processes). On a many-core GPU host the workers
  decode in parallel beside the forward passes; not measured here (no GPU in that session).
No timed assertions: figures only, each beside its reference measured in the same run.

    python bench/bench_recovery.py [--steps 20] [--repeats 3] [--device cpu]
    python bench/bench_recovery.py --file-only --device cpu [--file-batches 8 --file-batch-size 16]
    python bench/bench_recovery.py --share-only --bn-batches "" --workloads cnn:fashion-mnist:0,resnet18:fashion-mnist:0

``--workloads`` adds the share of other trials (recovery=bn, default batches): the re-estimation
cost is fixed, so its share falls as the evaluation set grows (digits: 360 examples; Fashion-MNIST:
10,000; ImageNet: 50,000).
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

from wavesweep import evaluate, pruning, recovery, train, trial  # noqa: E402
from wavesweep.config import TrialConfig  # noqa: E402
from wavesweep.data import load_dataset  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def _tracked_trial(cfg: TrialConfig) -> tuple[float, float]:
    """The default trial as ``mlflow run .`` / ``wavesweep trial`` runs it (MLflow records and the
    compressed checkpoint included) in a fresh store; returns (trial seconds, recovery seconds)."""
    import os
    import tempfile

    from wavesweep import tracking
    from wavesweep.tracked_trial import run_tracked_trial

    with tempfile.TemporaryDirectory() as tmp:
        old, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            tracking.set_tracking_uri()
            t0 = time.perf_counter()
            r, _ = run_tracked_trial(cfg, experiment="bench")
            return time.perf_counter() - t0, r.phase_seconds.get("recovery", 0.0)
        finally:
            os.chdir(old)
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri


def bench_trial_share(device: str, repeats: int, batch_counts: list[int]) -> None:
    """BatchNorm re-estimation as a share of the default trial, in process (no MLflow) and as
    ``mlflow run .`` runs it (tracked), for the default ``recovery_batches`` and the others given."""
    default = TrialConfig(device=device)
    base = train.get_base_model(default.model, default.dataset, seed=default.seed, device=device, progress=False)
    trial.run_trial(default, base=base)  # warm-up: caches, lazy imports
    try:
        import mlflow  # noqa: F401
    except ImportError:  # a GPU box without MLflow: the in-process trial only
        print("  (MLflow is not installed here: the tracked trial is skipped)")
        tracked = False
    else:
        tracked = True
        _tracked_trial(default)
    print(f"  default trial: {default.model} on {default.dataset}, recovery={default.recovery}, batches of "
          f"{default.recovery_batch_size}, 3 methods, {repeats} repeats (median [min-max]); target <= 10 %")
    grouped = recovery.groups_by_default(device)
    print(f"  re-estimation here: {'grouped training batches (recovery.bn_group)' if grouped else 'one forward pass per batch'}")
    for n in sorted(set(batch_counts) | {default.recovery_batches}):
        cfg = TrialConfig(device=device, recovery_batches=n)
        rows: dict[str, list] = {"in process": [], **({"tracked": []} if tracked else {})}
        if grouped:  # the reference: PyTorch's one forward pass per batch, in the same run
            rows["in process, 1 batch per pass"] = []
        if n == default.recovery_batches:  # the reference: all n batches, passes over the split repeated (before 8a0dfad)
            rows["in process, all n batches"] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = trial.run_trial(cfg, base=base)
            rows["in process"].append((time.perf_counter() - t0, r.phase_seconds.get("recovery", 0.0)))
            if tracked:
                rows["tracked"].append(_tracked_trial(cfg))
            if grouped:
                with _one_pass_per_batch():
                    t0 = time.perf_counter()
                    r1 = trial.run_trial(cfg, base=base)
                rows["in process, 1 batch per pass"].append((time.perf_counter() - t0, r1.phase_seconds.get("recovery", 0.0)))
            if "in process, all n batches" in rows:
                with _all_batches():
                    t0 = time.perf_counter()
                    r2 = trial.run_trial(cfg, base=base)
                rows["in process, all n batches"].append((time.perf_counter() - t0, r2.phase_seconds.get("recovery", 0.0)))
        mark = " (default)" if n == default.recovery_batches else ""
        used = r.outcomes["dwt"].recovery.bn_batches  # one pass over the training split at most (recovery.epoch_batches)
        for kind, vals in rows.items():
            shares = [rec / tot for tot, rec in vals]
            ran = n if kind == "in process, all n batches" else used
            print(f"    {n:3d} batches{mark:10s} ({ran} run) {kind:28s}: trial {statistics.median(v[0] for v in vals):6.2f} s, "
                  f"re-estimation {statistics.median(v[1] for v in vals):5.2f} s = {100 * statistics.median(shares):5.1f} % "
                  f"[{100 * min(shares):.1f}-{100 * max(shares):.1f}] {_verdict(statistics.median(shares) <= 0.10)}")  # fmt: skip
    phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.phase_seconds.items(), key=lambda kv: -kv[1]))
    print(f"  phases of the last in-process run (s): {phases}")


def bench_workload_share(device: str, repeats: int, spec: str) -> None:
    """The BatchNorm share of one other in-process trial, ``MODEL:DATASET[:EVAL_LIMIT]`` (0 = the
    whole evaluation split), recovery=bn at the default batch count: the share falls as the
    evaluation grows, since re-estimation's cost is fixed (3 methods x batches x batch size
    training examples) and evaluation's is 4 models x the evaluated examples."""
    model, dataset, *rest = spec.split(":")
    cfg = TrialConfig(model=model, dataset=dataset, eval_limit=int(rest[0]) if rest else 0, device=device)
    base = train.get_base_model(cfg.model, cfg.dataset, seed=cfg.seed, device=device, progress=False)
    r = trial.run_trial(cfg, base=base)  # warm-up
    vals = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = trial.run_trial(cfg, base=base)
        vals.append((time.perf_counter() - t0, r.phase_seconds.get("recovery", 0.0)))
    shares = [rec / tot for tot, rec in vals]
    used = r.outcomes["dwt"].recovery.bn_batches  # one pass over the training split at most (recovery.epoch_batches)
    n_eval, n_bn = r.eval_info["n_eval"], 3 * used * cfg.recovery_batch_size
    print(f"  {model} on {dataset}, {n_eval} examples evaluated x 4 models, {n_bn} re-estimation examples "
          f"(3 x {used} x {cfg.recovery_batch_size}): trial {statistics.median(v[0] for v in vals):6.2f} s, "
          f"re-estimation {statistics.median(v[1] for v in vals):5.2f} s = {100 * statistics.median(shares):5.1f} % "
          f"[{100 * min(shares):.1f}-{100 * max(shares):.1f}] (target <= 10 %: {_verdict(statistics.median(shares) <= 0.10)})")  # fmt: skip


def _all_batches():
    """Within the block, re-estimation takes every batch asked, more than one pass over the
    training split where it is smaller (the product before 8a0dfad): the reference the one-pass
    cap (``recovery.epoch_batches``) is timed against."""
    from unittest import mock

    return mock.patch.object(recovery, "epoch_batches", lambda size, batch_size: 1 << 62)


def _one_pass_per_batch():
    """Within the block, the product's re-estimation runs one forward pass per batch on every
    device: the reference the grouped default is timed against."""
    from unittest import mock

    return mock.patch.object(recovery, "groups_by_default", lambda device: False)


def _dispatched_ops(fn) -> int:
    """How many ATen operators other than views ``fn()`` dispatches (about a kernel launch each on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def bench_grouped_bn(device: str, repeats: int, groups: list[int]) -> None:
    """The product's re-estimation with one forward pass per batch (``group=1``) against grouped
    passes (``group=n``; the accelerator default is ``recovery.bn_group``), on the default
    trial's dwt model (its wavelet, level, percentile, layout and mode, in the memory format a
    trial computes in on ``device``) and 50 training batches; how far their statistics are
    apart; and the operators each dispatches."""
    import copy

    dev = torch.device(device)
    cfg = TrialConfig()
    base = train.get_base_model(cfg.model, cfg.dataset, seed=cfg.seed, device=device, progress=False)
    base.model.to(dev)
    evaluate.compute_layout(base.model, dev)  # channels-last on a CPU, as run_trial puts it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pruning.prune_dwt(base.model, wavelet=cfg.wavelet, level=cfg.level, percentile=cfg.percentile,
                                  layout=cfg.layout, mode=cfg.mode).model.to(dev)
    bundle = load_dataset("digits", seed=0)
    batches = list(recovery.training_batches(bundle.train, batch_size=64, n=50, seed=0, device=dev))
    passes: list[int] = []
    hook = model.register_forward_pre_hook(lambda mod, args: passes.append(args[0].shape[0] // 64))
    recovery.reestimate_bn(copy.deepcopy(model), iter(batches), device=dev)  # the product's default here
    hook.remove()
    default = max(passes)

    def timed(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    ref = copy.deepcopy(model)
    t_ref = timed(lambda: recovery.reestimate_bn(ref, iter(batches), device=dev, group=1))
    ops_ref = _dispatched_ops(lambda: recovery.reestimate_bn(copy.deepcopy(model), iter(batches), device=dev, group=1))
    print(f"  BatchNorm re-estimation of one model, 50 batches of 64; the product's default here: "
          f"{'one pass per batch' if default == 1 else 'batches per pass ' + '+'.join(map(str, passes))}")
    print(f"    {'1 batch per forward pass':28s}: {t_ref * 1e3:.0f} ms, {ops_ref} operators dispatched (views aside): PyTorch's own update")
    runs = [(f"{n:2d} batches per forward pass", n) for n in sorted(set(groups))]
    if default > 1:
        runs.append((f"the default ({'+'.join(map(str, passes))})", None))
    for label, n in runs:
        cand = copy.deepcopy(model)
        t = timed(lambda: recovery.reestimate_bn(cand, iter(batches), device=dev, group=n))
        ops = _dispatched_ops(lambda: recovery.reestimate_bn(copy.deepcopy(model), iter(batches), device=dev, group=n))
        diff = max(
            max(float((a.running_mean - b.running_mean).abs().max()), float(((a.running_var - b.running_var).abs() / b.running_var.clamp_min(1e-12)).max()))
            for a, b in zip(recovery.batchnorm_layers(cand), recovery.batchnorm_layers(ref))
        )  # fmt: skip
        print(f"    {label:28s}: {t * 1e3:.0f} ms = {t_ref / t:.2f}x; {ops} operators "
              f"({ops_ref / ops:.1f}x fewer); statistics differ by at most {diff:.1e} (absolute for means, "
              f"relative for variances)")  # fmt: skip


def bench_finetune_speed(device: str, steps: int, repeats: int, model: str, layout: str) -> None:
    dev = torch.device(device)
    base = train.get_base_model(model, "digits", seed=0, device=device, progress=False)
    base.model.to(dev)
    layout_name = evaluate.compute_layout(base.model, dev)  # the memory format a trial computes in there
    bundle = load_dataset("digits", seed=0)
    settings = recovery.RecoverySettings("finetune", steps=steps, batch_size=64)
    # on the device, as a trial's fine-tuning gets them (recovery.recover): from pageable host
    # memory each step's copy may wait for the stream (CUDA stages it), a wait no trial makes
    batches = list(recovery.training_batches(bundle.train, batch_size=64, n=steps + 2, seed=1, device=dev))
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
    print(f"  fine-tuning {model} on digits ({layout_name}), {steps} steps of 64, AdamW, layout {layout}: "
          f"dwt (wavelet domain) {d:.2f} steps/s [{min(speeds['dwt']):.2f}-{max(speeds['dwt']):.2f}], "
          f"magnitude (masked) {m:.2f} steps/s [{min(speeds['magnitude']):.2f}-{max(speeds['magnitude']):.2f}]: "
          f"dwt at {d / m:.2f}x of magnitude's speed (target >= 0.5x: {_verdict(d / m >= 0.5)})")  # fmt: skip


def _main_process_batches(dataset, batch_size: int, n: int, seed: int):
    """The old ``recovery.training_batches`` of a file dataset, as it was: the same index stream,
    every image decoded in the main process (one DataLoader without workers per call), random
    transforms drawn from the global generator (``recover`` seeded it)."""
    from torch.utils.data import DataLoader

    size = len(dataset)
    bs = min(batch_size, size)
    gen = torch.Generator().manual_seed(seed)
    order: list[list[int]] = []
    while len(order) < n:
        perm = torch.randperm(size, generator=gen)
        order += [perm[i : i + bs].tolist() for i in range(0, size - bs + 1, bs)]
    for x, y in DataLoader(dataset, batch_sampler=order[:n], num_workers=0):
        yield x, torch.as_tensor(y)


def bench_file_reestimation(device: str, repeats: int, batches: int, batch_size: int, images: int,
                            workers: int | None) -> None:
    """One BatchNorm re-estimation of ResNet-18 on an imagefolder of 224 px JPEGs (flip, resize
    256, center crop 224): batches decoded in the main process (the old path) against the worker
    path (``recovery.training_batches``: ``data.default_num_workers()`` workers unless
    ``workers``, kept on the dataset), the latter with its workers' start-up (a trial's first
    method) and with them already running (its second and third). Each also without the model
    (decoding alone: what an accelerator, whose forward pass is short, waits on). Median of
    ``repeats``, old and new alternately."""
    import copy
    import tempfile

    from bench_eval import make_jpegs

    from wavesweep import data
    from wavesweep.models import build_model

    dev = torch.device(device)
    n_workers = data.default_num_workers() if workers is None else workers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root / "train", images)
        make_jpegs(root / "val", 4)
        ds = load_dataset("imagefolder", root=root).train
        torch.manual_seed(0)
        model = build_model("resnet18", num_classes=4, in_channels=3, image_size=224).eval().to(dev)
        kw = dict(batch_size=batch_size, n=batches, seed=0)

        def old():
            torch.manual_seed(0)  # as recover() seeded the flips
            return _main_process_batches(ds, batch_size, batches, 0)

        def new():
            return recovery.training_batches(ds, num_workers=workers, device=dev, **kw)

        def run(make, with_model: bool, cold: bool = False, threads: int | None = None) -> float:
            if cold:
                data.close_loaders(ds)
            m = copy.deepcopy(model) if with_model else None
            n_threads = torch.get_num_threads()
            if threads is not None:
                torch.set_num_threads(threads)
            _sync(dev)
            t0 = time.perf_counter()
            if m is not None:
                recovery.reestimate_bn(m, make(), device=dev)
            else:
                for x, _ in make():
                    x.to(dev, non_blocking=True)
            _sync(dev)
            torch.set_num_threads(n_threads)
            return time.perf_counter() - t0

        try:
            run(new, True)  # warm-up: allocator, lazy imports, page cache of the files
            n_img = batches * batch_size
            print(f"  BatchNorm re-estimation of ResNet-18 on {images} generated 224 px JPEGs (imagefolder's training "
                  f"transform): {batches} batches of {batch_size}; {n_workers} decoding workers; median of {repeats}")  # fmt: skip
            for with_model in (False, True):
                t = {"main process (old)": [], "workers, started": [], "workers, kept": []}
                if not with_model:  # what decoding itself costs there, without contention for torch's threads
                    t["main process, 1 thread"] = []
                for _ in range(repeats):
                    t["main process (old)"].append(run(old, with_model))
                    if not with_model:
                        t["main process, 1 thread"].append(run(old, False, threads=1))
                    t["workers, started"].append(run(new, with_model, cold=True))
                    t["workers, kept"].append(run(new, with_model))
                ref = statistics.median(t["main process (old)"])
                label = "re-estimation" if with_model else "decoding alone"
                for k, v in t.items():
                    med = statistics.median(v)
                    print(f"    {label:15s} {k:22s}: {med:6.2f} s [{min(v):.2f}-{max(v):.2f}], {n_img / med:6.1f} img/s, "
                          f"{ref / med:.2f}x the main process")  # fmt: skip
        finally:
            data.close_loaders(ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="one device (default: cpu, and cuda when present)")
    ap.add_argument("--bn-batches", default="50", help="comma-separated recovery_batches to time beside the default")
    ap.add_argument("--share-only", action="store_true", help="only the BatchNorm share of the default trial")
    ap.add_argument("--workloads", default="", help="comma-separated MODEL:DATASET[:EVAL_LIMIT] trials whose "
                    "BatchNorm share to print beside the default's, e.g. cnn:fashion-mnist:0 (0 = whole split)")
    ap.add_argument("--skip-trial-share", action="store_true", help="only the fine-tuning speed figures")
    ap.add_argument("--file", action="store_true", help="also the imagefolder re-estimation (--file-only: it alone)")
    ap.add_argument("--file-only", action="store_true", help="only the imagefolder re-estimation (main process "
                    "against decoding workers)")
    ap.add_argument("--file-batches", type=int, default=None, help="its batches (default 50; 8 on CPU)")
    ap.add_argument("--file-batch-size", type=int, default=None, help="its batch size (default 64; 16 on CPU)")
    ap.add_argument("--file-images", type=int, default=256, help="JPEGs in its generated training folder")
    ap.add_argument("--file-workers", type=int, default=None, help="decoding workers (default: data.default_num_workers())")
    ap.add_argument("--grouped", default="4,16,50", help="batches per forward pass of grouped re-estimation "
                    "to time against one pass per batch ('' to skip)")
    args = ap.parse_args()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
        print(f"{device} ({name}), torch {torch.__version__}")
        cpu = device == "cpu"
        if args.file or args.file_only:
            bench_file_reestimation(device, args.repeats, args.file_batches or (8 if cpu else 50),
                                    args.file_batch_size or (16 if cpu else 64), args.file_images, args.file_workers)
        if args.file_only:
            continue
        if not args.skip_trial_share:
            bench_trial_share(device, args.repeats, [int(v) for v in args.bn_batches.split(",") if v])
            for spec in filter(None, args.workloads.split(",")):
                bench_workload_share(device, args.repeats, spec)
            if args.grouped:
                bench_grouped_bn(device, args.repeats, [int(v) for v in args.grouped.split(",")])
        for layout in () if args.share_only else ("filter", "kernel"):
            bench_finetune_speed(device, args.steps, args.repeats, "resnet18", layout)
    if not torch.cuda.is_available() and not args.device:
        print("cuda: not available here; the CUDA figures are still to be measured")


if __name__ == "__main__":
    main()
