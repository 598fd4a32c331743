#!/usr/bin/env bash
# The comparison on CoLLM's ML-1M at the paper's budget, in one command on the offline GPU host.
#
#   make gpu-payload                      # here: the parts to carry (.gpu-payload/part-N), sent back to back
#   scripts/gpu/run.sh --results "$OUT"   # there, in the repository copy, after the last part arrived
#   scripts/gpu/run.sh --dry-run --data-name ml-100k --results DIR   # the same path on CPU: tiny model, gloo
#   scripts/gpu/run.sh --bench ...        # then bench/llm_train.py and bench/collab.py (each with its baseline)
#   scripts/gpu/run.sh --bench-only ...   # the two benchmarks without the comparison rows
#   scripts/gpu/run.sh --set lora.micro_batch=64 ...   # config overrides for every launch (repeatable)
#   scripts/gpu/run.sh --rows sella,text-only,popularity  # some rows only (SeLLa-Rec's stages 1-2 run as far as a
#                                         # listed row reads them: popularity and mf read none)
#   scripts/gpu/run.sh --plan --rows ... --bench  # the launches those flags would run, in plan.tsv, none run
#   scripts/gpu/run.sh --no-tables ...    # as after a failed table kernel check: the rows without tables only
#
# Steps: (1) check the parts against their manifest, join the model, unpack the prep output and install the kit
# (scripts/gpu/payload.py unpack); (2) check FBGEMM's CUDA table kernels against a reference on a few fused
# row-wise Adagrad steps (scripts/gpu/check_tables.py): if they fail, only the rows without tables run, and
# the timing table says so; (3) the rows of configs/gpu/comparison/ in three lanes that share the GPU (below),
# every launch stopped at the --minutes deadline less 30 s, and every stage-3 launch's training capped so that its
# validations and test still fit before it (STAGE3_RESERVE); (4) the results folder: timing.tsv, table.md
# (scripts/results_table.py), results.tar.gz (every summary, metrics.json, per-row scores,
# TensorBoard scalars, logs/ROW-STAGES.log; rewritten after every launch, so a call cut short still brings back
# what finished) and run.log; with --bench, llm_train.json and collab.json of the two benchmarks when the time left
# allows. Each call trains in a fresh working folder: a second call on the same host with other --set values starts
# over instead of failing on the first call's records.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PAYLOAD=$REPO/.gpu-payload TARGET=/tmp/sellarec RESULTS=${OUT:-$REPO/results/gpu} MINUTES=9 DRY=0 DATA_NAME=collm-ml-1m
BENCH=0 EXTRA=() ROWS=sella,text-only,popularity,mf,collm-like,sella-no-warm PLAN=0 TABLES=1
while [ $# -gt 0 ]; do
  case $1 in
    --payload) PAYLOAD=$(realpath "$2"); shift 2;;
    --target) TARGET=$2; shift 2;;
    --results) RESULTS=$2; shift 2;;
    --minutes) MINUTES=$2; shift 2;;
    --data-name) DATA_NAME=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    --plan) PLAN=1; shift;;
    --bench) BENCH=1; shift;;
    --bench-only) BENCH=1 ROWS=; shift;;
    --set) EXTRA+=("$2"); shift 2;;
    --rows) ROWS=$2; shift 2;;
    --no-tables) TABLES=0; shift;;
    -h|--help) sed -n 2,20p "$0"; exit 0;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
IFS=, read -ra ROW_LIST <<< "$ROWS"
for r in "${ROW_LIST[@]}"; do
  [ -f "configs/gpu/comparison/$r.yaml" ] || { echo "run.sh: --rows: no row '$r' (configs/gpu/comparison/$r.yaml)" >&2; exit 2; }
