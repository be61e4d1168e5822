#!/usr/bin/env bash
# The GPU checks as one device call: the CUDA tests, then the benchmarks behind the GPU targets,
# each step under its own time limit, every log in $OUT/steps.log (or bench/out/gpu when $OUT is unset).
#
#   bash bench/gpu_checks.sh [STEP ...]      # default: tests eval trial recovery pruning train
#   steps: tests eval trial recovery filedata layout pruning train profile results
#
# The GPU machine has torch but not PyWavelets (nor MLflow/Optuna, which none of these steps
# need): prepare once per session, here, in the repository root (nothing of it is committed):
#
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl PyWavelets==1.9.0  # the distribution installed here
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/    # 30 MB, Debian's files
#
# and run it there with `carry: [".whl", ".data"]`. The whole call ends within DEADLINE seconds
# (default 570, for a device call of at most 600 s): each step runs under its own limit, cut to
# what is left; `results` (issue 10's page with the product's target model, ResNet-18 on
# Fashion-MNIST: trains the base model, then 45 trials) gets whatever the steps before it left,
# and resumes from its progress file ($OUT/results-fashion-mnist-resnet18.progress.csv, brought
# back to RESUME_FROM) when a later call runs it again. Estimates on an H100/H200: tests ~40 s,
# eval ~40 s, trial ~30 s, recovery ~40 s, filedata ~60 s, pruning ~40 s, train ~160 s (its 10-epoch recipe twice), results 3-6 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pywt" 2>/dev/null; then  # installed here: a dry run
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
} 2>&1 | tee "$OUT/summary.txt"

DEADLINE="${DEADLINE:-570}"  # seconds for the whole script
step() {  # step NAME SECONDS COMMAND...: run with a limit (cut to what DEADLINE leaves), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "=== $name: skipped, ${left}s left" | tee -a "$OUT/summary.txt"; return; fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" >"/tmp/step-$name.log" 2>&1  # -k: a step that ignores SIGTERM is killed 5 s later
  local rc=$?
  [ "$rc" -ne 0 ] && FAILED+=("$name (rc=$rc)")
  tail -n 40 "/tmp/step-$name.log"
  # one file for every step's log: a device call brings back at most 8 files
  { echo "=== $name (limit ${limit}s): $*"; cat "/tmp/step-$name.log"; } >>"$OUT/steps.log"
  echo "=== $name: rc=$rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

VALID="tests eval trial recovery filedata layout pruning train profile results"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests eval trial recovery pruning train)
for s in "${STEPS[@]}"; do  # every step named is checked before any runs: a typo costs no device time
  case " $VALID " in *" $s "*) ;; *) echo "unknown step '$s'; valid: $VALID" >&2; exit 2 ;; esac
done
FAILED=()
for s in "${STEPS[@]}"; do
  case "$s" in
    tests)  # every CUDA test of the files the GPU paths live in
      # TESTS_K="cuda or device_copy" (the default): the CUDA tests alone (the CPU ones run on every
      # machine, some need MLflow, which the GPU machine lacks); TESTS_K= (empty) runs every test of the files
      TESTS_K="${TESTS_K-cuda or device_copy}"
      step tests 100 $PY -m pytest -q -p no:cacheprovider tests/test_wavelets_torch.py tests/test_polyphase.py \
        tests/test_recovery.py tests/test_evaluate.py tests/test_pruning.py tests/test_data.py tests/test_trial.py \
        tests/test_accounting.py tests/test_train.py -rs ${TESTS_K:+-k "$TESTS_K"} ;;
    eval)  # issue 11: harness / bare model(x) loop >= 0.9x (digits, Fashion-MNIST, 224 px ResNet-18)
      step eval 75 $PY bench/bench_eval.py --device "$DEVICE" --skip-train ;;
    trial)  # issue 11: a default trial on CUDA, not-forward share <= 25 % (no MLflow on that machine)
      step trial 60 $PY bench/bench_trial.py --untracked --device "$DEVICE" --repeats 3 ;;
    recovery)  # issue 10: BatchNorm share of a default trial <= 10 %; dwt fine-tuning >= 0.5x magnitude
      # WORKLOADS=cnn:fashion-mnist:0 adds the share of a trial over the whole Fashion-MNIST test split
      step recovery 75 $PY bench/bench_recovery.py --device "$DEVICE" --bn-batches 50 --repeats 3 --workloads "${WORKLOADS:-}" ;;
    filedata)  # issues 10/11: BatchNorm re-estimation on an imagefolder of 224 px JPEGs, 50 x 64, decoded in the
      # main process (before) against the decoding workers (now)
      step filedata 90 $PY bench/bench_recovery.py --file-only --device "$DEVICE" --repeats 2 ;;
    layout)  # channels-last on CUDA (evaluate.CUDA_CHANNELS_LAST, off until measured): forward passes and the default trial
      step layout 90 $PY bench/bench_speedups.py --only channels_last --devices "$DEVICE" --repeats 5 ;;
    pruning)  # issue 11: dwt on resnet50 / vit_b_16 on CUDA vs torch's l1_unstructured (CPU figures: here)
      step pruning 90 $PY bench/bench_pruning.py --only-big --big-repeats 3 --big-devices "$DEVICE" ;;
    train)  # issue 11: ResNet-18 Fashion-MNIST training throughput, amp/channels-last/graphs off vs auto, >= 3x the recipe
      # before; then the 10-epoch recipe itself with and without CUDA graphs (seconds and test top-1)
      # DEVICE=cpu: the CPU rows alone (--no-cuda), without the recipe (hours on a CPU)
      if [ "$DEVICE" = cpu ]; then
        step train 240 $PY bench/bench_train.py --data "$FMNIST" --repeats 2 --no-cuda
      else
        step train 240 $PY bench/bench_train.py --data "$FMNIST" --repeats 2 --recipe
      fi ;;
    profile)  # where the time goes: torch.profiler tables of dwt pruning, a default trial, fine-tuning
      step profile 90 $PY bench/profile_cuda.py --device "$DEVICE" --rows 16 ;;
    results)  # issue 10: the results page with the product's target model (resumes an earlier call's)
      page="$OUT/results-fashion-mnist-resnet18.md"
      [ -f "${RESUME_FROM:-}" ] && cp "$RESUME_FROM" "${page%.md}.progress.csv"
      step results 600 $PY -m wavesweep results --model resnet18 --dataset fashion-mnist --eval-limit 2000 \
        --device "$DEVICE" --out "$page" ;;
  esac
done
cat "$OUT/summary.txt"
if [ ${#FAILED[@]} -gt 0 ]; then  # the exit status says so too, not only the summary's rc= lines
  echo "failed steps: ${FAILED[*]}" >&2
  exit 1
fi
