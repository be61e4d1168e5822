#!/usr/bin/env bash
# The GPU checks as one device call: the CUDA tests, then the benchmarks behind the GPU targets,
# each step under its own time limit, every log under $OUT (or bench/out/gpu when $OUT is unset).
#
#   bash bench/gpu_checks.sh [STEP ...]      # default: tests eval trial recovery pruning train
#   steps: tests eval trial recovery pruning train results
#
# The GPU machine has torch but not PyWavelets (nor MLflow/Optuna, which none of these steps
# need): prepare once per session, here, in the repository root (nothing of it is committed):
#
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl PyWavelets==1.9.0  # the distribution installed here
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/    # 30 MB, Debian's files
#
# and run it there with `carry: [".whl", ".data"]`. Budget (H100/H200, warm cache, estimates):
# tests ~1 min, eval ~1 min, trial ~1 min, recovery ~1 min, pruning ~1 min, train ~1 min;
# `results` (the ResNet-18 Fashion-MNIST results page of issue 10: trains the base model, then
# 45 trials) needs a call of its own.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WAVESWEEP_CACHE="${WAVESWEEP_CACHE:-/tmp/wavesweep-cache}"
[ -d .data ] && export WAVESWEEP_DATA="$PWD/.data"
FMNIST="${WAVESWEEP_DATA:-/usr/share/datasets}/fashion-mnist"
PY=python3
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of the same steps on a machine without a GPU

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, pywt; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
'|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| pywt', pywt.__version__)"
  nproc
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: rc=$rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests eval trial recovery pruning train)
for s in "${STEPS[@]}"; do
  case "$s" in
    tests)  # every CUDA test, and the files they live in (CPU tests of the same files run too)
      step tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_wavelets_torch.py tests/test_polyphase.py \
        tests/test_recovery.py tests/test_evaluate.py tests/test_pruning.py tests/test_data.py -rs ;;
    eval)  # issue 11: harness / bare model(x) loop >= 0.9x (digits, Fashion-MNIST, 224 px ResNet-18)
      step eval 240 $PY bench/bench_eval.py --device "$DEVICE" --skip-train ;;
    trial)  # issue 11: a default trial on CUDA, not-forward share <= 25 % (no MLflow on that machine)
      step trial 240 $PY bench/bench_trial.py --untracked --device "$DEVICE" --repeats 3 ;;
    recovery)  # issue 10: BatchNorm share of a default trial <= 10 %; dwt fine-tuning >= 0.5x magnitude
      step recovery 240 $PY bench/bench_recovery.py --device "$DEVICE" --bn-batches 16,50 --repeats 3 ;;
    pruning)  # issue 11: dwt on resnet50 / vit_b_16 on CUDA vs torch's l1_unstructured
      step pruning 240 $PY bench/bench_pruning.py --only-big --big-repeats 3 ;;
    train)  # issue 11: ResNet-18 Fashion-MNIST training throughput, amp/channels-last off vs auto
      step train 240 $PY bench/bench_train.py --data "$FMNIST" --repeats 2 ;;
    results)  # issue 10: the results page with the product's target model
      step results 560 $PY -m wavesweep results --model resnet18 --dataset fashion-mnist --eval-limit 2000 \
        --device "$DEVICE" --out "$OUT/results-fashion-mnist-resnet18.md" ;;
    *) echo "unknown step '$s'; valid: tests eval trial recovery pruning train results" >&2; exit 2 ;;
  esac
done
cat "$OUT/summary.txt"
