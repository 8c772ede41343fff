# Two entry points that work on a fresh machine with only Python installed:
#   make demo   train the embedded tiny LoRA model, kill it mid-run, resume, list checkpoints
#   make test   set up .venv and run the whole suite (lint included)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint format bench fuzz clean browser integration-trials

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed lint browser
	$(PY) -m pytest -q -ra

# The run report's test renders the page in Debian's chromium: installed here when missing and we are
# root with apt-get; otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -q && apt-get install -y -q chromium; } || \
		echo "chromium could not be installed: the browser test will be skipped"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

bench: $(VENV)/.installed
	$(PY) bench/run.py

# the hostile-input properties of `make test`, with 20,000 examples each instead of 150
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_hostile_inputs.py

# the integrations' random-kill tests (HF Trainer, Accelerate, Lightning) with 40 kills each instead of a few
integration-trials: $(VENV)/.installed
	CKPTGUARD_KILL_TRIALS=40 $(PY) -m pytest -q -k "random_kills or killed" tests/test_integration_hf.py \
		tests/test_integration_accelerate.py tests/test_integration_lightning.py tests/test_integration_two_ranks.py

clean:
	rm -rf $(VENV) runs bench/results
