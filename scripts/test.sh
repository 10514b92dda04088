#!/usr/bin/env bash
# Install (first time), lint and type-check the package, then run the test suite, offline.
source "$(dirname "$0")/venv.sh"
cd "$repo"
export HF_HUB_OFFLINE=1
ruff check pipeline tests benchmarks   # pyflakes, import order, imports at the top (pyproject.toml)
mypy                                   # pipeline/ (pyproject.toml [tool.mypy])
exec python -m pytest -q "$@"
