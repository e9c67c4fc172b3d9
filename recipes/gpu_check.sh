#!/usr/bin/env bash
# One prepared GPU check (issue 16): adapt vs diffusers' reference LoRA trainer on SD 1.5 (512 px, batch 4) and
# SDXL (1024 px, gradient checkpointing, batch 1), bf16, random weights. See recipes/gpu_check.py for what it prints.
#   bash recipes/gpu_check.sh OUT_DIR [extra gpu_check.py args]
# Optional inputs beside the repo (never committed): .whl/ or $WHEELS (wheels of packages the GPU image lacks, installed into
# /tmp/site) and .peer/ (diffusers' examples/text_to_image/train_text_to_image_lora{,_sdxl}.py from a snapshot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [args]}; shift
W=${WHEELS:-.whl}  # WHEELS= another folder of wheels (or none)
if compgen -G "$W/*.whl" > /dev/null; then
  wheels=("$W"/*.whl)
  # datasets 5 needs pyarrow >= 24; on an image with an older pyarrow, use the datasets wheel in .whl/old/ instead
  if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
      && compgen -G "$W/old/datasets-*.whl" > /dev/null; then
    wheels=($(ls "$W"/*.whl | grep -v '/datasets-') "$W"/old/datasets-*.whl)
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export HF_HOME=${HF_HOME:-/tmp/hf_home} ADAPT_CACHE=${ADAPT_CACHE:-/tmp/adapt_cache}
peer=(); [ -d .peer ] && peer=(--peer .peer)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, diffusers, peft, transformers, accelerate, datasets; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
exec python3 recipes/gpu_check.py --out "$out" "${peer[@]}" "$@"
