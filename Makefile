# Two commands do all set-up on a fresh machine:  `make demo` (the main job)  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
TARGET ?= cpu
export PATH := $(abspath $(VENV))/bin:$(PATH)
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYTHONPATH := $(CURDIR)
# The collector: pipeline/spark.py (DRIVER_JAVA_OPTIONS) says why.
SUBMIT := spark-submit --driver-memory 4g --driver-java-options -XX:+UseParallelGC
DEEPSPEED := deepspeed --hostfile scripts/hostfile.local --no_ssh_check --master_addr 127.0.0.1

.PHONY: setup demo test test-fast prep-ml1m prep-collm lora-collm collab-collm results-collm gpu-payload bench-prep bench-llm bench-stream bench-sella bench-collab clean

setup:                      ## create .venv with the pinned stack and fetch the embedded default assets
	scripts/setup.sh $(TARGET)

demo: setup                 ## main job on the embedded default (ML-100K from the recbole wheel, SmolLM2-135M): prep, then every stage
	$(SUBMIT) pipeline/prep.py --config configs/ml-100k.yaml --output out/ml-100k --overwrite
	$(DEEPSPEED) launcher/train.py --config configs/ml-100k.yaml --stage all --fresh

test: setup                 ## the test suite (what .ci/run calls), on 2 workers that each run whole files
	python -m pytest -q -n 2 --dist loadfile tests

test-fast: setup            ## the unit tests that start neither Spark nor a subprocess (CI runs everything)
	python -m pytest -q -m "not integration" tests

prep-ml1m: setup            ## ML-1M raw files from ../shared/data (users 1-2,999)
	$(SUBMIT) pipeline/prep.py --config configs/ml-1m.yaml --overwrite

prep-collm: setup           ## CoLLM's published ML-1M benchmark splits
	$(SUBMIT) pipeline/prep.py --config configs/collm-ml-1m.yaml --overwrite

lora-collm: setup           ## stage 1 (LoRA, SmolLM2) on CoLLM's ML-1M splits, 2 ranks (after prep-collm)
	$(DEEPSPEED) launcher/train.py --config configs/collm-ml-1m.yaml --stage lora

collab-collm: setup         ## stages 2a + 2b on CoLLM's ML-1M splits: distill (SmolLM2), aligned MF, plain MF (after lora-collm)
	$(DEEPSPEED) launcher/train.py --config configs/collm-ml-1m.yaml --stage distill
	$(DEEPSPEED) launcher/train.py --config configs/collm-ml-1m.yaml --stage collab
	$(DEEPSPEED) launcher/train.py --config configs/collm-ml-1m.yaml --stage collab \
	    --run-dir runs/collm-ml-1m-mf --set collab.align.weight=0

ROWS := popularity mf text-only collm-like sella-no-warm sella
results-collm: setup        ## every comparison row on CoLLM's ML-1M splits, then the table in docs/results.md (after collab-collm)
	for row in $(ROWS); do \
	    case $$row in popularity|mf|text-only) ;; *) $(DEEPSPEED) launcher/train.py --config configs/comparison/$$row.yaml --stage sella || exit 1;; esac; \
	    $(DEEPSPEED) launcher/train.py --config configs/comparison/$$row.yaml --stage eval || exit 1; \
	done
	python scripts/results_table.py $(addprefix configs/comparison/,$(addsuffix .yaml,$(ROWS))) --write docs/results.md \
	    --figure docs/figures/comparison.png

gpu-payload: setup         ## the parts to carry to the offline GPU host, printed in sending order (then scripts/gpu/run.sh there)
	test -f out/collm-ml-1m/manifest.json || $(SUBMIT) pipeline/prep.py --config configs/collm-ml-1m.yaml --overwrite
	test -f out/ml-100k/manifest.json || $(SUBMIT) pipeline/prep.py --config configs/ml-100k.yaml --output out/ml-100k --overwrite
	python scripts/gpu/payload.py build

bench-prep: setup           ## pipeline benchmark vs pandas (see docs/benchmarks.md)
	python bench/prep.py

bench-llm: setup            ## stage-1 tokens/s vs HF Trainer + PEFT, memory ZeRO-3 vs ZeRO-0 (after prep-collm)
	python bench/llm_train.py

bench-stream: setup         ## stage-1 stream: a rank's cost per global micro-batch at 1/2/8 ranks, packing by length_key (after prep-collm)
	python bench/stage1_stream.py

bench-sella: setup          ## stage-3 and eval prompts/s: the old settings against ZeRO auto, the authors' recipe, 3 titles (after prep-collm)
	python bench/sella.py

bench-collab: setup         ## stage-2b samples/s vs plain PyTorch MF, memory per rank 1 vs 2 ranks
	python bench/collab.py

clean:
	rm -rf out .cache/data
