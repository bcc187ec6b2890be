# Two quickstart commands: `make demo` (compile the bundled tiny U-Net for every installed target from one
# calibration, then verify every task of every target) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/quadc compile --target all -o out/demo --force
	$(BIN)/quadc verify out/demo

test: $(STAMP)
	$(BIN)/ruff check quadc passes targets tests benchmarks scripts
	$(BIN)/pytest

clean:
	rm -rf $(VENV) out
