#!/usr/bin/env bash
# Install (first time) and run `h2t run` on the embedded default; extra arguments are Hydra overrides.
source "$(dirname "$0")/venv.sh"
cd "$repo"
exec h2t run "$@"
