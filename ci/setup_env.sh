#!/usr/bin/env bash
# Create a fresh virtual environment and install the project as a new user would (README "Set up").
# usage: ci/setup_env.sh VENV_DIR
set -euo pipefail
venv=${1:?usage: ci/setup_env.sh VENV_DIR}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch 2.13.0 CPU: the version CI is pinned to (torch-npu 2.13.0 pairs with it)
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q '.[dev]'
"$venv/bin/python" -c "import torch, ascend_v4, op_adapters, fallbacks; print('torch', torch.__version__, '| ascend_v4', ascend_v4.__version__)"
