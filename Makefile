# The two commands the README starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-slow bench clean chromium

install: $(VENV)/.installed

# torch first, from the pinned CPU build, so nothing else can pull a CUDA wheel.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

demo: install
	$(BIN)/unclip demo

test: install chromium
	$(BIN)/python -m pytest -q

# The page test (tests/test_server_page.py) drives Debian's Chromium with Playwright; install it
# when it is missing. If that fails, the test fails and says so.
APT_GET := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -n") apt-get
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the page test"; \
	  ($(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends \
	    chromium >/dev/null) || echo "could not install chromium: tests/test_server_page.py will fail"; }

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python bench/bench_render.py
	$(BIN)/python bench/bench_server.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
