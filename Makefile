# The two commands of the README:
#   make demo   set-up + the main job (distill scikit-learn's digits end to end on this CPU)
#   make test   set-up + the test suite
# Both create .venv when no virtual environment is active, and are fast on a second run
# (stamp files; the C++ extension is rebuilt by ninja only when csrc/ changes).

# Torch to install when none is present. CUDA users: make TORCH_SPEC="torch==2.11.0" test (or
# install torch yourself first: an installed torch is never replaced).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
VENV_STAMP :=
else
PY := .venv/bin/python
VENV_STAMP := .venv/bin/python
endif

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install build test test-all demo bench lint clean

.venv/bin/python:
	python3 -m venv .venv

.venv/.torch-stamp: $(VENV_STAMP)
	@mkdir -p .venv
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install "$(TORCH_SPEC)"
	@touch $@

.venv/.install-stamp: .venv/.torch-stamp setup.py pyproject.toml $(EXT_SOURCES)
	$(PY) -m pip install --no-build-isolation -e ".[test,plot,triton]"
	@touch $@

install: .venv/.install-stamp

# Rebuild the C++ extension in place (used while developing csrc/).
build: .venv/.torch-stamp
	$(PY) setup.py build_ext --inplace

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

demo: install
	$(PY) -m haba_fast.cli distill --out runs/demo

bench: install
	$(PY) -m pytest -q bench --benchmark-json bench/results/pytest-benchmark.json

lint: install
	$(PY) -m ruff check haba_fast kernels tests bench

clean:
	rm -rf build *.egg-info haba_fast/*.so .venv/.install-stamp
