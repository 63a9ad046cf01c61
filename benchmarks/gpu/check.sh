#!/usr/bin/env bash
# GPU check on a lent H100/H200 (torch, transformers, peft, accelerate preinstalled; no internet, no TRL).
# Measures step time and peak CUDA memory of CoFiTune vs LoRA r16 vs QLoRA r16 (if bitsandbytes imports) vs full
# fine-tuning on random-weight 1B and 8B Llama shapes (bf16, SDPA, checkpointing, batch 1 x 2048, 5 timed steps after
# 2 warm-up), prints them next to the memory model's predictions, then runs the gpu-marked tests. Under 8 minutes.
#   bash benchmarks/gpu/check.sh            (writes ${OUT:-.}/gpu_check.json)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
OUT_DIR="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 390 python benchmarks/gpu/memory_check.py --shapes llama-3.2-1b llama-3-8b --timeout 120 \
  --out "$OUT_DIR/gpu_check.json"
status=$?
timeout 60 python -m pytest tests -m gpu -q -p no:cacheprovider
exit $(( status != 0 ? status : $? ))
