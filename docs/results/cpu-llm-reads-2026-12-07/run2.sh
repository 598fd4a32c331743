#!/usr/bin/env bash
# The same question for the CoLLM-like row with frozen MF tables (trained at b898741 in /work/wa2): scored without
# history titles at this HEAD, paired with its kept scores (3 titles, scored at b898741; the scorer did not change
# since, and run.sh's reproduction of the SeLLa-Rec row at this HEAD matched its 6987af8 scores to 2e-6).
set -euxo pipefail
R=/work/wt2   # a clean worktree of this HEAD
cd /work/wa3
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
step collm-h0-eval $DS --config configs/collm-frozen-h0.yaml $D --stage eval --set llm.history_titles=0 --allow-config-change
python $R/scripts/results_table.py configs/{popularity,collm-frozen-h0,collm-frozen}.yaml --paired collm-frozen > table-collm-vs-h3.txt
echo ALL DONE
