#!/usr/bin/env bash
# Install (first time), lint and type-check the package, then run the test suite, offline.
source "$(dirname "$0")/venv.sh"
cd "$repo"
export HF_HUB_OFFLINE=1
ruff check pipeline tests benchmarks   # pyflakes, import order, imports at the top (pyproject.toml)
mypy                                   # pipeline/ (pyproject.toml [tool.mypy])
# Two test processes, one file each at a time (module fixtures stay in one process), one BLAS/OpenMP thread
# each: on the 2-core machine 10 min instead of 18 (2026-12-03). `bash scripts/test.sh -n 0` runs them in one.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -n 2 --dist loadfile "$@"
