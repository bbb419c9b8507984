# The two commands of the README: `make train` and `make test`. Both set up first.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.orc_fast-installed
# nvcc on the PATH may be a wrapper script, from which torch guesses the wrong CUDA home.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
PIP_DEPS  := torch==2.14.1 torchvision==0.29.1 scikit-learn pytest pytest-benchmark hypothesis \
             ninja pyyaml matplotlib numpy tensorboard ruff==0.17.6 transformers==5.24.0
SOURCES   := Makefile setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: setup lint test bench train fuzz clean

setup: $(STAMP)

# Re-runs only when the build inputs change, so a second `make setup` is quick.
# ORC_FAST_REQUIRE_EXTENSION=1: a C++/CUDA compile error fails the setup (and so `make
# test` and CI) instead of installing a reference-only package whose cpu tests skip; a
# plain `pip install .` still falls back, with a warning (setup.py).
$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_DEPS)
	ORC_FAST_REQUIRE_EXTENSION=1 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e .
	$(PY) -c "import orc_fast; print('orc_fast backends here:', orc_fast.available_backends())"
	touch $(STAMP)

# ruff's settings are in pyproject.toml; CI runs this before the tests.
lint: setup
	$(PY) -m ruff check .

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

# the long fuzzing profile (CI runs the short, fixed-seed one inside `make test`)
fuzz: setup
	ORC_FAST_FUZZ_PROFILE=dev $(PY) -m pytest -q tests/test_fuzz.py

train: setup
	$(PY) -m orc_fast.train

clean:
	rm -rf build *.egg-info orc_fast/_C*.so
