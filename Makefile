# `make run`: set up .venv and run the whole pipeline (dvc repro) on the selection in params.yaml.
# `make test`: set up .venv and run the test suite.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: run test setup inspect

$(VENV)/.installed: pyproject.toml setup.sh
	bash setup.sh
	touch $@

setup: $(VENV)/.installed

run: setup
	dvc repro
	python -m pipeline inspect

test: setup
	python -m pytest -q -ra --durations=15

inspect: setup
	python -m pipeline inspect
