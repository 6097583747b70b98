# The course's front door. `make book` and `make test` do all the set-up they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.course-installed
CONSTRAINTS := requirements/constraints.txt
TORCH_VERSION := 2.13.0
JOBS ?= 2

# Without an NVIDIA GPU, take torch's CPU build (about 200 MB) instead of PyPI's default CUDA
# build (several GB). Override with `make TORCH_INDEX= ...` to use your own index.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_INDEX ?=
else
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu
endif

LAB ?= lab01_autograd
# assign, update-labs and check take the labs named in LABS (default: every lab); assign and
# update-labs grade the solution unless CHECK=0.
LABS ?=
CHECK ?= 1
ASSIGN_FLAGS = $(if $(filter 0,$(CHECK)),--no-check)
SUBMISSIONS ?= submissions
OUT ?= grading-output

.PHONY: help setup book test lab assign update-labs grade bench check lint lock clean nbgrader \
	release browser mutation-score

help:
	@echo "make book     build the book (every notebook executed) into book/_build/html"
	@echo "make test     the whole test suite (lint, reference, labs, grading, book)"
	@echo "make lab      JupyterLab on labs/"
	@echo "make assign   build grader/dist/ (autograder zips, solutions) from solutions/"
	@echo "make update-labs   also regenerate labs/ (refuses to overwrite a changed notebook)"
	@echo "make grade LAB=lab01_autograd SUBMISSIONS=folder [OUT=grading-output]"
	@echo "make bench    run the benchmarks; results in book/benchmarks/results.json"
	@echo "make mutation-score [LABS=...] [SAMPLE=n]   how many mutants each lab's tests catch"
	@echo "make release  what students receive, in grader/dist/release (its own git repository)"
	@echo "make nbgrader LAB=lab01_autograd   the lab as an nbgrader course in grader/dist/nbgrader"

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --retries 1 --no-deps \
		"torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/python -m pip check
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build book --warningiserror --keep-going
	@echo "The book: file://$(CURDIR)/book/_build/html/index.html"

# The book's offline test drives a real browser: Debian's Chromium, installed when missing.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| { echo "the book's browser test needs Chromium (apt-get install chromium)"; exit 1; }

# Tests that share a built book or a grading environment run on one worker (xdist groups).
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup --durations=15 tests

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=labs

assign: $(STAMP)
	$(BIN)/course assign $(ASSIGN_FLAGS) $(LABS)

# The only target that writes labs/: it refuses where a student changed a file (FORCE=1 keeps the
# changed file beside the new one as <name>.bak-<time>).
update-labs: $(STAMP)
	$(BIN)/course assign --update-labs $(if $(FORCE),--force) $(ASSIGN_FLAGS) $(LABS)

grade: $(STAMP)
	test -f grader/dist/$(LAB)-autograder.zip || $(BIN)/course assign $(ASSIGN_FLAGS) $(LAB)
	$(BIN)/course grade $(LAB) $(SUBMISSIONS) --out $(OUT)

# The student release: the labs, the runtime and the rendered book, and no answer.
release: book
	$(BIN)/course release --book book/_build/html

# The reference against PyTorch (results.json), then the batch grader's throughput (grading.json).
bench: $(STAMP)
	$(BIN)/course-bench
	$(BIN)/python -m grader.bench_grading

mutation-score: $(STAMP)
	$(BIN)/course mutation-score $(LABS) $(if $(SAMPLE),--sample $(SAMPLE))

nbgrader: $(STAMP)
	$(BIN)/course nbgrader $(LAB)

check: $(STAMP)
	$(BIN)/course check $(LABS)

lint: $(STAMP)
	$(BIN)/ruff check .

# After a deliberate upgrade: pin what is installed now.
lock: $(STAMP)
	{ head -n 2 $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | \
		sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf book/_build grader/dist grading-output .pytest_cache
