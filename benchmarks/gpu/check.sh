#!/usr/bin/env bash
# GPU check on a lent H100/H200 (torch, transformers, peft, accelerate preinstalled; no internet, no TRL).
# Measures step time and peak CUDA memory of CoFiTune (fp32 deltas, bf16 deltas, the recommended low-memory optimizer
# unfused and fused) vs LoRA r16 vs QLoRA r16 (if bitsandbytes imports) vs full fine-tuning vs the freeze-tuning peer
# on random-weight 8B and 1B Llama shapes (bf16, SDPA, checkpointing, batch 1 x 2048, 5 timed steps after 2 warm-up),
# prints them next to the memory model's predictions (JSON written after every configuration), then runs the
# gpu-marked tests. Under 8 minutes: 400 s for the measurements (90 s per configuration at most), 60 s for the tests.
#   bash benchmarks/gpu/check.sh            (writes ${OUT:-.}/gpu_check.json)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
OUT_DIR="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 400 python benchmarks/gpu/memory_check.py --shapes llama-3-8b llama-3.2-1b --timeout 90 \
  --out "$OUT_DIR/gpu_check.json"
status=$?
timeout 60 python -m pytest tests -m gpu -q -p no:cacheprovider
exit $(( status != 0 ? status : $? ))
