# Sourced by scripts/run.sh and scripts/test.sh: make (once) and activate the project's virtualenv.
# It lives outside the clone, keyed by a hash of pyproject.toml, so fresh clones and CI reuse it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$(sha256sum "$repo/pyproject.toml" | cut -c1-12)"
venv="${H2T_VENV:-$HOME/.cache/h2t/venv-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "h2t: creating $venv (first time only: torch + timm, a few minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$repo[test]"
  touch "$venv/.complete"
fi
# The venv may be shared by several clones: point the editable install at this one.
log="$(mktemp)"
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
rm -f "$log"
export PATH="$venv/bin:$PATH"
