#!/usr/bin/env bash
# What stage 3's LLM reads: the SeLLa-Rec model of the seed section (seed 2, trained at 6987af8 in /work/wa2) scored
# again at this repository's HEAD on the same 1,500 test rows, once with the prompt it trained with (3 history
# titles) and once without history titles (llm.history_titles=0 at scoring only). Nothing is retrained.
set -euxo pipefail
R=/work/wt2   # a clean worktree of this HEAD
cd /work/wa3
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
git -C $R rev-parse HEAD > head.txt
step h3-eval $DS --config configs/sella-seed2-h3.yaml $D --stage eval
step h0-eval $DS --config configs/sella-seed2-h0.yaml $D --stage eval --set llm.history_titles=0 --allow-config-change
python $R/scripts/results_table.py configs/{popularity,sella-seed2,sella-seed2-h0,sella-seed2-h3}.yaml --paired sella-seed2-h3 > table-vs-h3.txt
python $R/scripts/results_table.py configs/{popularity,sella-seed2,sella-seed2-h0,sella-seed2-h3}.yaml --paired popularity > table-vs-popularity.txt
echo ALL DONE
