"""Benchmark (prints figures; not a test).

(1) Training time and test accuracy of each small base model on digits with its default
    config, against the issue's targets (resnet18 >= 95 % in < 60 s, cnn >= 95 % in < 15 s,
    mlp >= 93 %).
(2) Evaluation throughput of the harness (``wavesweep.evaluate.evaluate``: loader, inference,
    metrics) versus a bare ``model(x)`` loop over the same pre-batched tensors, in the same
    run, for ResNet-18 at 224x224 (random weights, generated data) and for the trained models
    on digits. Target: harness >= 95 % of the bare loop's examples/s. Reported for
    ``predict`` (the harness's inference path) and for ``evaluate`` (plus the metrics, a fixed
    few-ms sklearn cost that dominates only for models evaluating 100k+ examples/s). Each side is run
    ``--repeats`` times alternately and the best run of each is compared (less noise from
    other processes on the machine).

    python3 bench/bench_eval.py [--device auto] [--repeats 3] [--skip-train]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from torch.utils.data import TensorDataset

from wavesweep.data import load_dataset
from wavesweep.evaluate import evaluate, predict, resolve_device
from wavesweep.models import build_model
from wavesweep.train import default_train_config, train_model

TARGETS = {"resnet18": (0.95, 60.0), "cnn": (0.95, 15.0), "mlp": (0.93, None)}


def bare_loop(model, x_batches, dev) -> float:
    """Seconds for ``model(x)`` over pre-batched CPU tensors (moved to ``dev`` per batch)."""
    model.to(dev).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in x_batches:
            model(x.to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)  # predict/evaluate return CPU tensors: the device is synced
    return time.perf_counter() - t0


def compare(label, model, x, y, batch_size, dev, repeats):
    """Best-of-``repeats`` examples/s of the bare loop, of ``predict`` (the harness's
    inference: loader + model + gathering logits) and of ``evaluate`` (predict + all
    metrics, whose fixed cost of a few ms is printed separately)."""
    ds = TensorDataset(x, y)
    batches = list(x.split(batch_size))
    bare_loop(model, batches[:1], dev)  # warm-up
    evaluate(model, TensorDataset(x[:batch_size], y[:batch_size]), batch_size=batch_size, device=dev)
    bare, pred, ev = [], [], []
    for _ in range(repeats):
        bare.append(bare_loop(model, batches, dev))
        pred.append(timed(lambda: predict(model, ds, batch_size=batch_size, device=dev)))
        ev.append(timed(lambda: evaluate(model, ds, batch_size=batch_size, device=dev)))
    n = len(x)
    b, p, e = n / min(bare), n / min(pred), n / min(ev)
    metrics_ms = (min(ev) - min(pred)) * 1000
    print(f"  {label:<30} n={n:<5} bs={batch_size:<4} bare {b:10.1f} ex/s | predict {p:10.1f} ex/s "
          f"{p / b * 100:6.1f} % {'PASS' if p / b >= 0.95 else 'FAIL'} | evaluate {e:10.1f} ex/s "
          f"{e / b * 100:6.1f} % {'PASS' if e / b >= 0.95 else 'FAIL'} (metrics {metrics_ms:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = resolve_device(args.device)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    bundle = load_dataset("digits", seed=0)
    trained = {}
    print("(1) base-model training on digits (default configs, seed 0)")
    for name, (bar, limit) in TARGETS.items():
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=1, image_size=8)
        if not args.skip_train:
            cfg = default_train_config(name, "digits")
            info = train_model(model, bundle, cfg, device=dev, progress=False)
            ok = info["test_top1"] >= bar and (limit is None or info["seconds"] < limit)
            lim = f"< {limit:.0f} s" if limit else "no time target"
            print(f"  {name:<9} epochs {cfg.epochs:>2} bs {cfg.batch_size:>3}: top1 {info['test_top1'] * 100:6.2f} % "
                  f"(>= {bar * 100:.0f} %), train {info['seconds']:6.1f} s ({lim})  {'PASS' if ok else 'FAIL'}")
        trained[name] = model.eval()

    print("(2) evaluation throughput: harness evaluate() vs bare model(x) loop, same tensors")
    torch.manual_seed(0)
    r18 = build_model("resnet18", num_classes=1000, image_size=224).eval()
    n224 = 128 if dev.type == "cpu" else 1024  # 4 CPU batches: fewer make the ratio noise
    x = torch.randn(n224, 3, 224, 224)
    y = torch.randint(0, 1000, (n224,))
    compare("resnet18 224x224 (random)", r18, x, y, 32 if dev.type == "cpu" else 256, dev, args.repeats)
    xd, yd = bundle.test.tensors  # (360, 1, 8, 8): tiled so each timing lasts long enough to read
    for name, model in trained.items():
        k = 2 if name == "resnet18" else 20
        compare(f"{name} digits (test x{k})", model, xd.repeat(k, 1, 1, 1), yd.repeat(k), 256, dev, args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
