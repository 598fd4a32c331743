#!/usr/bin/env bash
# The CoLLM-like row with its MF tables frozen (CoLLM's freeze_rec, the row's recipe since 2026-12-07) and trained
# (the recipe of every earlier CoLLM-like row), on the upstream of run.sh (4-step stage-1 adapter) and the MF tables of
# the plain-MF stage 2b, with the code of /work/exp2 (a worktree of the commit under test); 64 steps (1,024 prompts)
# each, seed 0, scored on the same 1,500 fixed test rows as the other rows of this folder.
set -euxo pipefail
R=/work/exp2
cd /work/wa2
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
step mf-collab-eval $DS --config configs/mf-main.yaml $D --stage collab,eval
for row in collm-frozen collm-trained; do
  step $row-sella $DS --config configs/$row.yaml $D --stage sella
  step $row-eval $DS --config configs/$row.yaml $D --stage eval
done
echo ALL DONE
