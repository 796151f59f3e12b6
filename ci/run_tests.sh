#!/usr/bin/env bash
# The README's test command, run from the repository root inside the given environment.
set -euo pipefail
venv=${1:?usage: ci/run_tests.sh VENV_DIR}
. "$venv/bin/activate"
ascend-v4 ops            # the main job's smoke run: the console script is installed and works
python -m pytest -q      # README: "Tests"
