#!/usr/bin/env bash
# The GPU check: what a lent GPU must show, in one script that runs in under 8 minutes on an H100.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   GPU_CHECK_CPU_SMOKE=1 bash bench/gpu_check.sh   # on a CPU: the same steps, tiny, to keep it working
#
# Needs only the repository, a python3 with torch, and the wheels of what that machine lacks: run
# `bash bench/gpu_check_wheels.sh` here first (it fills .whl/, which the script installs from).
# Steps: (1) the CUDA-marked tests; (2) fp32 vs bf16 vs fp16 step rates of both benchmark configs at
# batch 256 and 1024, and DDP over NCCL with one process, with peak GPU memory; (3) DeepSpeed ZeRO-2
# on one GPU (real training runs through launch/deepspeed_zero2.yaml, bf16 and fp16); (4) the speed switches on the
# GPU; (5) the ResNet, R3GAN and StyleGAN2 recipes in bf16 (img/s, peak memory, MFU); (6) Inception FID
# of real CIFAR-10 test vs train (the floor) and of 3-minute cifar10_resnet and cifar10_r3gan runs, when
# FID_INCEPTION_WEIGHTS (the FID Inception file) and CIFAR10_ROOT (holding cifar-10-batches-py) are set.
# Results go to $OUT (default /tmp/gpu_check); the summary table is the last thing printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${GPU_CHECK_CPU_SMOKE:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi
if [ -n "${GPU_CHECK_CPU_SMOKE:-}" ]; then
    # no fp16 (Accelerate and DeepSpeed refuse it without a GPU) and no compile (minutes of CPU
    # compilation)
    # the CUDA-marked tests skip here; collecting the whole suite to find them takes ~10 s of imports
    CUDA_TESTS=tests/test_cuda.py
    STEPS=1; ROUNDS=1; DS_STEPS=4; export DS_ACCELERATOR=cpu; PRECISIONS_DS=bf16; SPEED_BATCH=8
    # one config: the second runs the same code paths again
    MATRIX_ARGS="--steps 1 --rounds 1 --batches 8 --precisions no,bf16 --configs mnist_wgangp"
    SPEED_ARGS="--options channels_last,adam_fused"; SPEED_CONFIGS=mnist_wgangp
else
    CUDA_TESTS=tests/
    STEPS=10; ROUNDS=3; DS_STEPS=60; PRECISIONS_DS="bf16 fp16"; SPEED_BATCH=256
    MATRIX_ARGS="--steps 10 --rounds 3"
    SPEED_ARGS=""; SPEED_CONFIGS=mnist_wgangp,dcgan64_rgb
