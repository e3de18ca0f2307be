# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
# torch is installed first from its pinned build, so nothing later pulls in another torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.easyref-installed

.PHONY: setup constraints demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "setup: virtual environment $(VENV) ($$($(PYTHON) --version)), created if missing"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: upgrading pip in $(VENV)"
	@$(PY) -m pip install --quiet --upgrade pip
	@echo "setup: installing $(TORCH_SPEC) first (the largest download), so nothing later pulls in another torch"
	@$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	@echo "setup: installing easyref (editable) with the dev and pipeline extras: diffusers, transformers, mlflow, kfp, dvc, pytest, ..."
	@$(PY) -m pip install --quiet -e ".[dev,pipeline]"
	@echo "setup: done ($$($(PY) -m pip list --format=freeze 2>/dev/null | wc -l) packages in $(VENV)); it reruns only when pyproject.toml changes"
	@touch $@

## infra/constraints.txt: the exact versions of the tested environment (pip freeze, without easyref itself and with
## torch's local build label dropped so the CUDA build matches), which the image installs under (infra/Dockerfile).
constraints: setup
	@echo "# pip freeze of the environment the tests pass in (make constraints); used by infra/Dockerfile" > infra/constraints.txt
	$(PY) -m pip freeze --exclude-editable | grep -v -i '^easyref' | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+.*/\1/' >> infra/constraints.txt

## The main job on the tiny profile: the whole pipeline (dvc.yaml) from tiny models to a promoted model. One
## EASYREF_PIPELINE_RUN per `make demo`: the stages' MLflow runs nest under one run of that id (src/easyref/runs.py).
demo: setup
	EASYREF_PIPELINE_RUN="$${EASYREF_PIPELINE_RUN:-dvc-$$(date -u +%Y%m%d-%H%M%S)}" \
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	@echo ""
	@echo "Done. Where to look:"
	@echo "  evaluation report:  outputs/eval/report.html   (metrics: outputs/eval/metrics.json, dvc metrics show)"
	@cat outputs/register.txt
	@if grep -q "@champion ->" outputs/register.txt; then \
		echo "  registered model:   models:/easyref@champion   (outputs/register.txt)"; \
	else \
		echo "  registered model:   models:/easyref@challenger (the gate kept it from @champion: see the lines above)"; \
	fi
	@echo "  MLflow UI:          $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then http://127.0.0.1:5000; experiment easyref-pipeline: one run per make demo, the stages nested)"
	@echo "  loss curves:        $(VENV)/bin/dvc plots show   (outputs/runs/*/loss.csv; offline: outputs/runs/*/loss.png)"
	@echo "  keep this result:   git add dvc.lock && git commit -m 'demo result'   (and $(VENV)/bin/dvc push with a remote)"
	@echo "  the commands:       source $(VENV)/bin/activate   (or call them as $(VENV)/bin/easyref, $(VENV)/bin/dvc, ...)"

## The whole test suite (slow end-to-end tests included), on TEST_WORKERS processes (pytest-xdist; the slow tests
## are scheduled first and handed out one test at a time, so both workers share them and the run ends with short tests).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1

## The test suite without the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -m "not slow"

## ruff, then the import contracts of pyproject.toml [tool.importlinter]: the package's layers, no import circles
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks components pipelines
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) models/tiny outputs .pytest_cache
