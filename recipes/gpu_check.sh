#!/usr/bin/env bash
# One prepared GPU check (issue 16): adapt vs diffusers' reference LoRA trainer on SD 1.5 (512 px, batch 4) and
# SDXL (1024 px, gradient checkpointing, batch 1), bf16, random weights. See recipes/gpu_check.py for what it prints.
#   bash recipes/gpu_check.sh OUT_DIR [extra gpu_check.py args]
# Optional inputs beside the repo (never committed): .whl/ (wheels of packages the GPU image lacks, installed into
# /tmp/site) and .peer/ (diffusers' examples/text_to_image/train_text_to_image_lora{,_sdxl}.py from a snapshot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [args]}; shift
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export HF_HOME=${HF_HOME:-/tmp/hf_home} ADAPT_CACHE=${ADAPT_CACHE:-/tmp/adapt_cache}
peer=(); [ -d .peer ] && peer=(--peer .peer)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
exec python3 recipes/gpu_check.py --out "$out" "${peer[@]}" "$@"
