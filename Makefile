# Two quickstart commands: `make demo` (compile the bundled tiny U-Net) and `make test`.
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
	$(BIN)/quadc compile -o out/demo --force

test: $(STAMP)
	$(BIN)/ruff check quadc passes targets tests benchmarks scripts
	$(BIN)/pytest

clean:
	rm -rf $(VENV) out
