#!/usr/bin/env bash
# Where a stage-1 step's time goes on the GPU host: a few LoRA steps of the GPU config under cProfile, with ZeRO-3
# and with ZeRO-0, each printing its steps' seconds and the top functions by own time (then <results>/lora-zN.prof).
#   scripts/gpu/profile_lora.sh DATA MODEL RESULTS [STEPS]    (after scripts/gpu/payload.py unpack)
# A run that fails stops the script with its status and the last lines of its log (<results>/lora-zN.log).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=$1 MODEL=$2 RESULTS=$3 STEPS=${4:-4}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
for z in 3 0; do
  echo "== ZeRO-$z: $STEPS stage-1 steps"
  RUN=/tmp/profile-z$z LOG=$RESULTS/lora-z$z.log rc=0
  rm -rf "$RUN" "$RESULTS/lora-z$z.prof"  # no summary or profile of an earlier run is read as this one's
  # launcher/train.py under cProfile, keeping its exit status (python -m cProfile exits 0 after sys.exit(2));
  # PROFILE_SETS: more "--set KEY=VALUE" words, split on spaces
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + z)) \
    $PY - "$RESULTS/lora-z$z.prof" launcher/train.py --config configs/gpu/comparison/sella.yaml \
    --stage lora --fresh --data "$DATA" --set "llm.model=$MODEL" --set "run_dir=$RUN" \
    --set deepspeed.zero_stage=$z --set lora.max_steps="$STEPS" --set lora.eval_every=0 --set lora.eval_rows=64 \
    --set lora.max_minutes=null ${PROFILE_SETS:-} > "$LOG" 2>&1 <<'PY' || rc=$?
import cProfile, os, runpy, sys
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))  # as python -m cProfile SCRIPT does
prof, code = cProfile.Profile(), 0
try:
    prof.runcall(runpy.run_path, script, run_name="__main__")
except SystemExit as stop:
    code = stop.code
finally:
    prof.dump_stats(out)
sys.exit(code)
PY
  grep -v "fbgemm\|cannot determine\|\[33m\|\[0m\|^\s*$" "$LOG" | tail -n 25 || true
  if [ $rc != 0 ]; then
    echo "profile_lora.sh: ZeRO-$z: launcher/train.py exited with status $rc (log: $LOG)" >&2
    exit $rc
  fi
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print('summary:', {k: s[k] for k in ('steps','train_seconds','samples_per_s','tokens_per_s')})" "$RUN/lora/summary.json"
  $PY -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(22); pstats.Stats(sys.argv[1]).sort_stats('cumtime').print_stats('main/(launcher|llm)/|deepspeed/runtime|peft/tuners|models/llama|torch/nn/modules/module|autograd', 30)" "$RESULTS/lora-z$z.prof" | grep -v '^\s*$' | tail -n 62
done
