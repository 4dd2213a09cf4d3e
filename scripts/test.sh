#!/usr/bin/env bash
# The whole test suite: set-up (idempotent), lint, type check, then pytest.
# Extra arguments go to pytest (for example: scripts/test.sh tests/store -x).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. "$repo/scripts/as-root.sh"
become_root "$0" "$@"
scripts/setup.sh
export PATH="$repo/.venv/bin:$PATH"
echo "== ruff" && ruff check nbdsink plugins tests bench
echo "== mypy" && mypy
echo "== pytest"
exec pytest -p no:cacheprovider "$@"
