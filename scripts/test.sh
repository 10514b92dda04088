#!/usr/bin/env bash
# Install (first time) and run the test suite, offline.
source "$(dirname "$0")/venv.sh"
cd "$repo"
export HF_HUB_OFFLINE=1
exec python -m pytest -q "$@"
