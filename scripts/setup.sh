#!/usr/bin/env bash
# Create .venv in this checkout (if missing) and install polyfid into it, editable, with its
# test extra. torch is pinned (torch==2.13.0, the CPU wheel where one is at hand) and installed
# first. Idempotent: a quick no-op when polyfid and torch import and pyproject.toml is unchanged
# since the last successful setup.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.polyfid-setup-stamp

pyproject_hash() {
    "$1" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())'
}

ready() {
    [[ -x $VENV/bin/python && -f $STAMP ]] \
        && [[ "$(cat "$STAMP")" == "$(pyproject_hash "$VENV/bin/python")" ]] \
        && "$VENV/bin/python" -c 'import polyfid, torch' >/dev/null 2>&1
}

ready && exit 0

# one setup at a time per checkout (scripts/demo.sh and scripts/test.sh may start together)
if command -v flock >/dev/null 2>&1; then
    lock="${TMPDIR:-/tmp}/polyfid-setup-$(pwd | cksum | cut -d' ' -f1).lock"
    exec 9>"$lock"
    flock 9
    ready && exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
        echo "polyfid needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    echo "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip || echo "warning: could not upgrade pip; continuing with $("${PIP[@]}" --version)" >&2
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test]"
"$VENV/bin/python" -c 'import polyfid, torch; print(f"polyfid {polyfid.__version__}, torch {torch.__version__}: ready")'
pyproject_hash "$VENV/bin/python" > "$STAMP"
