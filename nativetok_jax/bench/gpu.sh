#!/usr/bin/env bash
# The GPU benchmarks of issue 14, one command, about 8 minutes on one large GPU (H100/H200 class):
#   nativetok_jax/bench/gpu.sh            (from the repository root; OUT=dir, PYTHON=python to change)
#
# 1. `bench compare` at the prototype's sizes, L = 32 and 128, float32 and bfloat16: our train step
#    against the eager PyTorch prototype on CUDA (torch with CUDA must be installed next to jax[cuda]).
# 2. `bench train` on the paper-scale configs/nativetok.py:128 in bfloat16 at the largest batch that
#    fits (doubling from 16), with its MFU against a bfloat16 matrix product timed in the same run.
#    Counting its FLOPs compiles the step with all 128 experts unrolled: the long part of this step.
# Results: $OUT/compare.json, $OUT/train.json and the printed tables in $OUT/log.txt. Each part has
# its own time limit, so one that overruns leaves the other's results.
set -u -o pipefail
PYTHON=${PYTHON:-python}
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/log.txt"
timeout 200 "$PYTHON" -m nativetok_jax.bench compare --tokens 32,128 --dtypes float32,bfloat16 --repeats 10 \
  --torch_device cuda --out "$OUT/compare.json" 2>&1 | tee -a "$OUT/log.txt"
timeout 270 "$PYTHON" -m nativetok_jax.bench train --configs configs/nativetok.py:128 --batch_sizes 16 \
  --largest_batch --dtype bfloat16 --steps 5 --no_growth --out "$OUT/train.json" 2>&1 | tee -a "$OUT/log.txt"
