#!/usr/bin/env bash
# The shuffled-history control for the CoLLM-like row (frozen MF tables, trained at b898741): scored at this HEAD on
# run3.sh's copy of the prep output (another row's history), paired with its kept scores (as run2.sh).
set -euxo pipefail
R=/work/wt2   # a clean worktree of ecba4b1
cd /work/wa3
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
step collm-shuf-eval $DS --config configs/collm-frozen-shuf.yaml --data out-shuffled --stage eval
python $R/scripts/results_table.py configs/{popularity,collm-frozen-h0,collm-frozen-shuf,collm-frozen}.yaml --paired collm-frozen > table-collm-all.txt
echo ALL DONE
