# Two entry points: `make demo` (set up, then run the pipeline on the tiny model) and `make test`.
# `make test-fast` skips the tests marked slow (whole-pipeline runs, fault scenarios); `make docs` builds the site.
# Both test targets hold the run to its process budget (tests/process_budget.json: whole-pipeline runs and torch processes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast docs compile bench install-check clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet -e . -c requirements.txt
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

# The package as a user installs it: a wheel into a fresh venv, its declared dependencies held to the
# pins, then the everyday commands from a folder away from this checkout (CI runs it; ~3 min).
INSTALL_CHECK := build/install-check
install-check: setup
	rm -rf dist $(INSTALL_CHECK) && mkdir -p $(INSTALL_CHECK)/work
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .
	$(PYTHON) -m venv $(INSTALL_CHECK)/venv
	$(INSTALL_CHECK)/venv/bin/pip install --quiet dist/*.whl -c requirements.txt
	cd $(INSTALL_CHECK)/work && ../venv/bin/dreambooth --help >/dev/null \
		&& ../venv/bin/dreambooth compile --config tiny --output tiny.yaml \
		&& ../venv/bin/dreambooth run --config tiny --subject-dir $(CURDIR)/examples/subjects/dog --class-noun dog --output-dir outputs

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

compile: setup
	$(BIN)/dreambooth compile --config sd15 --output dreambooth.yaml

bench: setup
	$(BIN)/python bench/finetune_bench.py
	$(BIN)/python bench/evaluation_bench.py
	$(BIN)/python bench/batch_bench.py
	$(BIN)/python bench/cpu_step_bench.py

clean:
	rm -rf outputs mlruns mlflow.db mlflow-artifacts dreambooth.yaml site dist build
