# Two entry points that work on a fresh machine with only Python installed:
#   make demo   train the embedded tiny LoRA model, kill it mid-run, resume, list checkpoints
#   make test   set up .venv and .venv-higgs and run both suites (lint included)
#   make demo-higgs / make test-higgs   the same for the Higgs Audio v2 backend, in its own environment
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN := torch==2.13.0
# Higgs Audio v2 needs transformers 4.46 (boson-multimodal fails to import on newer ones): its own venv.
HVENV := .venv-higgs
HPY := $(HVENV)/bin/python
BOSON_PIN := boson-multimodal==0.1.1
# The test environments install the exact versions of these locks (pip constraints: the ranges in
# pyproject.toml stay what users get); `make lock` writes them from the newest releases that pass.
comma := ,
LOCK := locks/test.txt
HLOCK := locks/higgs.txt

# $(call install_env,VENV,EXTRAS,CONSTRAINT): a venv with torch's CPU build, ckptguard[EXTRAS] editable, and for
# the Higgs extras boson-multimodal without its declared dependencies (they pull torchaudio, a pinned boto3, ...).
# CONSTRAINT is `-c LOCK` for the locked environments and empty for the newest releases (make test-latest).
define install_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade $(3) pip
	$(1)/bin/python -m pip install -q $(3) $(TORCH_PIN)
	$(1)/bin/python -m pip install -q $(3) -e '.[$(2)]' $(TORCH_PIN)
	$(if $(findstring higgs,$(2)),$(1)/bin/python -m pip install -q --no-deps $(BOSON_PIN))
	$(if $(findstring higgs,$(2)),$(1)/bin/python -c "import boson_multimodal.model.higgs_audio; import boson_multimodal.data_collator.higgs_audio_collator")
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call install_env,$(VENV),test$(comma)hf,-c $(LOCK))

$(HVENV)/.installed: pyproject.toml $(HLOCK)
	$(call install_env,$(HVENV),test$(comma)higgs,-c $(HLOCK))

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: test-core test-higgs

# Test files are spread over this many pytest processes (pytest-xdist), each file whole in one of them so
# its module fixtures (trained tiny models, servers) are built once; 1 runs them in this process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test-core: $(VENV)/.installed lint browser fuse compat-accelerate
	$(PY) -m pytest -q -ra $(PYTEST_PARALLEL)

# The same suites as `make test` beside two CPU burners, as on a machine shared with other jobs: the tests wait
# on events and observed state, never on the clock, so they must pass here too. The burners are killed on
# every way out (pass, failure, Ctrl-C).
test-under-load:
	@$(PYTHON) -c 'while True: pass' & b1=$$!; $(PYTHON) -c 'while True: pass' & b2=$$!; \
		trap 'kill $$b1 $$b2 2>/dev/null' EXIT INT TERM; \
		echo "two CPU burners running (pids $$b1 $$b2)"; \
		$(MAKE) test

# The Higgs tests and every test that touches transformers/PEFT (the trainer, LoRA, the HF integration;
# marked `stack` by tests/conftest.py) again, on the older transformers/peft stack. The store's own tests
# use neither library and stay in test-core, as does the bench smoke test.
test-higgs: $(HVENV)/.installed browser fuse
	$(HPY) -m pytest -q -ra $(PYTEST_PARALLEL) -m stack --ignore tests/test_bench_smoke.py

# Both suites against the newest releases within pyproject.toml's ranges, in .venv-latest and
# .venv-higgs-latest (built anew each time): first every version that differs from the locks, then the
# suites. A failure here is drift, named by the failing test and those versions; `make test` stays on the
# locks. `make lock` runs this and, when it passes, writes the newest versions into the locks.
LVENV := .venv-latest
HLVENV := .venv-higgs-latest

test-latest: browser fuse
	$(call install_env,$(LVENV),test$(comma)hf,)
	$(call install_env,$(HLVENV),test$(comma)higgs,)
	$(PYTHON) locks/lockfile.py diff $(LOCK) $(LVENV)
	$(PYTHON) locks/lockfile.py diff $(HLOCK) $(HLVENV)
	$(LVENV)/bin/python -m pytest -q -ra $(PYTEST_PARALLEL)
	$(LVENV)/bin/python compat/run.py accelerate
	$(HLVENV)/bin/python -m pytest -q -ra $(PYTEST_PARALLEL) -m stack --ignore tests/test_bench_smoke.py

lock: test-latest
	$(PYTHON) locks/lockfile.py write $(LOCK) $(LVENV)
	$(PYTHON) locks/lockfile.py write $(HLOCK) $(HLVENV)

# The run report's test renders the page in Debian's chromium: installed here when missing and we are
# root with apt-get; otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -q && apt-get install -y -q chromium; } || \
		echo "chromium could not be installed: the browser test will be skipped"

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
	$(VENV)/bin/ruff check src tests bench examples compat locks
	$(VENV)/bin/ruff format --check src tests bench examples compat locks

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests bench examples compat locks
	$(VENV)/bin/ruff check --fix src tests bench examples compat locks

# save/verify/resume against the baselines (bench/run.py), then the run report at 20,000 and 100,000 saves
bench: $(VENV)/.installed
	$(PY) bench/run.py
	$(PY) bench/report_scale.py

# integration overhead: HF Trainer, Accelerate, Lightning saves with ckptguard against the library alone and
# against the library + fsync (bench/integrations.py), in the same run; then where the commit's time goes
bench-integrations: $(VENV)/.installed
	$(PY) bench/integrations.py
	$(PY) bench/profile_integrations.py

# object storage: ckptguard's upload and download+verify against boto3's transfers, on a local moto server
bench-s3: $(VENV)/.installed
	$(PY) bench/objectstore.py

# FSDP2 sharded saves on two gloo ranks: ckptguard against plain dcp.save / dcp.async_save (bench/sharded.py)
bench-sharded: $(VENV)/.installed
	$(PY) bench/sharded.py

# the hostile-input properties of `make test`, with 20,000 examples each instead of 150
fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/test_hostile_inputs.py

demo-higgs: $(HVENV)/.installed
	$(HPY) examples/demo_higgs.py

bench-higgs: $(HVENV)/.installed
	$(HPY) bench/higgs_share.py

# the integrations' random-kill tests (HF Trainer, Accelerate, Lightning) with 40 kills each instead of a few
integration-trials: $(VENV)/.installed
	CKPTGUARD_KILL_TRIALS=40 $(PY) -m pytest -q -k "random_kills or killed" tests/test_integration_hf.py \
		tests/test_integration_accelerate.py tests/test_integration_lightning.py tests/test_integration_two_ranks.py

# The libraries' own checkpoint tests, plain and with ckptguard enabled as README says (compat/run.py):
# Accelerate's from its sdist (downloaded once into runs/compat-cache), Lightning's from
# LIGHTNING_TESTS=<a checkout of Lightning at the installed version> (skipped, saying so, when unset)
.PHONY: compat compat-accelerate compat-lightning
compat: compat-accelerate compat-lightning

compat-accelerate: $(VENV)/.installed
	$(PY) compat/run.py accelerate

compat-lightning: $(VENV)/.installed
	$(PY) compat/run.py lightning

clean:
	rm -rf $(VENV) $(HVENV) $(LVENV) $(HLVENV) runs bench/results