fi
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, accelerate
print("torch", torch.__version__, "accelerate", accelerate.__version__, "cuda", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY

step "1. CUDA-marked tests"
$PY -m pytest -q -m cuda $CUDA_TESTS 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15 || status=1

step "2. step rates: precision x batch x config, and DDP over NCCL (one process)"
$PY bench/step_throughput.py --gpu_matrix $MATRIX_ARGS --out "$OUT/gpu_steps.md" 2>&1 | tail -20 || status=1

step "3. DeepSpeed ZeRO-2, one process, real training runs (bf16; fp16 on a GPU)"
rm -f "$OUT/deepspeed.md"
for precision in $PRECISIONS_DS; do
    rm -rf "$OUT/ds_run_$precision"
    timeout 240 $PY -m accelerate.commands.launch --config_file launch/deepspeed_zero2.yaml --num_processes 1 \
        -m dist_gan.train configs/mnist_wgangp.yaml --data.format=memory --data.source=synthetic \
        --train.mixed_precision=$precision --train.max_steps=$DS_STEPS --run.log_every=$((DS_STEPS / 2)) \
        --run.ckpt_every=$DS_STEPS --run.sample_every=$DS_STEPS --run.dir="$OUT/ds_run_$precision" \
        > "$OUT/deepspeed_$precision.log" 2>&1 || { status=1; tail -30 "$OUT/deepspeed_$precision.log"; }
    $PY - "$OUT/ds_run_$precision" <<'PY' | tee -a "$OUT/deepspeed.md"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if run.exists() else []
start = next((r for r in records if r.get("event") == "start"), {})
logs = [r for r in records if "imgs_per_sec" in r]
ok = any(r.get("event") == "end" for r in records)
print(f"| DeepSpeed ZeRO-2 mnist_wgangp | {start.get('distributed_type', '?')} | "
      f"{start.get('mixed_precision', '?')} | {logs[-1]['imgs_per_sec']:,.0f} real img/s | "
      f"{'finished, checkpointed' if ok else 'FAILED'} |" if logs else f"| DeepSpeed ZeRO-2 {run.name} | FAILED |")
PY
done

step "4. speed switches on this device"
$PY bench/speed_options.py --configs $SPEED_CONFIGS --batch $SPEED_BATCH --steps $STEPS \
    --rounds $ROUNDS $SPEED_ARGS --out "$OUT/speed_options.md" 2>&1 | tail -14 || status=1

step "5. the modern recipes in bf16: cifar10_resnet and cifar10_r3gan (32 px), folder256_stylegan2 (256 px), synthetic data"
rm -rf "$OUT/recipes.md" "$OUT/recipes"  # a rerun into the same $OUT starts its runs afresh
if [ -n "${GPU_CHECK_CPU_SMOKE:-}" ]; then
    RECIPE_MINUTES=0.03; RECIPE_LOG=4; RECIPE_EXTRA="--model.generator.width=4 --model.discriminator.width=4 --data.batch_size=4 --data.resolution=32"
    R3GAN_EXTRA="--model.generator.widths=[16,16,16,16] --model.discriminator.widths=[16,16,16,16] --optim.accumulate=1 --data.batch_size=4"
else
    RECIPE_MINUTES=2; RECIPE_LOG=20; RECIPE_EXTRA=""; R3GAN_EXTRA=""
fi
for recipe in cifar10_resnet cifar10_r3gan folder256_stylegan2; do
    extra=$RECIPE_EXTRA; [ "$recipe" = cifar10_r3gan ] && extra=$R3GAN_EXTRA
    timeout 300 $PY bench/recipe_check.py configs/$recipe.yaml --minutes=$RECIPE_MINUTES --log_every=$RECIPE_LOG --precision=bf16 \
        --run_dir="$OUT/recipes" --extra="$extra" > "$OUT/recipe_$recipe.log" 2>&1 \
        || { status=1; tail -30 "$OUT/recipe_$recipe.log"; }
    grep "^| $recipe" "$OUT/recipe_$recipe.log" | tee -a "$OUT/recipes.md"
done

step "6. Inception FID: CIFAR-10 test vs train (floor) and cifar10_resnet / cifar10_r3gan after 3 minutes each"
if [ -n "${FID_INCEPTION_WEIGHTS:-}" ] && [ -n "${CIFAR10_ROOT:-}" ]; then
    $PY -m dist_gan evaluate --reference=cifar10 --root="$CIFAR10_ROOT" --out="$OUT/cifar10_train.npz" \
        --feature_weights="$FID_INCEPTION_WEIGHTS" --batch_size=250 > "$OUT/fid_reference.log" 2>&1 || status=1
    timeout 900 $PY bench/inception_fid.py --reference "$OUT/cifar10_train.npz" --root "$CIFAR10_ROOT" \
        --weights "$FID_INCEPTION_WEIGHTS" --minutes 3 --run "$OUT/cifar10_fid" \
        --configs cifar10_resnet,cifar10_r3gan > "$OUT/fid.log" 2>&1 \
        || { status=1; tail -30 "$OUT/fid.log"; }
    grep "^|" "$OUT/fid.log" | tee "$OUT/fid.md"
else
    echo "skipped: set FID_INCEPTION_WEIGHTS and CIFAR10_ROOT (no internet on the GPU machine to fetch either)" \
        | tee "$OUT/fid.md"
fi

step "summary"
{
  cat "$OUT/env.txt"
  grep -E "passed|failed|skipped|error" "$OUT/cuda_tests.txt" | tail -1
  cat "$OUT/gpu_steps.md" "$OUT/deepspeed.md" "$OUT/recipes.md" "$OUT/fid.md" 2>/dev/null
  tail -n +3 "$OUT/speed_options.md" 2>/dev/null
} | tee "$OUT/summary.md"
exit $status