done
[[ ,$ROWS, != *,collm-like,* || ,$ROWS, == *,mf,* ]] || { echo "run.sh: --rows: collm-like reads mf's tables, list mf too" >&2; exit 2; }
mkdir -p "$RESULTS" "$TARGET"
RESULTS=$(realpath "$RESULTS") TARGET=$(realpath "$TARGET")
TIMING=$RESULTS/timing.tsv LOG=$RESULTS/run.log
[ $PLAN = 0 ] || TIMING=$RESULTS/plan.tsv LOG=$RESULTS/plan.log  # a plan leaves a real run's records as they are
exec > >(tee "$LOG") 2>&1
START=$(date +%s)
left() { echo $(( DEADLINE - $(date +%s) )); }  # seconds to the deadline
say() { echo "[gpu-run +$(( $(date +%s) - START ))s] $*"; }

if [ $PLAN = 1 ]; then
  PY=${PYTHON:-python} DEVICE=cpu LAUNCH=() SETS=(llm.model=-)
  say "plan: the launches of these flags, in the order the lanes would start them; nothing is unpacked or run"
elif [ $DRY = 1 ]; then
  PY=${PYTHON:-python}
  export PYTHONPATH=$REPO
  DEVICE=cpu LAUNCH=(--num_gpus 1)
  # the same stages and rows at a smoke-test budget: tiny model, one CPU rank (gloo) as on the one-GPU host, row_wise
  # on the CPU sharder
  SETS=(llm.model=tiny llm.max_length=160 collab.sharding=row_wise collab.dim=16 collab.proj_hidden=32
        collab.max_steps=6 collab.eval_every=3 collab.batch=512 collab.projector_items=0 distill.batch=64
        lora.max_steps=2 lora.micro_batch=2 lora.grad_accum=1 lora.eval_rows=16 lora.eval_batch=8
        sella.max_steps=2 sella.micro_batch=2 sella.grad_accum=1 sella.eval_every=0 sella.eval_rows=16
        sella.eval_batch=8 eval.rows=24 eval.batch=8)
  say "dry run on CPU: $PY, tiny model, 1 gloo rank"
  $PY scripts/gpu/payload.py unpack --payload "$PAYLOAD" --target "$TARGET" --no-install
else
  PY=${PYTHON:-python3}
  $PY scripts/gpu/payload.py unpack --payload "$PAYLOAD" --target "$TARGET"
  export PYTHONPATH=$TARGET/site:$REPO SELLAREC_CACHE=$TARGET/cache HF_HUB_OFFLINE=1
  export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed 0.19.8 cannot parse the image's 9.0a
  export OMP_NUM_THREADS=4  # three lanes of jobs share the 16 cores
  DEVICE=cuda LAUNCH=(--num_gpus 1)
  SETS=("llm.model=$(ls "$TARGET"/model/*.gguf)")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/[gpu] /' || true
fi
SETS+=("${EXTRA[@]}")
SETARGS=()  # every launch's overrides, one --set per value (values may hold spaces: paths, lists)
for s in "${SETS[@]}"; do SETARGS+=(--set "$s"); done
DATA=$TARGET/data/$DATA_NAME
[ $PLAN = 1 ] || [ -f "$DATA/manifest.json" ] || { echo "run.sh: no prep output $DATA in the payload" >&2; exit 2; }
WORK=$TARGET/work/$START-$$  # this call's run directories (runs/gpu/...), not in the repository copy
mkdir -p "$WORK"
# stage 3's training cap: the row's configured sella.max_minutes (with --set), lowered per launch to the time left
# less STAGE3_RESERVE seconds for its start-up, validations and test (GPU run 4: 88-90 s beside two other stage-3
# lanes; 30 s more, since a row killed in its test brings back no metrics)
STAGE3_RESERVE=120
printf 'row\tstage\tseconds\tstatus\n' > "$TIMING"

if [ $TABLES = 0 ]; then
  say "--no-tables: no table kernel check, and only the rows without tables run (text-only, popularity)"
elif [ $PLAN = 1 ] || $PY scripts/gpu/check_tables.py --device $DEVICE 2>&1 | tee "$RESULTS/check.txt"; then :; else
  TABLES=0
  say "FBGEMM's table kernels failed the check: only the rows without tables run (text-only, popularity)"
