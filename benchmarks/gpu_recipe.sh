#!/usr/bin/env bash
# Runs the GPU recipe for a few steps on the GPU machine and keeps its metrics.
#   benchmarks/gpu_recipe.sh GGUF_FILE OUT_DIR [overrides...]
# The GGUF is SmolLM2-135M-Instruct's (see ../shared/DEVICE.md for how it travels); it is
# converted with the same code as `slipstream models pull`, then trained on.
set -euo pipefail
gguf=$1; out=$2; shift 2
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import sys; from slipstream.models import convert_gguf_to_hf; convert_gguf_to_hf(sys.argv[1], sys.argv[2], progress=False)" "$gguf" /tmp/smollm2-hf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
python3 -m slipstream.cli train recipe=smollm2-gpu model.name=/tmp/smollm2-hf trainer.run_dir=/tmp/gpu_run \
  logger.progress=false "$@" 2>&1 | grep -v 'it/s' | tee "$out/train.log"
cp /tmp/gpu_run/metrics.jsonl "$out/"
python3 -m slipstream.cli report /tmp/gpu_run && cp /tmp/gpu_run/report/*.png "$out/"
