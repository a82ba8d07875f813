# Two commands on a fresh machine: `make demo` (run) and `make test` (test).
PY ?= python3
PIP ?= $(PY) -m pip
HAS_GPU := $(shell $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && echo 1)

.PHONY: install demo test test-fast bench-cpu

install:
ifneq ($(HAS_GPU),1)
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e '.[test]'

demo: install
	$(PY) -m pdserve model pull smollm2
	$(PY) -m pdserve up --prefill 1 --decode 1 --demo "What is the capital of France?"

test: install
	$(PY) -m pdserve model pull smollm2
	@# the dashboard test drives a real headless browser (Debian's chromium); it skips only if this fails
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the dashboard browser test will skip"
	$(PY) -m pytest -q tests

test-fast:
	$(PY) -m pytest -q -m "not slow" tests

bench-cpu:
	$(PY) -m pdserve.bench.engine_bench --batch-sizes 1,8 --input-len 256 --output-len 64
