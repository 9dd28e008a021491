#!/usr/bin/env bash
# One script for a GPU machine (shared/device/README.md): install the wheels brought along, run the GPU tests and
# benchmarks, print a short table last, and keep full outputs under $OUT (or the folder given as $1).
#   on a machine with the registries:  bash ../shared/device/fetch_wheels.sh .device-wheels
#   on the GPU machine:                bash bench/gpu_check.sh
#   on CPU, to check the script:       SMOKE=1 bash bench/gpu_check.sh /tmp/gpu_check
set -uo pipefail
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .device-wheels ] && ! $PY -c "import deepspeed, megatron.core" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links .device-wheels deepspeed==0.19.8 megatron-core==0.16.1 2>&1 | tail -3
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
export DS_ACCELERATOR=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_ARGS="--preset tiny-cpu --seq-length 256 --steps 2 --warmup 1 --precision fp32"
  ATTN_ARGS="--lengths 256 --tokens 512 --heads 2 --head-dim 32"
else
  TRAIN_ARGS="--compile"
  ATTN_ARGS=""
fi
$PY -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" | tail -3
$PY -m bench.attention_gpu $ATTN_ARGS 2>&1 | tee "$OUT/attention_gpu.txt" | tail -6
$PY -m bench.train_gpu $TRAIN_ARGS 2>&1 | tee "$OUT/train_gpu.txt" | tail -8
echo "== summary"
tail -1 "$OUT/test_gpu.txt"; tail -4 "$OUT/attention_gpu.txt"; tail -5 "$OUT/train_gpu.txt"
