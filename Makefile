# The two commands: `make study` and `make test`. Both create/refresh .venv first and are
# idempotent: a second call reinstalls nothing unless pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SPACE ?= search_spaces/mnist_quick.yaml
NAME ?= $(basename $(notdir $(SPACE)))
DATASET ?= mnist

.PHONY: study test venv data lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# pip takes torch==2.14.1 / torchvision==0.29.1 from this machine's local disk.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

data: venv
	$(BIN)/adadpigu data fetch $(DATASET)

study: data
	$(BIN)/adadpigu study launch $(SPACE) --name $(NAME) --out studies

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check adadpigu study reports tests benchmarks

clean-venv:
	rm -rf $(VENV)
