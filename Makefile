# PromptDev: `make run` serves the workbench, `make test` runs the suite. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8501
STAMP  := $(VENV)/.installed
# llama-cpp-python compiles llama.cpp from source (about 5-8 minutes once; pip caches the wheel).
# A portable AVX2 build: a native build enables AMX on CPUs that have it, and llama.cpp's AMX kernels
# crash (SIGSEGV in ggml_backend_amx_mul_mat) on the machines we run on.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF

.PHONY: run test lint setup install bench worker clean-data chromium

run: setup  # the app process also runs a background worker for submitted executions and evaluation runs
	$(BIN)/promptdev serve --port $(PORT)  # streamlit run app.py on PROMPTDEV_ADDRESS (default 127.0.0.1)

test: setup chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The browser test drives Debian's chromium (Playwright is told its path: no browser download). Installed when
# missing (apt-get, as root); if it cannot be, the test is skipped and says why.
chromium:
	@test -x /usr/bin/chromium || { apt-get update && apt-get install -y chromium; } \
		|| echo "chromium could not be installed: tests/browser will be skipped"

# ruff over the whole tree (rules in pyproject.toml).
lint: install
	$(BIN)/ruff check .

# Model assembled, embedded Postgres started, migrations applied (idempotent: seconds on a second run).
setup: install
	$(BIN)/promptdev setup

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

worker: setup
	$(BIN)/promptdev worker

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
