#!/usr/bin/env bash
# On a machine with a CUDA device: extraction against its roofline (the slowest of the bare bf16 forward,
# the decode and raw writes of the same bytes), JPEG decode per core and on the device, then heads on the
# device against the host's CPU. Run from a checkout whose dependencies are installed (pip install -e .), or
# set H2T_WHEELS to a folder of wheels to install into /tmp first. Each step has its own time limit
# (H2T_STEP_SCALE multiplies them) and a failed step does not stop the next: the exit status says whether all
# passed. Lent GPU time is short, so one run should bring back every table it can. `benchmarks/gpu_wheels.sh`
# downloads the wheels (here, for the lent machines' Python 3.12); with H2T_PROFILE_DIR set and py-spy among
# them, the store path of the largest layout is profiled there too. H2T_PARTS (default "extract decode heads";
# also "protocol") splits the run across calls: all of it takes longer than one 600 s command of a lent machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -n "${H2T_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/h2t-site "$H2T_WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/h2t-site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
failed=()
step() {  # step SECONDS COMMAND...: run one benchmark under a time limit, note a failure, go on
  local limit; limit=$(python3 -c "print(int($1 * float('${H2T_STEP_SCALE:-1}')))"); shift
  echo "== $* (limit ${limit} s)"; local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@"; local rc=$?
  echo "== rc $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$*")
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, torchvision, timm, numpy, zarr; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'zarr', zarr.__version__)"
part() { [[ " ${H2T_PARTS:-extract decode heads} " == *" $1 "* ]]; }  # H2T_PARTS: which parts run
if part extract; then
  # The roofline (benchmarks/roofline.py): forward, decode, raw writes, the store path and h2t extract on the
  # same images and bytes, for ResNet-50 @ 224 at T = 8192 and 1024 and the embedded default.
  step 240 python3 benchmarks/roofline.py --device cuda --turns 2 "$@"
  # Writer threads against writer processes (extract.writers_in), alone and beside a thread running Python.
  step 90 python3 benchmarks/writers_in.py --writers 1,4,8 --shards 16
  # Where the store path stops scaling: 1 to 12 writers, each with its writers' CPU / wall (below 1: waiting)
  # and the main thread's wait for a free writer; then the T = 8192 roofline with writer processes.
  step 75 python3 benchmarks/extract_ceiling.py --device cuda --images 2048 --writers 1,2,4,8,12 --case "resnet50@224 T=8192"
  step 90 python3 benchmarks/roofline.py --device cuda --turns 2 --case "resnet50@224 T=8192" extract.writers_in=processes
  # The same layout stored uncompressed (store.compression=none): lz4 keeps 0.81-0.90 of the bytes of pooled
  # activations but was ~45 % of a writer's time on the CPU machine.
  step 90 python3 benchmarks/roofline.py --device cuda --turns 2 --case "resnet50@224 T=8192" store.compression=none
fi
part decode && step 45 python3 benchmarks/decode.py --images 512 --rounds 3
if part heads; then
  # Heads on the device against the host's CPU (benchmarks/tune_cost.py): the default tune of the embedded
  # default: groups of heads trained at once on each, then each round stacked into one computation on the
  # device (head.stack, the GPU's default) with float32 and bfloat16 products (head.precision).
  step 110 python3 benchmarks/tune_cost.py --modes together --devices cpu,cuda store.root=/tmp/h2t-gpu-stores
  step 60 python3 benchmarks/tune_cost.py --modes stacked --devices cuda --precisions float32,bfloat16 store.root=/tmp/h2t-gpu-stores
  # One round of the paper's protocol's heads (T = 2048 shapes): the host's path against the device's, in turns.
  step 60 python3 benchmarks/stacked_round.py --device cuda --turns 2
fi
if [ -n "${H2T_PROTOCOL:-}" ] || part protocol; then  # the paper's protocol (5 folds x 2 T), heads stacked on the device (~2 min)
  step 180 python3 benchmarks/tune_cost.py --modes stacked --devices cuda tune.folds=5 "tune.grid.target_size=[512,2048]" store.root=/tmp/h2t-gpu-stores
fi
spy=$(command -v py-spy || ls /tmp/h2t-site/bin/py-spy 2>/dev/null || true)
if [ -n "${H2T_PROFILE_DIR:-}" ] && [ -n "$spy" ]; then  # where the writers stop scaling: every thread, native frames
  mkdir -p "$H2T_PROFILE_DIR"
  step 90 "$spy" record -r 100 --threads --native -f raw -o "$H2T_PROFILE_DIR/store_path.txt" -- \
    python3 benchmarks/extract_ceiling.py --device cuda --images 4096 --writers 4,8 --case "resnet50@224 T=8192"
  # the same, only the thread holding the GIL in each sample: what the writers wait for, if it is the GIL
  step 90 "$spy" record -r 100 --threads --gil -f raw -o "$H2T_PROFILE_DIR/store_path_gil.txt" -- \
    python3 benchmarks/extract_ceiling.py --device cuda --images 4096 --writers 4,8 --case "resnet50@224 T=8192"
fi
if [ ${#failed[@]} -gt 0 ]; then printf 'failed: %s\n' "${failed[@]}"; exit 1; fi
