# gemma-mlx: every target installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST := $(PYTHON) -m pytest
comma := ,
EXTRAS := $(if $(filter Linux,$(shell uname -s)),cpu$(comma),)test

.PHONY: install test test-slow bench demo blas

install: blas
	$(PIP) install -q -e ".[$(EXTRAS)]"

# The mlx[cpu] wheel ships a reference BLAS; OpenBLAS makes fp32 matmuls ~20-60x faster (see README).
blas:
	@if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
		echo "installing libopenblas0-pthread"; \
		(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null || echo "could not install OpenBLAS (MLX will use its slow reference BLAS)"; \
	fi

test: install
	$(PYTEST) -q

test-slow: install
	$(PYTEST) -q -m slow

bench: install
	$(PIP) install -q -e ".[$(EXTRAS),bench]"
	$(PYTHON) -m bench.run
	$(PYTHON) -m bench.batch

# Gemma 4 E2B + its assistant from the hub (converted once into ~/.cache/gemma-mlx): one answer with MTP, one without.
demo: install
	$(PYTHON) -m gemma_mlx.cli generate --prompt "Explain speculative decoding in two sentences." --max-tokens 96
	$(PYTHON) -m gemma_mlx.cli generate --prompt "Explain speculative decoding in two sentences." --max-tokens 96 --drafter none
