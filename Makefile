# One entry point for humans and CI. `make test` works on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export SPEFT_DATA_DIR ?= $(abspath ../shared/data)
export SPEFT_MODELS_DIR ?= $(abspath ../shared/models)

.PHONY: install run test test-quick bench clean

install: $(STAMP)

# torch first (the pinned CPU wheel), then the project with its dev extras.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# API + worker in the foreground on the embedded default (SQLite, ./var/storage, embedded
# broker); Ctrl-C stops both. `make run PORT=8080 HOST=127.0.0.1` (or SPEFT_PORT / SPEFT_HOST).
HOST ?=
PORT ?=
run: install
	$(PY) -m api.cli run $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) var .pytest_cache
