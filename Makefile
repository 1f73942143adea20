# The two README commands. Each bootstraps .venv on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/moola-pipeline
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0
DEMO   ?= demo

.PHONY: demo test venv clean

venv: $(STAMP)

# torch first, pinned: it is a CPU build on disk here; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,export]'
	touch $(STAMP)

demo: $(STAMP)
	bash infra/demo.sh $(DEMO)

test: $(STAMP)
	bash infra/test-deps.sh
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(DEMO) .pytest_cache
