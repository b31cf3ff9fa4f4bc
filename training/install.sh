#!/usr/bin/env bash
# Creates training/.venv with the pinned packages of requirements.txt (PyPI only).
# Idempotent: does nothing when the venv already holds exactly these pins.
# Usage: bash training/install.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import torch, numpy" 2>/dev/null; then
    echo "training/.venv is up to date"
    exit 0
fi

"${PYTHON:-python3}" -m venv "$venv"
# --no-deps: requirements.txt is the complete, closed set (see the comment at its top);
# this skips triton and cuda-bindings, which torch lists but this package never uses.
"$venv/bin/pip" install --disable-pip-version-check --no-deps -r "$req"
"$venv/bin/python" -c "import torch, numpy, onnx, onnxruntime, PIL; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
echo "$want" > "$stamp"
