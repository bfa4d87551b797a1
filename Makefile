# Two entry points (see README): `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test bench spm clean

# Re-installs whenever pyproject.toml changes. torch==2.13.0 is the CPU wheel on local disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Main job on the embedded defaults: a local PACS, the node (SQLite, shipped checkpoint) and a sample
# study sent over DICOM; prints the findings and timings, writes demo-output/summary.png.
demo: venv
	$(VENV)/bin/uad-node demo --out demo-output

# Two pytest workers (pytest-xdist), a test file each at a time: module fixtures stay in one process, and the
# suite's single-threaded peers and analyses use both cores. `pytest -n 0` runs it in one process.
test: venv
	$(PY) -m pytest -n 2 --dist loadfile

bench: venv
	$(PY) tests/benchmarks/bench_receive.py
	$(PY) tests/benchmarks/bench_preprocess.py

# Optional training data (models/data/spm_templates.py): SPM's templates from PyPI spm-runtime (82 MB). Only its data
# archive is read; --no-deps leaves out the MATLAB runtime installer it depends on, which nothing here runs.
spm: venv
	$(PY) -m pip install --quiet --no-deps spm-runtime==25.1.2.post4

clean:
	rm -rf $(VENV) uad-data demo-output .pytest_cache
