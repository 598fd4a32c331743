#!/usr/bin/env bash
# The control for run.sh's no-history scoring: the same SeLLa-Rec model (seed 2) scored on a copy of the prep output
# whose test rows carry another row's history (shuffle_histories.py, seed 0), prompts otherwise as trained (3 titles).
set -euxo pipefail
R=/work/wt2   # a clean worktree of this HEAD
cd /work/wa3
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
[ -d out-shuffled ] || python shuffle_histories.py out/collm-ml-1m out-shuffled 0
step shuf-eval $DS --config configs/sella-seed2-shuf.yaml --data out-shuffled --stage eval
python $R/scripts/results_table.py configs/{popularity,sella-seed2-h0,sella-seed2-shuf,sella-seed2-h3}.yaml --paired sella-seed2-h3 > table-shuf-vs-h3.txt
python $R/scripts/results_table.py configs/{popularity,sella-seed2-h3,sella-seed2-shuf}.yaml --paired sella-seed2-shuf > table-vs-shuf.txt
echo ALL DONE
