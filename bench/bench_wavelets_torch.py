"""Torch DWT vs the PyWavelets round trip on ResNet-18's conv layers (prints figures; not a test).

Per layer set (every ``nn.Conv2d`` weight of torchvision's ResNet-18, random values):

* ``pywt``: :func:`wavesweep.wavelets.decompose` + :func:`~wavesweep.wavelets.reconstruct`
  (numpy, CPU, no gradients) -- what pruning costs today;
* ``torch fwd``: :func:`wavesweep.wavelets_torch.decompose` + ``reconstruct``, no autograd;
* ``torch fwd+bwd``: ``W = IDWT(c * m)`` forward and backward w.r.t. ``c`` -- one fine-tuning
  step's wavelet overhead;
* ``prune``: :func:`wavesweep.wavelets_torch.dwt_prune_tensor` against
  :func:`wavesweep.wavelets.dwt_prune_array` (percentile 90).

Usage: ``python bench/bench_wavelets_torch.py [--wavelet bior4.4] [--level 5] [--layout filter]
[--mode periodization] [--repeats 5]``. Runs on CPU, and on CUDA when available. On a CPU shared
with other jobs, torch's intra-op threads stall (5-6x slower with 2 threads at load 6 on 2 cores):
compare with ``OMP_NUM_THREADS=1`` there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

# the checkout this file is in, before any installed wavesweep (another checkout's editable install)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavesweep import wavelets as wv  # noqa: E402
from wavesweep import wavelets_torch as wt  # noqa: E402


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up (caches, cuDNN autotuning)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wavelet", default="bior4.4")
    ap.add_argument("--level", type=int, default=5)
    ap.add_argument("--layout", default="filter")
    ap.add_argument("--mode", default="periodization")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    weights = [m.weight.detach().float() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    n_params = sum(w.numel() for w in weights)
    kw = dict(wavelet=args.wavelet, level=args.level, layout=args.layout, mode=args.mode)
    structs = [wt.structure_of(tuple(w.shape), **kw) for w in weights]
    print(
        f"ResNet-18: {len(weights)} conv weights, {n_params / 1e6:.2f} M params; "
        f"{args.wavelet} level {args.level} layout {args.layout} mode {args.mode}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; median of {args.repeats}"
    )

    arrays = [w.numpy() for w in weights]

    def pywt_round_trip():
        for a in arrays:
            c, st = wv.decompose(a, **kw)
            wv.reconstruct(c, st)

    def pywt_prune():
        for a in arrays:
            wv.dwt_prune_array(a, percentile=90.0, **kw)

    print(f"{'device':8s} {'what':28s} {'seconds':>9s}")
    print(f"{'cpu':8s} {'pywt decompose+reconstruct':28s} {_median_time(pywt_round_trip, args.repeats):9.4f}")
    print(f"{'cpu':8s} {'pywt dwt_prune_array':28s} {_median_time(pywt_prune, args.repeats):9.4f}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        ws = [w.to(dev) for w in weights]
        coeffs = [wt.decompose(w, st) for w, st in zip(ws, structs)]
        masks = [torch.rand_like(c) > 0.9 for c in coeffs]
        params = [c.clone().requires_grad_(True) for c in coeffs]

        def fwd():
            with torch.no_grad():
                for w, st in zip(ws, structs):
                    wt.reconstruct(wt.decompose(w, st), st)

        def fwd_bwd():
            loss = 0.0
            for c, m, st in zip(params, masks, structs):
                loss = loss + wt.reconstruct(c * m, st).square().sum()
            loss.backward()

        def prune():
            for w in ws:
                wt.dwt_prune_tensor(w, percentile=90.0, **kw)

        print(f"{dev:8s} {'torch decompose+reconstruct':28s} {_median_time(fwd, args.repeats, sync):9.4f}")
        print(f"{dev:8s} {'torch IDWT(c*m) fwd+bwd':28s} {_median_time(fwd_bwd, args.repeats, sync):9.4f}")
        print(f"{dev:8s} {'torch dwt_prune_tensor':28s} {_median_time(prune, args.repeats, sync):9.4f}")


if __name__ == "__main__":
    main()
