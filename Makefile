# dlrm-serve: every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test serve stop train java bench-model bench-serve bench-backends bench-scale soak clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m dlrm_serve.protos
	touch $@

java:
	@bash scripts/ensure_java.sh

test: setup java
	$(PY) -m pytest tests

train: setup
	$(VENV)/bin/dlrm-serve train --out artifacts

serve: setup java
	@bash scripts/serve.sh

stop:
	@if [ -x $(VENV)/bin/torchserve ]; then $(VENV)/bin/torchserve --stop; else echo "nothing to stop: no .venv"; fi

bench-model: setup
	$(PY) bench/bench_model.py

bench-serve: setup java
	$(PY) bench/bench_serve.py

bench-backends: setup java
	$(PY) bench/bench_backends.py

bench-scale: setup java
	$(PY) bench/bench_scale.py

# Mixed traffic for SOAK_S seconds (default 600) on a TorchServe it starts from
# config.properties; fails on any unexpected answer or worker RSS growth > 5%.
# Report: bench/results/soak-*.md and .png.  SOAK_ARGS="--attach" uses make serve's server.
SOAK_S ?= 600
soak: setup java
	$(PY) bench/soak.py --duration $(SOAK_S) $(SOAK_ARGS)

clean:
	rm -rf model_store/*.mar logs key_file.json .pytest_cache
