"""How many training batches BatchNorm re-estimation needs: top-1 after re-estimation against the
number of batches (of 64), for dwt, magnitude and random pruning at two budgets, over three
batch-stream seeds (mean ± spread), beside the one-shot score (recovery none) in the same run.

The evidence behind ``recovery_batches``' default (50) and the cost side of
``bench_recovery.py``'s BatchNorm share: a batch count whose mean is within the seed spread of
the largest count is saturated; fewer batches bias the statistics. The counts here are fed to
``reestimate_bn`` as given; a trial takes one pass over the training split at most
(``recovery.epoch_batches``, printed: digits 22), so a count above it is what a trial never runs.

    python bench/bench_bn_batches.py [--model resnet18] [--dataset digits] [--eval-limit 2000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout under test, installed or not

from wavesweep import evaluate, pruning, recovery, train  # noqa: E402
from wavesweep.data import eval_subset, load_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--eval-limit", type=int, default=2000)
    ap.add_argument("--batches", default="1,2,4,8,16,50")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--percentiles", default="70,90")
    args = ap.parse_args()
    counts = [int(v) for v in args.batches.split(",")]
    base = train.get_base_model(args.model, args.dataset, seed=0, device="cpu", progress=False)
    bundle = load_dataset(args.dataset, seed=0)
    test = eval_subset(bundle.test, args.eval_limit, seed=0)
    t_start = time.perf_counter()
    print(f"{args.model} on {args.dataset}: {len(bundle.train)} training examples "
          f"({recovery.epoch_batches(len(bundle.train), 64)} batches of 64 a pass: the most a trial takes), {len(test)} evaluated; "
          f"base top-1 {evaluate.evaluate(base.model, test, device='cpu').top1:.3f}; dwt bior4.4 level 5 filter layout; "
          f"cells: mean±spread over {args.seeds} batch-stream seeds")  # fmt: skip
    for pct in (float(v) for v in args.percentiles.split(",")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dwt = pruning.prune_dwt(base.model, wavelet="bior4.4", level=5, percentile=pct, layout="filter")
            results = {"dwt": dwt, **pruning.prune_matched(base.model, dwt)}
        for name, res in results.items():
            none = evaluate.evaluate(res.model, test, device="cpu").top1
            cells = []
            for n in counts:
                accs = []
                for s in range(args.seeds):
                    m = copy.deepcopy(res.model)
                    recovery.reestimate_bn(m, recovery.training_batches(bundle.train, batch_size=64, n=n, seed=s))
                    accs.append(evaluate.evaluate(m, test, device="cpu").top1)
                cells.append(f"{n}:{statistics.mean(accs):.3f}±{statistics.pstdev(accs):.3f}")
            print(f"  percentile {pct:g} {name:9s} none {none:.3f} | bn " + " ".join(cells), flush=True)
    print(f"({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
