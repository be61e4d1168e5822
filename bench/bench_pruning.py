"""Benchmark: pruning all conv layers of a torchvision ResNet-18 (random init, no data).

Prints the time of dwt (every layout, level 5, bior4.4), magnitude (layer, global) and
random (layer, global), next to ``torch.nn.utils.prune.l1_unstructured`` (per layer),
``random_unstructured`` (per layer) and ``global_unstructured`` measured in the same run,
and the ratios against the targets:

* magnitude and random at least 4x faster than the torch reference;
* dwt in the ``filter`` layout faster than the torch per-layer reference.

Timing protocol: the median of ``--repeats`` runs after one warm-up. Every timed call starts
from a fresh deep copy of the base model made *outside* the timing: the torch reference
prunes that copy in place, and so does ``inplace=True`` here (like for like). The default
``inplace=False`` (which adds a deep copy of the model) is printed too.

    python bench/bench_pruning.py [--repeats 5] [--amount 0.6] [--threads 2]

``--big`` adds a second section (``--only-big``: that section alone): dwt pruning against
``torch.nn.utils.prune.l1_unstructured`` on the same target layers of two bigger models from
wavesweep's registry (random init, 1000 classes, 224 px): ResNet-50 in its convs and
ViT-B/16 in its Linear layers, on CPU and on CUDA when available (the model moved there).
Per device it times ``l1_unstructured`` on every target layer and ``wavesweep.pruning.prune_dwt``
with ``backend="numpy"`` (PyWavelets: each weight goes to the host and back) and
``backend="torch"`` (:mod:`wavesweep.wavelets_torch` on the weights' device, what
``backend="auto"`` picks on a GPU; its record of coefficients and masks stays on the device,
and the next line adds the record's copy to the host that a tracked trial's checkpoint makes;
the line after times the other choice of stacking layers
of one shape into one transform: stacked on the CPU, one layer a call on a GPU, the opposite of
each device's default, ``wavesweep.pruning.STACK_ON_CPU``); on the CPU one more line runs
the paths an accelerator takes (dense products, the sort, stacking) there, whose operators
are what a GPU launches (ResNet-50: 1985 before the gather reorders and the one-copy
writes of 2026-11-27 evening, 1243 after, 1223 at eda63b4; ViT-B/16: 775 and 544). Same protocol (fresh copy outside the
clock, one warm-up, median of ``--big-repeats``), the device synchronised before the clock
stops. dwt settings: bior4.4, level 5, ``--big-layout`` (filter), periodization. Beside each
time, the aten operators the method dispatched in one more, untimed run (views included; on a GPU
each is a kernel launch or host work, what a launch-bound pruning waits on; PyWavelets' own work
is not counted).

    python bench/bench_pruning.py --only-big [--big-repeats 3] [--big-layout filter] [--big-devices cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from unittest import mock

import sys
from pathlib import Path

import torch
import torch.nn.utils.prune as tprune
import torchvision

# the checkout this file is in, before any installed wavesweep (another checkout's editable install)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavesweep import pruning as P  # noqa: E402
from wavesweep import wavelets as wv  # noqa: E402
from wavesweep.models import build_model  # noqa: E402

#: (registry name, pruning targets) of the bigger models of the --big section
BIG_MODELS = (("resnet50", "conv"), ("vit_b_16", "linear"))


def timed(fn, base, repeats):
    """Median seconds of ``fn(model_copy)``, the copy made outside the clock."""
    fn(copy.deepcopy(base))  # warm-up
    times = []
    for _ in range(repeats):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        fn(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_on(fn, base, repeats, dev: torch.device) -> float:
    """Median seconds of ``fn(model_copy)`` with the copy on ``dev`` made outside the clock,
    and the device synchronised before the clock starts and stops."""
    def once() -> float:
        m = copy.deepcopy(base).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn(m)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def ops_on(fn, base, dev: torch.device) -> int:
    """The aten operators ``fn(model_copy)`` dispatches on ``dev`` (views included), counted in one
    untimed run: on a GPU each is a launch or host work, which is what a launch-bound pruning waits on
    (PyWavelets' work on the host is not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    m = copy.deepcopy(base).to(dev)
    with Count():
        fn(m)
    return Count.n


def big_models(args) -> None:
    """dwt (and magnitude, both selection paths) vs l1_unstructured on ResNet-50 (conv) and
    ViT-B/16 (linear), CPU and CUDA."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if args.big_devices:
        devices = [torch.device(d) for d in args.big_devices.split(",")]
    a, r, layout = args.amount, args.big_repeats, args.big_layout
    dwt_kw = dict(wavelet="bior4.4", level=5, layout=layout, mode="periodization")
    print(f"\n--- bigger models: dwt ({dwt_kw['wavelet']}, level 5, {layout}) vs torch l1_unstructured, "
          f"amount {a}, median of {r}; on CUDA prune_dwt's default (backend auto) is the torch one")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()}")
    print(f"{'model (targets)':34s} {'device':6s} {'method':38s} {'seconds':>9s} {'vs l1':>7s} {'operators':>10s}")
    for name, targets in BIG_MODELS:
        torch.manual_seed(0)
        base = build_model(name, num_classes=1000, in_channels=3, image_size=224).eval()
        layers = P.target_layers(base, targets)
        label = f"{name} ({len(layers)} {targets}, {sum(m.weight.numel() for _, m in layers) / 1e6:.1f}M)"

        def ref_l1(m):
            for _, mod in P.target_layers(m, targets):
                tprune.l1_unstructured(mod, "weight", amount=a)

        def ours_numpy(m):  # PyWavelets wherever the model is (backend auto takes torch on a GPU)
            P.prune_dwt(m, percentile=100 * a, targets=targets, inplace=True, backend="numpy", **dwt_kw)

        def ours_torch(m):  # the whole model through prune_dwt's torch backend, on m's device
            P.prune_dwt(m, percentile=100 * a, targets=targets, inplace=True, backend="torch", **dwt_kw)

        def ours_torch_host(m):  # and its record read on the host, as a tracked trial's checkpoint does
            res = P.prune_dwt(m, percentile=100 * a, targets=targets, inplace=True, backend="torch", **dwt_kw)
            res.layers[0].keep  # the first read copies every layer's record (one transfer per dtype)

        def ours_torch_other_stacking(m):  # the other choice of stacking layers of one shape on m's device
            on_cpu = next(m.parameters()).device.type == "cpu"
            with mock.patch.object(P, "STACK_ON_CPU", on_cpu), mock.patch.object(P, "STACK_ELEMENTS", P.STACK_ELEMENTS if on_cpu else 1):
                P.prune_dwt(m, percentile=100 * a, targets=targets, inplace=True, backend="torch", **dwt_kw)

        def ours_torch_gpu_paths(m):  # on the CPU, the paths an accelerator takes: dense products, sort, stacking
            from wavesweep import filterbank
            from wavesweep import wavelets_torch as wt

            real = wt._order_statistics
            with mock.patch.object(P, "STACK_ON_CPU", True), mock.patch.object(filterbank, "_FORCE_BACKEND", "dense"), \
                 mock.patch.object(wt, "_order_statistics", lambda a, k, by_sort: real(a, k, by_sort=True)):  # fmt: skip
                P.prune_dwt(m, percentile=100 * a, targets=targets, inplace=True, backend="torch", **dwt_kw)

        def mag_numpy(m):
            P.prune_magnitude(m, a, targets=targets, inplace=True, backend="numpy")

        def mag_torch(m):  # the selection on m's device (the default there)
            P.prune_magnitude(m, a, targets=targets, inplace=True, backend="torch")

        methods = [("torch l1_unstructured (per layer)", ref_l1), ("prune_dwt backend=numpy (PyWavelets)", ours_numpy),
                   ("prune_dwt backend=torch", ours_torch), ("  + its record to the host (checkpoint)", ours_torch_host),
                   ("  layers of one shape: other choice", ours_torch_other_stacking),
                   ("  a GPU's paths (CPU only)", ours_torch_gpu_paths),
                   ("prune_magnitude backend=numpy", mag_numpy),
                   ("prune_magnitude backend=torch", mag_torch)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wv.LevelClampedWarning)
            for dev in devices:
                t_l1 = None
                for method, fn in methods:
                    if fn is ours_torch_gpu_paths and dev.type != "cpu":
                        continue
                    t = timed_on(fn, base, r, dev)
                    t_l1 = t_l1 or t
                    print(f"{label:34s} {dev.type:6s} {method:38s} {t:9.3f} {t_l1 / t:6.2f}x {ops_on(fn, base, dev):10d}")
                    if dev.type == "cuda" and fn is ours_torch:  # backend auto's choice there
                        print(f"{'':34s} {'':6s} {'target on CUDA: dwt faster than l1':38s} {'':9s} "
                              f"{t_l1 / t:6.2f}x {'PASS' if t < t_l1 else 'FAIL'}")
        del base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--amount", type=float, default=0.6, help="fraction pruned (percentile = 100*amount for dwt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="add the resnet50 / vit_b_16 section")
    ap.add_argument("--only-big", action="store_true", help="only the resnet50 / vit_b_16 section")
    ap.add_argument("--big-repeats", type=int, default=3)
    ap.add_argument("--big-layout", default="filter", choices=wv.LAYOUTS)
    ap.add_argument("--big-devices", default="", help="comma-separated devices for --big (default: cpu, and cuda when present)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only_big:
        big_models(args)
        return
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None).eval()
    convs = P.target_layers(base)
    n = sum(m.weight.numel() for _, m in convs)
    a, r = args.amount, args.repeats
    print(f"ResNet-18 (random init): {len(convs)} conv layers, {n:,} conv weights; amount {a}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {r}")

    def ref_l1(m):
        for _, mod in P.target_layers(m):
            tprune.l1_unstructured(mod, "weight", amount=a)

    def ref_random(m):
        for _, mod in P.target_layers(m):
            tprune.random_unstructured(mod, "weight", amount=a)

    def ref_global(m):
        tprune.global_unstructured([(mod, "weight") for _, mod in P.target_layers(m)], tprune.L1Unstructured, amount=a)

    rows: dict[str, float] = {}
    rows["torch l1_unstructured (per layer)"] = t_l1 = timed(ref_l1, base, r)
    rows["torch random_unstructured (per layer)"] = t_rnd = timed(ref_random, base, r)
    rows["torch global_unstructured (L1)"] = t_glob = timed(ref_global, base, r)

    ours = {
        "magnitude layer": (lambda m: P.prune_magnitude(m, a, inplace=True), t_l1),
        "magnitude global": (lambda m: P.prune_magnitude(m, a, scope="global", inplace=True), t_glob),
        "random layer": (lambda m: P.prune_random(m, a, seed=0, inplace=True), t_l1),
        "random global": (lambda m: P.prune_random(m, a, seed=0, scope="global", inplace=True), t_glob),
    }
    for layout in wv.LAYOUTS:
        ours[f"dwt {layout} (bior4.4, level 5)"] = (
            lambda m, layout=layout: P.prune_dwt(
                m, wavelet="bior4.4", level=5, percentile=100 * a, layout=layout, inplace=True
            ),
            t_l1,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)  # kernel layout: level 0 everywhere
        for name, (fn, _) in ours.items():
            rows[name] = timed(fn, base, r)
        copy_mag = timed(lambda m: P.prune_magnitude(m, a), base, r)
        copy_rnd = timed(lambda m: P.prune_random(m, a, seed=0), base, r)
        copy_dwt = timed(lambda m: P.prune_dwt(m, wavelet="bior4.4", level=5, percentile=100 * a, layout="filter"), base, r)

    print(f"\n{'method':42s} {'seconds':>9s}")
    for name, t in rows.items():
        print(f"{name:42s} {t:9.3f}")
    print(f"{'magnitude layer (inplace=False, +deepcopy)':42s} {copy_mag:9.3f}")
    print(f"{'random layer (inplace=False, +deepcopy)':42s} {copy_rnd:9.3f}")
    print(f"{'dwt filter (inplace=False, +deepcopy)':42s} {copy_dwt:9.3f}")

    print("\nspeed-up vs torch reference (target):")
    checks = [
        ("magnitude layer vs l1_unstructured", t_l1 / rows["magnitude layer"], 4.0),
        ("magnitude global vs global_unstructured", t_glob / rows["magnitude global"], 4.0),
        ("random layer vs l1_unstructured", t_l1 / rows["random layer"], 4.0),
        ("random layer vs random_unstructured", t_rnd / rows["random layer"], 4.0),
        ("random global vs global_unstructured", t_glob / rows["random global"], 4.0),
        ("dwt filter vs l1_unstructured", t_l1 / rows["dwt filter (bior4.4, level 5)"], 1.0),
        ("magnitude layer (+deepcopy) vs l1_unstructured", t_l1 / copy_mag, 4.0),
        ("random layer (+deepcopy) vs l1_unstructured", t_l1 / copy_rnd, 4.0),
        ("dwt filter (+deepcopy) vs l1_unstructured", t_l1 / copy_dwt, 1.0),
    ]
    for name, ratio, target in checks:
        ok = "ok" if ratio >= target else "MISSED"
        print(f"  {name:48s} {ratio:6.2f}x  (target >= {target:g}x)  {ok}")
    if args.big:
        big_models(args)


if __name__ == "__main__":
    main()
