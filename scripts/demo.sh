#!/usr/bin/env bash
# Set up .venv if needed, then run the demo: ethanol sampled by GFN1-xTB MD, xTB forces for all and
# MP2/cc-pVDZ energies for a few -> the multi-fidelity model against the MP2-energies-only model.
# Arguments go to `polyfid demo` (--out DIR, --quick, --single-level). Output: runs/demo by default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/polyfid demo "$@"
