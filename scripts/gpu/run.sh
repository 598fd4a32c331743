#!/usr/bin/env bash
# The comparison on CoLLM's ML-1M at the paper's budget, in one command on the offline GPU host.
#
#   make gpu-payload                      # here: the parts to carry (.gpu-payload/part-N), sent back to back
#   scripts/gpu/run.sh --results "$OUT"   # there, in the repository copy, after the last part arrived
#   scripts/gpu/run.sh --dry-run --data-name ml-100k --results DIR   # the same path on CPU: tiny model, gloo
#   scripts/gpu/run.sh --bench ...        # then bench/llm_train.py and bench/collab.py (each with its baseline)
#
# Steps: (1) check the parts against their manifest, join the model, unpack the prep output and install the kit
# (scripts/gpu/payload.py unpack); (2) check FBGEMM's CUDA table kernels against a reference on a few fused
# row-wise Adagrad steps (scripts/gpu/check_tables.py): if they fail, only the rows without tables run, and
# the timing table says so; (3) the rows of configs/gpu/comparison/ in priority order (SeLLa-Rec by --stage
# all, then text-only, popularity, MF, CoLLM-like, SeLLa-Rec without <Warm_ID>), skipping a row whose estimate
# does not fit the --minutes left; (4) the results folder: timing.tsv, table.md (scripts/results_table.py),
# results.tar.gz (every summary, metrics.json, per-row scores and TensorBoard events) and run.log; with
# --bench, llm_train.json and collab.json of the two benchmarks when the time left allows.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PAYLOAD=$REPO/.gpu-payload TARGET=/tmp/sellarec RESULTS=${OUT:-$REPO/results/gpu} MINUTES=9 DRY=0 DATA_NAME=collm-ml-1m
BENCH=0
while [ $# -gt 0 ]; do
  case $1 in
    --payload) PAYLOAD=$(realpath "$2"); shift 2;;
    --target) TARGET=$2; shift 2;;
    --results) RESULTS=$2; shift 2;;
    --minutes) MINUTES=$2; shift 2;;
    --data-name) DATA_NAME=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    --bench) BENCH=1; shift;;
    -h|--help) sed -n 2,16p "$0"; exit 0;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
mkdir -p "$RESULTS" "$TARGET"
RESULTS=$(realpath "$RESULTS") TARGET=$(realpath "$TARGET")
exec > >(tee "$RESULTS/run.log") 2>&1
START=$(date +%s)
minutes() { echo $(( ($(date +%s) - START) / 60 )); }
say() { echo "[gpu-run +$(( $(date +%s) - START ))s] $*"; }

if [ $DRY = 1 ]; then
  PY=${PYTHON:-python}
  export PYTHONPATH=$REPO
  DEVICE=cpu LAUNCH=(--num_gpus 2)
  # the same stages and rows at a smoke-test budget: tiny model, 2 CPU ranks (gloo), row_wise on the CPU sharder
  SETS=(llm.model=tiny llm.max_length=160 collab.sharding=row_wise collab.dim=16 collab.proj_hidden=32
        collab.max_steps=6 collab.eval_every=3 collab.batch=512 collab.projector_items=0 distill.batch=64
        lora.max_steps=2 lora.micro_batch=2 lora.grad_accum=1 lora.eval_rows=16 lora.eval_batch=8
        sella.max_steps=2 sella.micro_batch=2 sella.grad_accum=1 sella.eval_every=0 sella.eval_rows=16
        sella.eval_batch=8 eval.rows=24 eval.batch=8)
  say "dry run on CPU: $PY, tiny model, 2 gloo ranks"
  $PY scripts/gpu/payload.py unpack --payload "$PAYLOAD" --target "$TARGET" --no-install
else
  PY=${PYTHON:-python3}
  $PY scripts/gpu/payload.py unpack --payload "$PAYLOAD" --target "$TARGET"
  export PYTHONPATH=$TARGET/site:$REPO SELLAREC_CACHE=$TARGET/cache HF_HUB_OFFLINE=1
  export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed 0.19.8 cannot parse the image's 9.0a
  DEVICE=cuda LAUNCH=(--num_gpus 1)
  SETS=("llm.model=$(ls "$TARGET"/model/*.gguf)")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/[gpu] /' || true