fi

# every launch is stopped by the deadline, 30 s before --minutes are up, which leaves time for the results
DEADLINE=$(( START + $(awk -v m="$MINUTES" 'BEGIN { print int(m * 60) }') - 30 ))
[ $DRY = 0 ] || DEADLINE=$(( START + 86400 ))  # the CPU dry run is a test of the path, not of its time
mkdir -p "$WORK/logs" "$WORK/.marks"

launch() {  # ROW STAGES: one launcher/train.py job (STAGES: one stage or a comma list) under the deadline, timed,
  # its output in logs/ROW-STAGES.log of results.tar.gz
  local row=$1 stage=$2 t0 left rc=0 status=ok log=$WORK/logs/$1-${2//,/-}.log
  t0=$(date +%s) left=$(left)
  if [ $left -lt 45 ]; then
    printf '%s\t%s\t0\tskipped: %ss to the deadline\n' "$row" "$stage" $left >> "$TIMING"
    say "$row: --stage $stage skipped (${left}s to the deadline)"; return 1
  fi
  local cap=()  # a stage-3 launch trains for the configured minutes or until STAGE3_RESERVE before the deadline
  if [[ ,$stage, == *,sella,* ]]; then
    cap=(--set "sella.max_minutes=$(stage3_minutes "$row" "$left")")
  fi
  say "$row: --stage $stage ${cap[*]}"
  if [ $PLAN = 1 ]; then printf '%s\t%s\t0\tplanned\n' "$row" "$stage" >> "$TIMING"; return 0; fi
  (cd "$WORK" && timeout -k 15 $left $PY -m deepspeed.launcher.runner "${LAUNCH[@]}" --master_addr 127.0.0.1 \
      --master_port $(( 29500 + RANDOM % 3000 )) "$REPO/launcher/train.py" --config "$REPO/configs/gpu/comparison/$row.yaml" \
      --stage "$stage" --data "$DATA" "${SETARGS[@]}" "${cap[@]}") > "$log" 2>&1 || rc=$?
  case $rc in 0) ;; 124|137) status="stopped at the deadline";; *) status=failed;; esac
  printf '%s\t%s\t%s\t%s\n' "$row" "$stage" $(( $(date +%s) - t0 )) "$status" >> "$TIMING"
  say "$row: --stage $stage $status in $(( $(date +%s) - t0 ))s"
  pack_results
  [ "$status" = ok ] || { grep -v '^\s*$' "$log" | tail -n 25 | sed "s/^/[$row $stage] /"; return 1; }
}

stage3_minutes() {  # ROW LEFT: the row's configured stage-3 minutes, or (LEFT - STAGE3_RESERVE) / 60 when less
  local conf
  conf=$($PY -c 'import sys; from pipeline.config import load_config; from launcher.config import Config
print(load_config(sys.argv[1], sys.argv[2:], schema=Config).sella.max_minutes or "")' \
    "configs/gpu/comparison/$1.yaml" "${EXTRA[@]}")
  awk -v conf="$conf" -v left="$2" -v reserve=$STAGE3_RESERVE 'BEGIN {
    m = (left - reserve) / 60; if (m < 0.1) m = 0.1; if (conf != "" && conf + 0 < m) m = conf + 0; printf "%.2f", m }'
}

