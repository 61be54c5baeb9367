#!/usr/bin/env bash
# Create or reuse the course's virtual environment (.venv) and install the package into it.
#
# - The venv sees the system's site-packages, so a torch that is already installed (a GPU build, a
#   conda build, Colab's) is reused: nothing here replaces it.
# - torch + torchvision are installed only when they do not import together. Set TORCH_PIP_ARGS to
#   choose the build (for example an index of CPU-only wheels on a laptop without a GPU).
# - Everything else comes from pyproject.toml (`pip install -e .[test,notebooks]`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.tinygptv-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && "$PY" -c "import tinygptv_lib, torch, torchvision, timm" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

"$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] reusing torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing torch + torchvision ${TORCH_PIP_ARGS:-}"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q ${TORCH_PIP_ARGS:-} torch torchvision 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, torchvision" || { echo "[setup] torch/torchvision do not import" >&2; exit 1; }
fi
echo "[setup] installing tinygptv_lib and its dependencies"
"$PY" -m pip install -q -e ".[test,notebooks]" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import tinygptv_lib, timm, peft, transformers, nbval" || { echo "[setup] install failed" >&2; exit 1; }
touch "$STAMP"
echo "[setup] done: $("$PY" -c 'import torch, transformers, peft, timm; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, timm {timm.__version__}")')"
