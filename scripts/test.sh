#!/usr/bin/env bash
# Run the test suite in a project virtual environment.
#
#   scripts/test.sh [PYTEST ARGS...]      e.g. scripts/test.sh -k systemd -x
#
# Creates the environment if missing ($VENV, default .venv; interpreter $PYTHON,
# default python3 >= 3.10), installs the project editable with the build and test
# extras under constraints.txt (the build extra is needed: build_model's tests use
# torch; the constraint keeps torch at this environment's CPU build), re-installs
# when pyproject.toml or constraints.txt change, then runs `python -m pytest -q`.
# pytest's exit code 5 ("no tests collected") is turned into a failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
    echo "test.sh: creating $VENV with $("$PYTHON" --version 2>&1)" >&2
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.edge-derm-screen-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "test.sh: installing -e '.[build,test]' with -c constraints.txt into $VENV" >&2
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[build,test]'
    echo "$want" > "$stamp"
fi

rc=0
"$VENV/bin/python" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$rc"
