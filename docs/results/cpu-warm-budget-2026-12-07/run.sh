#!/usr/bin/env bash
# <Warm_ID> at two stage-3 budgets on one upstream: SeLLa-Rec and SeLLa-Rec without <Warm_ID>, 64 steps (1,024
# prompts) then resumed to 128 steps (2,048 prompts; constant lr, so the resume continues the same run), each
# scored on the same 1,500 fixed test rows after 64 and after 128 steps. Upstream as in
# docs/results/cpu-warm-ablation-2026-12-06/run.sh (4-step stage-1 adapter, distill, aligned + plain MF tables).
set -euxo pipefail
R=/work/exp   # a worktree of the commit under test
cd /work/wa2
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
C=$R/configs/collm-ml-1m.yaml
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
step prep bash -c "cd $R && spark-submit --driver-memory 4g --driver-java-options -XX:+UseParallelGC pipeline/prep.py --config configs/collm-ml-1m.yaml --overwrite && rm -rf /work/wa2/out && mkdir -p /work/wa2/out && mv out/collm-ml-1m /work/wa2/out/"
step lora $DS --config $C $D --stage lora --set lora.max_steps=4 --set lora.eval_every=0
step distill $DS --config $C $D --stage distill
step collab $DS --config $C $D --stage collab
for row in sella sella-no-warm; do
  cfg=$R/configs/comparison/$row.yaml
  run=$(grep '^run_dir:' $cfg | awk '{print $2}')
  step $row-sella64 $DS --config $cfg $D --stage sella
  step $row-eval64 $DS --config $cfg $D --stage eval
  step $row-copy64 bash -c "rm -rf $run-s64 && cp -r $run $run-s64 && rm -rf $run-s64/sella/ckpt"
done
for row in sella sella-no-warm; do
  cfg=$R/configs/comparison/$row.yaml
  step $row-sella128 $DS --config $cfg $D --stage sella --set sella.max_steps=128
  step $row-eval128 $DS --config $cfg $D --stage eval --set sella.max_steps=128
done
step popularity-eval $DS --config $R/configs/comparison/popularity.yaml $D --stage eval
echo ALL DONE
