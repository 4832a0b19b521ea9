# Two commands on a fresh machine: `make demo` and `make test`. Every install step lives here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the package with its test extras

# The conv path on real MNIST (patch training, pooled extraction, probe, dashboards). In-memory
# Beam: on 2 cores, starting worker processes (each importing TensorFlow) costs more than they save.
DEMO_FLAGS ?= --input builtin:mnist --preset mnist-conv --eval-fraction 0.25 --pool 2x2 \
	--direct_running_mode=in_memory

demo: setup  ## the whole pipeline on builtin:mnist, conv path: $(DEMO)/report.html (resumes if rerun)
	$(BIN)/sae run $(DEMO_FLAGS) --workdir $(DEMO)

# Two pytest-xdist workers, one test module each at a time (--dist loadfile: a module's
# fixtures, such as a job server or a trained model, are built once, in one worker), the
# longest modules first (tests/conftest.py LONG_MODULES; --no-loadscope-reorder keeps that
# order). The session fixtures in tests/conftest.py are built once and shared; each worker
# runs its own GCS emulator. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup  ## the whole suite, slow end-to-end tests included (as CI runs it)
	$(BIN)/ruff check .
	$(PYTEST)

test-fast: setup  ## skip the slow end-to-end tests
	$(PYTEST) -m 'not slow'

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup  ## every benchmark; each prints JSON (installs the CPU PyTorch the train benchmark compares with)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	for b in benchmarks/*_bench.py; do $(BIN)/python $$b --out $$b.json || exit 1; done
	$(BIN)/python benchmarks/preprocess_bench.py --mode photo --out benchmarks/preprocess_bench.py.photo.json

clean:
	rm -rf $(VENV) runs .pytest_cache
