# Two entry points: `make demo` (set up, then run the pipeline on the tiny model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test compile bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python pipeline.py run --config tiny --subjects examples/subjects.yaml --output-dir outputs

test: setup
	$(BIN)/python -m pytest

compile: setup
	$(BIN)/python pipeline.py compile --config sd15 --output dreambooth.yaml

bench: setup
	$(BIN)/python bench/finetune_bench.py
	$(BIN)/python bench/evaluation_bench.py
	$(BIN)/python bench/batch_bench.py

clean:
	rm -rf outputs mlruns mlflow.db mlflow-artifacts dreambooth.yaml
