#!/usr/bin/env bash
# The step-pace issue's GPU checks in one device call of about 9 minutes: the kernel and sync
# tests run natively, the two kernel benchmarks, the train-step grid (eager and CUDA graphs) and
# a short real training run. Everything is logged to $OUT/session.log; the benchmarks' JSON and
# markdown go to $OUT beside it (8 files at most: what the device tool brings back).
#
# Before the call, on the development machine (the device image has no diffusers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# (diffusers' own needs, huggingface_hub, safetensors and regex, are in the image: check KINDS.md).
# Rehearsed on the CPU with the image's versions (Python 3.12, torch 2.11, Triton 3.6, numpy
# 2.5, no datasets/wandb/torch-fidelity): every step starts, and the tests' CPU part passes.
# For the Fashion-MNIST step, put the four idx files in .fashion/ (echo /.fashion/ >> .git/info/exclude;
#   cp /usr/share/datasets/fashion-mnist/*.gz .fashion/   # 30 MB) and carry it too.
# then run `bash benchmarks/gpu_session.sh` on the device with carry [".whl", ".fashion"], and copy
# the files back under benchmarks/results/ (their names carry the GPU's name).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# step NAME SECONDS COMMAND...: one check under its own time limit; its output goes to the log.
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "== $name: $*" >> "$LOG"
    timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%-11s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - started))" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; python3 -c \
    "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1
step tests 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -n 4 --dist load tests/test_kernels.py tests/test_step_pace.py
step norm_host 40 python3 benchmarks/bench_norm_host.py --device cuda --out "$OUT"
step group_norm 100 python3 benchmarks/bench_group_norm.py --dtypes bf16 --seconds 0.2 --out "$OUT"
step train_step 180 python3 benchmarks/bench_train_step.py --batches 8 32 128 --compiles none reduce-overhead \
    --backends triton --channels-last on --compile-skip ours-cifar10 diffusers --reps 10 --loop-reps 20 --out "$OUT"
step train 80 python3 train.py configs/digits.yaml train.max_steps=600 train.sample_every=600 \
    train.checkpoint_every=600 train.output_dir=/tmp/gpu-digits runtime.cpu_threads=0
# Real data at a GPU-sized batch: configs/fashion_mnist.yaml at batch 256 in bf16, compiled, for
# 2,000 steps (512,000 images: 8.5 epochs), then scored as the README's CPU run is.
FASHION=${FASHION_MNIST_DIR:-.fashion}
if [ -f "$FASHION/train-images-idx3-ubyte.gz" ]; then
    step fashion_data 60 python3 -m gn_diffusion.data.convert fashion-mnist "$FASHION" /tmp/gpu-fashion-data
    step fashion 300 python3 train.py configs/fashion_mnist.yaml data.path=/tmp/gpu-fashion-data/train \
        eval.reference_dir=/tmp/gpu-fashion-data/test train.output_dir=/tmp/gpu-fashion train.batch_size=256 \
        train.max_steps=2000 train.mixed_precision=bf16 runtime.compile=default train.sample_every=2000 \
        train.checkpoint_every=2000 runtime.cpu_threads=0
    step fashion_eval 180 python3 -m gn_diffusion.evaluate /tmp/gpu-fashion
    cp /tmp/gpu-fashion/evaluation.json "$OUT/fashion_evaluation.json" 2>/dev/null
else
    echo "fashion     skipped: no $FASHION/train-images-idx3-ubyte.gz (see the header)" | tee -a "$OUT/summary.txt"
fi
grep -E "images/s|passed|failed|error" "$LOG" | tail -n 20
cat "$OUT/summary.txt"
