#!/usr/bin/env bash
# And the target title: the same SeLLa-Rec model (seed 2) scored on a copy of the prep output whose test rows carry
# another row's target title (shuffle_histories.py ... title, seed 0; the item id, and so the injected rows, kept).
set -euxo pipefail
R=/work/wt2   # a clean worktree of this HEAD
cd /work/wa3
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
[ -d out-titles ] || python shuffle_histories.py out/collm-ml-1m out-titles 0 title
step titles-eval $DS --config configs/sella-seed2-titles.yaml --data out-titles --stage eval
python $R/scripts/results_table.py configs/{popularity,sella-seed2-h0,sella-seed2-shuf,sella-seed2-titles,sella-seed2-h3}.yaml --paired sella-seed2-h3 > table-all-vs-h3.txt
echo ALL DONE
