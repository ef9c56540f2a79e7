# fastinf: `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastinf-installed
PYTEST_ARGS ?=

.PHONY: setup demo demo-text test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,triton]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fastinf demo --out demo_out

# The text-conditional default: prompt -> sample -> proponents and opponents.
demo-text: $(STAMP)
	$(PY) -m fastinf demo --text --out demo_text_out

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check fastinf tests bench
	$(PY) -m ruff format --check fastinf tests bench

format: $(STAMP)
	$(PY) -m ruff format fastinf tests bench
	$(PY) -m ruff check --fix fastinf tests bench

bench: $(STAMP)
	$(PY) -m pytest bench -q

clean:
	rm -rf $(VENV) demo_out demo_text_out .fastinf_cache .pytest_cache
