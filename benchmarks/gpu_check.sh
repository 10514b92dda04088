#!/usr/bin/env bash
# On a machine with a CUDA device: h2t extract against the bare bf16 forward on the same batches
# (benchmarks/gpu_extract.py: resnet50 @ 224, T = 8192, a generated folder of JPEGs), then the store
# path's ceiling there (benchmarks/extract_ceiling.py). Run from a checkout whose dependencies are
# installed (pip install -e .), or set H2T_WHEELS to a folder of wheels to install into /tmp first.
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
python3 benchmarks/gpu_extract.py "$@"
python3 benchmarks/extract_ceiling.py --device cuda --images 2048 --writers 2,4,8 --workers 8 --case "resnet50@224 T=8192"
