#!/usr/bin/env bash
# Where a stage-1 step's time goes on the GPU host: a few LoRA steps of the GPU config under cProfile, with ZeRO-3
# and with ZeRO-0, each printing its steps' seconds and the top functions by own time (then <results>/lora-zN.prof).
#   scripts/gpu/profile_lora.sh DATA MODEL RESULTS [STEPS]    (after scripts/gpu/payload.py unpack)
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=$1 MODEL=$2 RESULTS=$3 STEPS=${4:-4}
PY=${PYTHON:-python3}
for z in 3 0; do
  echo "== ZeRO-$z: $STEPS stage-1 steps"
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + z)) \
    $PY -m cProfile -o "$RESULTS/lora-z$z.prof" launcher/train.py --config configs/gpu/comparison/sella.yaml \
    --stage lora --fresh --data "$DATA" --set "llm.model=$MODEL" --set "run_dir=/tmp/profile-z$z" \
    --set deepspeed.zero_stage=$z --set lora.max_steps=$STEPS --set lora.eval_every=0 --set lora.eval_rows=64 \
    --set lora.max_minutes=null ${PROFILE_SETS:-} 2>&1 | grep -v "fbgemm\|cannot determine\|\[33m\|\[0m\|^\s*$" | tail -n 25
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print('summary:', {k: s[k] for k in ('steps','train_seconds','samples_per_s','tokens_per_s')})" /tmp/profile-z$z/lora/summary.json
  $PY -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(22); pstats.Stats(sys.argv[1]).sort_stats('cumtime').print_stats('main/(launcher|llm)/|deepspeed/runtime|peft/tuners|models/llama|torch/nn/modules/module|autograd', 30)" "$RESULTS/lora-z$z.prof" | grep -v '^\s*$' | tail -n 62
done
