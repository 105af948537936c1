# geomreg: set-up, demo, tests, benchmarks. Every target creates .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch (a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-all bench lint sample-data clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/ensure_system_deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test,dev]"
	@touch $(STAMP)

demo: setup
	@bash scripts/demo.sh

# One torch/OpenMP thread per test process: the tests' problems are small, and on a loaded
# machine two threads made a 300-point registration 10x slower (threads waiting on each other).
# Instead, one test process (pytest-xdist worker) per core, at most 4: on 2 cores the suite
# took 4.5 minutes against 7.4 in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

test-all: setup
	$(PY) -m pip install --quiet -e ".[fuzz]"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m "slow or not slow"

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]" || echo "small_gicp did not install: bench_register skips it"
	$(PY) bench/bench_dense.py
	$(PY) bench/bench_scale.py
	$(PY) bench/bench_grid.py
	$(PY) bench/bench_register.py
	$(PY) bench/bench_nonrigid.py --plots
	$(PY) bench/bench_warp.py
	$(PY) bench/bench_batch.py
	$(PY) bench/bench_las.py

lint: setup
	$(VENV)/bin/ruff check geomreg cli tests bench

sample-data: setup
	$(PY) scripts/make_sample_data.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
