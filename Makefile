# Two entry points (see README): `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test bench clean

# Re-installs whenever pyproject.toml changes. torch==2.13.0 is the CPU wheel on local disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Main job on the embedded defaults. Until the end-to-end demo lands, this runs the receiver
# on config/node.toml (127.0.0.1:11112, data in ./uad-data); stop it with Ctrl-C.
demo: venv
	$(VENV)/bin/uad-node serve --config config/node.toml

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) tests/benchmarks/bench_receive.py
	$(PY) tests/benchmarks/bench_preprocess.py

clean:
	rm -rf $(VENV) uad-data .pytest_cache
