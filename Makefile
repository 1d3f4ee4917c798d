# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, build the demo shards, train on CPU (or GPU), sample, evaluate
#               (ARGS='run.seed=1' passes overrides to training)
#   make test   create .venv, install, run the tests
#   make test-full  the same with the heavy matrices switched on (full elastic and SP-training matrices,
#               every simulator policy at mid size, truncated-file and frozen-node variants)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
STAMP := $(VENV)/.installed

.PHONY: demo test test-full install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch from local disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/train.py experiment=demo run.dir=$(RUN) $(ARGS)
	$(BIN)/python launch/sample.py run.dir=$(RUN) sample.out_dir=$(RUN)/samples/eval
	$(BIN)/python benchmarks/demo_eval.py $(RUN)/samples/eval --out $(RUN)/samples/eval/demo_eval.json
	$(BIN)/python benchmarks/demo_i2v_eval.py $(RUN) --samples $(RUN)/samples/i2v --out $(RUN)/samples/i2v/demo_i2v_eval.json
	@echo "contact sheets: $(RUN)/samples/eval/contact_sheet.png (text-to-video), $(RUN)/samples/i2v/contact_sheet.png (image-to-video)"

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs --durations=25

test-full: $(STAMP)
	VGEN_FULL=1 VGEN_SP_TRAIN_FULL=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs --durations=25

clean:
	rm -rf $(VENV) runs data_cache
