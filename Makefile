# One-command set-up on a fresh machine: `make demo` and `make test` build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned: an unpinned torch pulls a multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 1

.PHONY: test demo bench lint format clean docs wheel-check

$(STAMP): pyproject.toml setup.cfg
	@echo "Creating $(VENV) (once; a few minutes on a fresh machine)."
	$(PYTHON) -m venv $(VENV)
	@echo "Installing $(TORCH) (about 1 GB with its CUDA libraries) ..."
	$(PY) -m pip install -q $(TORCH)
	@echo "Installing nir-loss with its [dev] extra (PML, normflows, test, docs and lint tools) ..."
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q
	$(MAKE) docs wheel-check

# The documentation site, built strictly (any warning fails) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# Release readiness: sdist + wheel, PyPI metadata check, and the wheel alone (in a fresh venv)
# importing and running the quick start.
wheel-check: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(PY) scripts/check_wheel.py dist/*.whl

# ProxyAnchor vs ProxyAnchor+NIR on held-out classes of sklearn's digits, 5 paired seeds (offline, under a minute).
demo: $(STAMP)
	$(PY) examples/demo.py --dataset digits --out runs/demo

# The benchmarks of docs/benchmarks.md (long: not tests). Needs the FrEIA and data-set extras.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[benchmarks,datasets]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/speed.py $(BENCH_ARGS)
	$(PY) benchmarks/quality.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# Formats the code in place ([tool.ruff.format] in pyproject.toml); `ruff format --diff` shows it first.
format: $(STAMP)
	$(PY) -m ruff format $(or $(FILES),.)

clean:
	rm -rf $(VENV) build dist site *.egg-info
