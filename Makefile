# Developer tasks.  `make` (or `make help`) lists them.
PY ?= python3
PYTEST = $(PY) -m pytest -p no:cacheprovider
TOOLS = $(shell find tools -type f ! -name '*.c')
ASAN_LIB = $(shell gcc -print-file-name=libasan.so)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build and install in place (pip install -e '.[test]'), C with -Werror
	SHMSTM_WERROR=1 $(PY) -m pip install -e '.[test]'

test: ## the whole suite, as CI runs it (README.md)
	$(PYTEST) -n 2 tests

test-fast: ## unit tests, native cases and lints only (under a minute)
	$(PYTEST) -n 2 tests/unit tests/native tests/test_lint.py tests/test_typing.py

test-crash: ## kill, stop and interrupt tests with real processes
	$(PYTEST) -n 2 tests/crash

test-durability: ## LMDB durability tests (flusher kills, full maps)
	$(PYTEST) -n 2 tests/durability

test-soak: ## the long variants (SHMSTM_SOAK=1)
	SHMSTM_SOAK=1 $(PYTEST) tests/crash -k soak

asan: ## the suite against an AddressSanitizer build (in ./.asan-venv)
	$(PY) -m venv .asan-venv
	SHMSTM_SANITIZE=address SHMSTM_DEBUG=1 .asan-venv/bin/pip install -q --force-reinstall '.[test]'
	cd /tmp && LD_PRELOAD=$(ASAN_LIB) ASAN_OPTIONS=log_path=/tmp/shmstm-asan:detect_leaks=0 \
		$(CURDIR)/.asan-venv/bin/pytest -n 2 -p no:cacheprovider $(CURDIR)/tests -k 'not typing'
	@! ls /tmp/shmstm-asan.* 2>/dev/null || (echo "ASan reports in /tmp/shmstm-asan.*"; false)

bench: ## the core benchmark (docs/benchmarks.md)
	$(PY) tools/bench

lint: ## ruff, and the C core with -Werror
	$(PY) -m ruff check shmstm tests $(TOOLS)
	$(PYTEST) tests/test_lint.py

.PHONY: help build test test-fast test-crash test-durability test-soak asan bench lint
