#!/usr/bin/env bash
# <Warm_ID> ablation on CPU: SeLLa-Rec, SeLLa-Rec without <Warm_ID>, CoLLM-like, MF and popularity on the same
# 1,500 fixed test rows, one shared upstream (4-step stage-1 adapter, distill, aligned + plain MF tables).
set -euxo pipefail
cd /tmp/wa
ln -sfn /work/main/out out
R=/work/main
export PATH=$R/.venv/bin:$PATH
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
C=$R/configs/collm-ml-1m.yaml
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
step lora $DS --config $C $D --stage lora --set lora.max_steps=4 --set lora.eval_every=0
step distill $DS --config $C $D --stage distill
step collab $DS --config $C $D --stage collab
step collab-mf $DS --config $C $D --stage collab --run-dir runs/collm-ml-1m-mf --set collab.align.weight=0
for row in sella sella-no-warm collm-like; do
  step $row-sella $DS --config $R/configs/comparison/$row.yaml $D --stage sella
  step $row-eval $DS --config $R/configs/comparison/$row.yaml $D --stage eval
done
for row in popularity mf; do step $row-eval $DS --config $R/configs/comparison/$row.yaml $D --stage eval; done
cd /tmp/wa && python $R/scripts/results_table.py $R/configs/comparison/{popularity,mf,collm-like,sella-no-warm,sella}.yaml --stages --paired sella > table-vs-sella.txt
python $R/scripts/results_table.py $R/configs/comparison/{popularity,mf,collm-like,sella-no-warm,sella}.yaml --paired popularity > table-vs-popularity.txt
echo ALL DONE
