#!/usr/bin/env bash
# Demo: screen the example dermoscopy images with the agent alone.
#
#   scripts/demo.sh
#
# Installs the runtime package only (`pip install .`: onnxruntime, numpy, OpenCV,
# watchdog, sqlite-utils; no torch, no onnx) into its own environment
# ($DEMO_VENV, default .venv/demo: inside the git-ignored .venv folder but apart
# from the editable test environment in .venv itself, so that neither install
# replaces the other, and torch from the test environment cannot leak into the
# demo), copies examples/images to
# a temporary inbox, scans it once, and prints the results table with the review
# flags. The example images are left untouched. Decision support, not a diagnosis.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${DEMO_VENV:-.venv/demo}
PYTHON=${PYTHON:-python3}
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
    echo "demo.sh: creating $VENV with $("$PYTHON" --version 2>&1)" >&2
    "$PYTHON" -m venv "$VENV"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Install from a copy of what the package is built from, not from `.`: pip builds
# in-tree, which leaves build/ behind, and a stale build/lib can leak deleted
# modules into the next install.
mkdir "$work/src"
cp -R pyproject.toml edge_agent build_model "$work/src/"
[ -f README.md ] && cp README.md "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
echo "demo.sh: installing the agent (runtime dependencies only) into $VENV" >&2
"$VENV/bin/python" -m pip install -q "$work/src"
# same version number as an earlier install: make sure the current source is what runs
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$work/src"
if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "demo.sh: torch is importable in $VENV; the demo must run without it" >&2
    exit 1
fi

cp -R examples/images "$work/inbox"
echo "demo.sh: scanning $(find "$work/inbox" -type f | wc -l) example images" >&2
"$VENV/bin/edge-agent" scan --inbox "$work/inbox" --db "$work/results.db" --after keep
echo
"$VENV/bin/edge-agent" results --db "$work/results.db"
