# The two commands the README starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-slow bench clean

install: $(VENV)/.installed

# torch first, from the pinned CPU build, so nothing else can pull a CUDA wheel.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

demo: install
	$(BIN)/unclip demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python bench/bench_render.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
