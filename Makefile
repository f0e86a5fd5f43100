# Two entry points: `make demo` (set up, then run the pipeline on the tiny model) and `make test`.
# `make test-fast` skips the tests marked slow (whole-pipeline runs, fault scenarios); `make docs` builds the site.
# Both test targets hold the run to its process budget (tests/process_budget.json: whole-pipeline runs and torch processes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast docs compile bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dreambooth run --config tiny --subjects examples/subjects.yaml --output-dir outputs

# Two workers; tests that share a fixed port (the manifest's MLflow) stay on one (xdist_group).
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder

test: setup
	$(PYTEST) --process-budget=test

test-fast: setup
	$(PYTEST) -m "not slow" --process-budget=test-fast

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

compile: setup
	$(BIN)/dreambooth compile --config sd15 --output dreambooth.yaml

bench: setup
	$(BIN)/python bench/finetune_bench.py
	$(BIN)/python bench/evaluation_bench.py
	$(BIN)/python bench/batch_bench.py

clean:
	rm -rf outputs mlruns mlflow.db mlflow-artifacts dreambooth.yaml site
