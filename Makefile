# Two entry points that work on a fresh machine with only Python installed:
#   make demo   train the embedded tiny LoRA model, kill it mid-run, resume, list checkpoints
#   make test   set up .venv and run the whole suite (lint included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint format bench powercut fuse clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,bench]' $(TORCH_PIN)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed lint fuse
	$(PY) -m pytest -q -ra

# The power-cut tests mount a FUSE filesystem: install Debian's fuse3 where it is missing and we are
# root; otherwise those tests skip with the reason.
fuse:
	@command -v fusermount3 >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		apt-get install -y -q fuse3 >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fuse3 >/dev/null 2>&1; } || \
		echo "could not install fuse3: the power-cut tests will skip"

# >= 200 power cuts per save mode; prints acknowledged, lost, broken loads and time per mode
powercut: $(VENV)/.installed fuse
	$(PY) bench/powercut.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs bench/results
