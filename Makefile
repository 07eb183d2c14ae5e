# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs only when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# CPU wheel on these machines; on a GPU machine install the CUDA build of torch first (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m common.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check common bundles tests
	$(VENV)/bin/black --check -q common bundles tests

test: lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix common bundles tests
	$(VENV)/bin/black -q common bundles tests

clean:
	rm -rf $(VENV) demo_output
