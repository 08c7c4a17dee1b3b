# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv first. TORCH is the torch requirement installed before the project: the
# default is the CPU build this workplace keeps on disk; on a GPU machine use e.g. TORCH=torch.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[app,test]"
	touch $@

demo: setup
	$(PY) train.py --demo

# Tests run in worker processes, one per core up to 4 (pytest-xdist), each with one torch thread:
# the tiny models gain nothing from a second thread, and many tests wait on subprocesses.
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Before a lent GPU machine's run (tools/gpu_bench.sh): what its image lacks, as Python 3.12 wheels.
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl bitsandbytes==0.50.2