collected() {  # what comes back from the host (8 files at most): summaries, metrics, per-row scores, TensorBoard
  # scalars and the logs of runs/ and logs/ under the working folder; no weights, checkpoints, exports or projector tensors
  local dirs=() d
  for d in runs logs; do if [ -d "$d" ]; then dirs+=("$d"); fi; done
  [ ${#dirs[@]} = 0 ] || find "${dirs[@]}" -type f \( -path '*/ckpt/*' -o -path '*/export/*' -o -path '*/chunks/*' \
    -o -path '*/tb/*/[0-9]*/*' -o -name '*.safetensors' -o -name '*.gguf' \) -prune -o -type f -print
}

pack_results() {  # results.tar.gz of what the launches wrote so far: one lane at a time (flock where the host has
  # it), each packing to its own file, then renaming; a log another lane is writing meanwhile is packed as far as read
  local part=$RESULTS/.results.tar.gz.$BASHPID rc=0
  {
    if command -v flock > /dev/null; then flock 9; fi
    (cd "$WORK" && collected | tar --warning=no-file-changed -czf "$part" -T -) 2> /dev/null || rc=$?
    if [ $rc -le 1 ]; then mv -f "$part" "$RESULTS/results.tar.gz"; else rm -f "$part"; fi  # tar: 1 = changed while read
  } 9> "$WORK/.pack.lock"
}

row() {  # ROW STAGES...: launches in order (each one stage or a comma list), stopping at the first that fails
  local r=$1 stage; shift
  for stage in "$@"; do launch "$r" "$stage" || { say "$r: the row stops at --stage $stage"; return 1; }; done
}

mark() { touch "$WORK/.marks/$1.$2"; }  # NAME ok|failed: what a lane waiting on NAME reads

await() {  # NAME: wait for another lane's mark; fails when that step failed, or at the deadline (a lane that died
  # before its mark must not hold the others until the device call's own timeout)
  until [ -e "$WORK/.marks/$1.ok" ] || [ -e "$WORK/.marks/$1.failed" ]; do
    [ "$(left)" -gt 0 ] || return 1
    sleep 2
  done
  [ -e "$WORK/.marks/$1.ok" ]
}

wanted() {  # ROW: true when --rows lists it
  [[ ,$ROWS, == *,$1,* ]]
}

needs_tables() {  # ROW: false (and the row skipped) when the table kernels failed their check
  [ $TABLES = 1 ] && return 0
  printf '%s\t-\t0\tskipped: needs the table kernels\n' "$1" >> "$TIMING"; return 1
}

skip() {  # ROW STAGE UPSTREAM: a launch left out because a launch it reads (UPSTREAM: "ROW STAGE") failed
  printf '%s\t%s\t0\tskipped: upstream %s failed\n' "$1" "$2" "$3" >> "$TIMING"
  say "$1: --stage $2 skipped: upstream $3 failed"
}

# The rows of configs/gpu/comparison/ as three lanes sharing the GPU, each stage starting as soon as the artifacts
# it reads exist (sharing costs each lane speed: GPU run 5, docs/results.md): SeLLa-Rec's stages in lane 1 (stage 1
# when a listed row reads it, as the others' upstream; stages 2a-2b when sella or sella-no-warm is listed; stage 3
# and its test when sella is),
# popularity, MF, CoLLM-like (MF tables + lane 1's adapter) and text-only in lane 2, and SeLLa-Rec without
# <Warm_ID> (lane 1's aligned tables) in lane 3. Every launch stops at the deadline, so the results always come back;
# a launch whose upstream failed writes its timing line as skipped.
if [ -n "$ROWS" ]; then
{ if ! wanted sella && ! wanted sella-no-warm && ! wanted collm-like && ! wanted text-only; then :  # no row reads stage 1
  elif [ $TABLES = 0 ] && ! wanted text-only; then  # the rows that read stage 1 all need the failed table kernels
    if wanted sella; then needs_tables sella || true; fi  # (lanes 2-3 write the skips of their own rows)
  elif row sella lora; then
    mark lora ok
    if ! wanted sella && ! wanted sella-no-warm; then :  # no listed row reads stages 2a-2b
    elif needs_tables sella && row sella distill,collab; then
      mark collab ok
      if wanted sella; then row sella sella,eval || true; fi
    else
      mark collab failed
      if [ $TABLES = 1 ] && wanted sella; then skip sella sella,eval "sella distill,collab"; fi
    fi
  else
    mark lora failed; mark collab failed
    if wanted sella || wanted sella-no-warm; then skip sella distill,collab "sella lora"; fi
    if wanted sella; then skip sella sella,eval "sella lora"; fi
  fi; } &
LANES=($!)
{ if wanted popularity; then row popularity eval || true; fi
  if wanted mf; then
    MF=failed
    if needs_tables mf && row mf collab,eval; then MF=ok; fi
    if wanted collm-like && needs_tables collm-like; then
      if [ $MF != ok ]; then skip collm-like sella,eval "mf collab,eval"
      elif ! await lora; then skip collm-like sella,eval "sella lora"
      else row collm-like sella,eval || true; fi
    fi
  fi
  if wanted text-only; then
    if await lora; then row text-only eval || true; else skip text-only eval "sella lora"; fi
  fi; } &
LANES+=($!)
{ if wanted sella-no-warm && needs_tables sella-no-warm; then
    if await collab; then row sella-no-warm sella,eval || true; else skip sella-no-warm sella,eval "sella distill,collab"; fi
  fi; } &
LANES+=($!)
wait "${LANES[@]}"  # the lanes only: a plain wait would also wait for the log's tee
fi

bench() {  # NAME SECONDS COMMAND...: one benchmark (it measures its own baseline) when SECONDS fit the deadline
  local name=$1 need=$2 t0 rc=0; shift 2
  if [ "$(left)" -lt "$need" ]; then
    printf '%s\t-\t0\tskipped: %ss to the deadline\n' "$name" "$(left)" >> "$TIMING"; return
  fi
  say "$name: $*"; t0=$(date +%s)
  if [ $PLAN = 1 ]; then printf '%s\t-\t0\tplanned\n' "$name" >> "$TIMING"; return; fi
  timeout -k 15 "$(left)" "$@" > "$WORK/logs/$name.log" 2>&1 || rc=$?
  printf '%s\t-\t%s\t%s\n' "$name" $(( $(date +%s) - t0 )) "$([ $rc = 0 ] && echo ok || echo "failed ($rc)")" \
    >> "$TIMING"
  [ $rc = 0 ] || grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 25 | sed "s/^/[$name] /"
}
if [ $BENCH = 1 ]; then
  if [ $DRY = 0 ]; then
    # stage 1's GPU batch (128 prompts in one micro-batch, bf16, 10 history titles) on both sides, few steps:
    # ZeRO-3 is the slow side on one GPU; the tables at both sizes, over as many steps on the baseline as on the
    # others and a longer warm-up (a GPU step of these tables takes about a millisecond)
    LLM_BENCH=(--micro-batch 128 --grad-accum 1 --steps 5) COLLAB_BENCH=(--steps 200 --plain-steps 200 --warmup 20)
  else  # the same two commands at a smoke-test size, one rank as on a one-GPU host: the tiny model, two steps of
    # two micro-batches; ML-1M-sized tables, two steps
    LLM_BENCH=(--micro-batch 2 --grad-accum 2 --steps 2 --ranks 1)
    COLLAB_BENCH=(--sizes ml-1m --steps 2 --plain-steps 1 --warmup 1 --max-ranks 1)
  fi
  bench bench-llm 240 $PY bench/llm_train.py --config configs/gpu/collm-ml-1m.yaml "${LLM_BENCH[@]}" --data "$DATA" \
    --model "${SETS[0]#llm.model=}" --out "$RESULTS/llm_train.json"
  if needs_tables bench-collab; then
    bench bench-collab 120 $PY bench/collab.py "${COLLAB_BENCH[@]}" --out "$RESULTS/collab.json"
  fi
fi

if [ $PLAN = 1 ]; then cat "$TIMING"; exit 0; fi
say "collecting results"
ROW_CONFIGS=()
for r in "${ROW_LIST[@]}"; do ROW_CONFIGS+=("$REPO/configs/gpu/comparison/$r.yaml"); done
[ -z "$ROWS" ] || (cd "$WORK" && $PY "$REPO/scripts/results_table.py" "${ROW_CONFIGS[@]}" --stages > "$RESULTS/table.md") \
  || say "no results table"
pack_results
cat "$TIMING"
say "done: $RESULTS"
