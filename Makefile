# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

.PHONY: test demo lint clean

# The package alone: what `make demo` needs.
$(BASE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(BASE_STAMP)

# The test extra too: PyTorch references, diffusers, peft, ruff.
$(STAMP): $(BASE_STAMP)
	# The CPU build of torch lies on disk for this version; any other version pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# JAX_PLATFORMS=cpu: with libtpu installed, jax would otherwise look for a TPU and libtpu print errors.
# -n 2: two pytest workers (pytest-xdist), one per core of the CI machine; most tests are single-threaded
# compiles and subprocess start-ups, so two at a time take about three quarters of the serial time.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check sd3_jax tests bench experiments
	$(BIN)/ruff format --check sd3_jax tests bench experiments

demo: $(BASE_STAMP)
	$(BIN)/python -m sd3_jax.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
