#!/usr/bin/env bash
# <Warm_ID> ablation on CPU, table-optimizer arm: SeLLa-Rec and SeLLa-Rec without <Warm_ID> with the GPU config's
# fused row-wise Adagrad tables (lr 0.01), on the same upstream and 1,500 fixed test rows as run.sh.
set -euxo pipefail
cd /tmp/wa
until grep -q 'ALL DONE' run2.log; do sleep 30; done
R=/work/main
export PATH=$R/.venv/bin:$PATH
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
for row in sella-adagrad sella-no-warm-adagrad; do
  step $row-sella $DS --config configs/$row.yaml $D --stage sella
  step $row-eval $DS --config configs/$row.yaml $D --stage eval
done
C=$R/configs/comparison
python $R/scripts/results_table.py $C/{popularity,mf,collm-like,sella-no-warm,sella}.yaml configs/{sella-no-warm,sella}-adagrad.yaml --stages --paired sella > table-adagrad-vs-sella.txt
python $R/scripts/results_table.py configs/{sella-no-warm,sella}-adagrad.yaml $C/sella.yaml --paired sella-adagrad > table-adagrad-vs-sella-adagrad.txt
python $R/scripts/results_table.py $C/{popularity,mf,collm-like,sella-no-warm,sella}.yaml configs/{sella-no-warm,sella}-adagrad.yaml --paired popularity > table-adagrad-vs-popularity.txt
echo ALL DONE
