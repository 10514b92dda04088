#!/usr/bin/env bash
# On a machine with a CUDA device: extraction against its roofline (the slowest of the bare bf16 forward,
# the decode and raw writes of the same bytes), then JPEG decode per core and on the device. Run from a
# checkout whose dependencies are installed (pip install -e .), or set H2T_WHEELS to a folder of wheels to
# install into /tmp first.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -n "${H2T_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/h2t-site "$H2T_WHEELS"/*.whl
  export PYTHONPATH="/tmp/h2t-site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The roofline (benchmarks/roofline.py): forward, decode, raw writes, the store path and h2t extract on the
# same images and bytes, for ResNet-50 @ 224 at T = 8192 and 1024 and the embedded default (~5 min on an H200).
python3 benchmarks/roofline.py --device cuda "$@"
python3 benchmarks/decode.py --images 512 --rounds 3
# Heads on the device against the host's CPU (benchmarks/tune_cost.py): the default tune of the embedded
# default: groups of heads trained at once on each, then each round stacked into one computation on the device
# (head.stack, the GPU's default) with float32 and bfloat16 products (head.precision; ~3 min with extraction).
python3 benchmarks/tune_cost.py --modes together --devices cpu,cuda store.root=/tmp/h2t-gpu-stores
python3 benchmarks/tune_cost.py --modes stacked --devices cuda --precisions float32,bfloat16 store.root=/tmp/h2t-gpu-stores
