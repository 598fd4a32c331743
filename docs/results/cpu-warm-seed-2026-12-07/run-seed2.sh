#!/usr/bin/env bash
# The <Warm_ID> ablation again with stage 3's seed 2 (projector init and data order), on the upstream of run.sh
# (the same stage-1 adapter, semantic vectors and tables): 64 steps (1,024 prompts) each, scored on the same
# 1,500 fixed test rows. Seed 0 is run.sh's sella64 / sella-no-warm64.
set -euxo pipefail
R=/work/exp   # the worktree of 6987af8 that run.sh used
cd /work/wa2
export PATH=$R/.venv/bin:$PATH SPARK_LOCAL_IP=127.0.0.1 PYTHONPATH=$R
DS="deepspeed --hostfile $R/scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1 $R/launcher/train.py"
D="--data out/collm-ml-1m"
step() { local name=$1; shift; [ -f done.$name ] && return 0; local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> times.tsv; touch done.$name; }
for row in sella sella-no-warm; do
  cfg=configs/$row-seed2.yaml
  step $row-seed2-sella $DS --config $cfg $D --stage sella
  step $row-seed2-eval $DS --config $cfg $D --stage eval
done
echo ALL DONE
