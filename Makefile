# The two commands of the README:
#   make demo   set-up + the main job (distill scikit-learn's digits end to end on this CPU)
#   make test   set-up + the test suite
# Both create .venv when no virtual environment is active, and are fast on a second run
# (stamp files; the C++ extension is rebuilt by ninja only when csrc/ changes).

# Torch to install when none is present (an installed torch is never replaced; the extension is built against it):
#   make test                 torch==$(TORCH_VERSION) from pip's configured index. On Linux x86-64, PyPI's wheel is
#                             the CUDA build (several GB, with the CUDA libraries).
#   make test TORCH=cpu       the CPU wheel, from https://download.pytorch.org/whl/cpu
#   make test TORCH=cu128     a CUDA build, from https://download.pytorch.org/whl/cu128 (any tag that index serves)
#   make test TORCH_SPEC="torch==2.11.0"   another version (combines with TORCH=...)
TORCH ?=
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
ifeq ($(strip $(TORCH)),)
TORCH_INDEX :=
TORCH_FROM := pip's configured index (on Linux x86-64 PyPI serves the CUDA build; make TORCH=cpu for the CPU wheel)
else
TORCH_INDEX := --index-url https://download.pytorch.org/whl/$(TORCH)
TORCH_FROM := https://download.pytorch.org/whl/$(TORCH)
endif
# Extras installed with the package. Triton's extra is empty where Triton has no wheels (see pyproject.toml);
# TRITON=0 leaves it out everywhere.
TRITON ?= 1
comma := ,
EXTRAS := test,plot$(if $(filter 1,$(TRITON)),$(comma)triton)
PYTEST_ARGS ?=

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
VENV_STAMP :=
else
PY := .venv/bin/python
VENV_STAMP := .venv/bin/python
endif

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install build test test-all test-packaging dist demo bench lint clean

.venv/bin/python:
	python3 -m venv .venv

.venv/.torch-stamp: $(VENV_STAMP)
	@mkdir -p .venv
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)') (kept; the extension is built against it)"; \
	else \
		echo "installing $(TORCH_SPEC) from $(TORCH_FROM)"; \
		$(PY) -m pip install "$(TORCH_SPEC)" $(TORCH_INDEX); \
	fi
	@touch $@

# --no-build-isolation: the C++ extension is compiled against the torch installed above (an isolated build
# would see none and stops with a message; see setup.py).
.venv/.install-stamp: .venv/.torch-stamp setup.py pyproject.toml $(EXT_SOURCES)
	@echo "installing haba-fast[$(EXTRAS)] (editable) and building its C++ extension against torch $$($(PY) -c 'import torch; print(torch.__version__)')"
	$(PY) -m pip install --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $@

install: .venv/.install-stamp

# Rebuild the C++ extension in place (used while developing csrc/).
build: .venv/.torch-stamp
	$(PY) setup.py build_ext --inplace

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Build the sdist and wheel, install them into fresh environments, run them (a few minutes: one compile).
test-packaging: install
	$(PY) -m pytest -q -m packaging tests/test_packaging.py $(PYTEST_ARGS)

# sdist + wheel (built from the sdist) into dist/, against the installed torch.
dist: install
	$(PY) -m build --no-isolation --outdir dist .

test-all: install
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

demo: install
	$(PY) -m haba_fast.cli distill --out runs/demo

bench: install
	$(PY) -m pytest -q bench --benchmark-json bench/results/pytest-benchmark.json

lint: install
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install ruff
	$(PY) -m ruff check haba_fast kernels tests bench

clean:
	rm -rf build dist *.egg-info haba_fast/*.so haba_fast/_build_info.py .venv/.install-stamp
