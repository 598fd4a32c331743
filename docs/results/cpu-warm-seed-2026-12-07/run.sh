#!/usr/bin/env bash
# The <Warm_ID> ablation again with stage 3's seeds 1 and 2 (projector init and data order), on the upstream of
# ../cpu-warm-budget-2026-12-07/run.sh (the same stage-1 adapter, semantic vectors and tables): 64 steps (1,024
# prompts) each, scored on the same 1,500 fixed test rows. Seed 0 is that script's sella64 / sella-no-warm64.
# Ran as `run.sh 1`, then `run.sh 2` (as two copies of this script with the seed written in; configs/<row>-seed<N>.yaml:
# the comparison row plus `sella: {seed: N}`).
set -euxo pipefail
R=/work/exp   # the worktree of 6987af8 that the budget script used
cd /work/wa2
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
for seed in "$@"; do
  for row in sella sella-no-warm; do
    cfg=configs/$row-seed$seed.yaml
    step $row-seed$seed-sella $DS --config $cfg $D --stage sella
    step $row-seed$seed-eval $DS --config $cfg $D --stage eval
  done
done
echo ALL DONE
