#!/usr/bin/env bash
# Set up .venv if needed, then run the demo: GFN2-xTB ethanol data -> HIP-NN -> test errors -> MD.
# Arguments go to `polyfid demo` (--out DIR, --quick, --max-time S). Output: runs/demo by default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/polyfid demo "$@"