fi
DATA=$TARGET/data/$DATA_NAME
[ -f "$DATA/manifest.json" ] || { echo "run.sh: no prep output $DATA in the payload" >&2; exit 2; }
WORK=$TARGET/work  # run directories (runs/gpu/...) live here, not in the repository copy
mkdir -p "$WORK"
printf 'row\tstage\tseconds\tstatus\n' > "$RESULTS/timing.tsv"

TABLES=1
if $PY scripts/gpu/check_tables.py --device $DEVICE 2>&1 | tee "$RESULTS/check.txt"; then :; else
  TABLES=0
  say "FBGEMM's table kernels failed the check: only the rows without tables run (text-only, popularity)"
fi

launch() {  # ROW CONFIG STAGE: one launcher/train.py job, timed into timing.tsv
  local row=$1 config=$2 stage=$3 t0 status=ok
  t0=$(date +%s)
  say "$row: --stage $stage ($config)"
  (cd "$WORK" && $PY -m deepspeed.launcher.runner "${LAUNCH[@]}" --master_addr 127.0.0.1 \
      --master_port $((29500 + RANDOM % 1000)) "$REPO/launcher/train.py" --config "$REPO/$config" --stage "$stage" \
      --data "$DATA" $(printf -- '--set %s ' "${SETS[@]}")) || status=failed
  printf '%s\t%s\t%s\t%s\n' "$row" "$stage" $(( $(date +%s) - t0 )) "$status" >> "$RESULTS/timing.tsv"
  [ $status = ok ]
}

skip() { printf '%s\t-\t0\tskipped: %s\n' "$1" "$2" >> "$RESULTS/timing.tsv"; say "$1: skipped ($2)"; }

# row, estimated minutes on one H100 (launches and model loading included), stages; highest priority first
ROWS=("sella 7 all" "text-only 1 eval" "popularity 1 eval" "mf 2 collab,eval" "collm-like 3 sella,eval"
      "sella-no-warm 3 sella,eval")
for entry in "${ROWS[@]}"; do
  read -r row estimate stages <<< "$entry"
  config=configs/gpu/comparison/$row.yaml
  if [ $DRY = 0 ] && [ $(( $(minutes) + estimate )) -gt "$MINUTES" ]; then
    skip $row "estimated ${estimate} min, $(( MINUTES - $(minutes) )) of the ${MINUTES} left"; continue
  fi
  if [ $TABLES = 0 ]; then
    case $row in
      sella) launch $row "$config" lora || true; continue;;  # stage 1 alone: the adapter text-only needs
      text-only|popularity) ;;
      *) skip $row "needs the table kernels"; continue;;
    esac
  fi
  for stage in ${stages//,/ }; do
    launch $row "$config" $stage || { say "$row: --stage $stage failed, the row stops here"; break; }
  done
done

if [ $BENCH = 1 ] && [ $DRY = 0 ]; then
  if [ $(( $(minutes) + 3 )) -le "$MINUTES" ]; then
    say "bench/llm_train.py (stage-1 tokens/s against HF Trainer + PEFT, same run)"
    $PY bench/llm_train.py --data "$DATA" --model "${SETS[0]#llm.model=}" --out "$RESULTS/llm_train.json" || say "failed"
  else skip bench-llm "$(( MINUTES - $(minutes) )) min left"; fi
  if [ $(( $(minutes) + 2 )) -le "$MINUTES" ] && [ $TABLES = 1 ]; then
    say "bench/collab.py (TorchRec tables against plain PyTorch MF, same run)"
    $PY bench/collab.py --out "$RESULTS/collab.json" || say "failed"
  else skip bench-collab "$(( MINUTES - $(minutes) )) min left or no table kernels"; fi
fi

say "collecting results"
(cd "$WORK" && $PY "$REPO/scripts/results_table.py" $(printf "$REPO/configs/gpu/comparison/%s.yaml " \
    sella text-only popularity mf collm-like sella-no-warm) --stages > "$RESULTS/table.md") || say "no results table"
tar -czf "$RESULTS/results.tar.gz" -C "$WORK" --exclude='ckpt' --exclude='*.safetensors' --exclude='adapter' runs
cat "$RESULTS/timing.tsv"
say "done in $(minutes) min: $RESULTS"
