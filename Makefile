# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
# torch is installed first from its pinned build, so nothing later pulls in another torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.easyref-installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,pipeline]"
	touch $@

## The main job on the tiny profile.
demo: setup
	$(VENV)/bin/easyref tiny-models --out models/tiny
	$(VENV)/bin/easyref demo-data --out data/raw
	$(VENV)/bin/easyref generate --base models/tiny \
	    --ref data/raw/red-star/000.png --ref data/raw/red-star/001.png --ref data/raw/red-star/002.png \
	    --prompt "a red star on a plain background" --seed 0 --steps 30 --out outputs/demo/generated.png
	@echo "Generated image: outputs/demo/generated.png"

## The whole test suite (slow end-to-end tests included).
test: setup
	$(PY) -m pytest -q

## The test suite without the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) models/tiny outputs .pytest_cache
