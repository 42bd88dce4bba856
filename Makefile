# dlrm-serve: every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# GPU=1: the CUDA builds of torch and onnxruntime (requirements-gpu.txt, docs/gpu.md).
GPU ?=
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu)
REQUIREMENTS := $(if $(filter 1,$(GPU)),requirements-gpu.txt,requirements.txt)

.PHONY: setup test serve stop train java bench-decode bench-model bench-serve bench-backends bench-scale bench-ray soak clean torchrec-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-gpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
ifeq ($(GPU),1)
	$(PY) -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "make setup GPU=1: pip installed torch " + torch.__version__ + ", a CPU-only build; remove a .venv made by plain make setup, let pip reach PyPI (no CPU wheel index, find-links or constraints for torch) and rerun")'
endif
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m dlrm_serve.client.protos
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

bench-decode: setup
	$(PY) bench/bench_decode.py

bench-model: setup
	$(PY) bench/bench_model.py

bench-serve: setup java
	$(PY) bench/bench_serve.py

bench-backends: setup java
	$(PY) bench/bench_backends.py

bench-scale: setup java
	$(PY) bench/bench_scale.py

# score --engine ray: 1 vs 2 actors on a two-node local cluster vs the single process (docs/scale.md).
bench-ray: setup
	$(PY) bench/bench_ray.py $(BENCH_RAY_ARGS)

# Mixed traffic for SOAK_S seconds (default 600) on a TorchServe it starts from
# config.properties; fails on any unexpected answer or worker RSS growth > 5%.
# Report: bench/results/soak-*.md and .png.  SOAK_ARGS="--attach" uses make serve's server.
SOAK_S ?= 600
soak: setup java
	$(PY) bench/soak.py --duration $(SOAK_S) $(SOAK_ARGS)

# A separate venv with TorchRec (for tests/test_torchrec_real.py and the forward
# benchmark's TorchRec rows).  Never part of make setup, make test or CI: torch
# 2.14.1 from PyPI is a CUDA build (~5.5 GB) that runs here on the CPU.
TORCHREC_VENV := .venv-torchrec
torchrec-venv: $(TORCHREC_VENV)/.installed

$(TORCHREC_VENV)/.installed:
	test -x $(TORCHREC_VENV)/bin/python || $(PYTHON) -m venv $(TORCHREC_VENV)
	$(TORCHREC_VENV)/bin/python -m pip install --upgrade --quiet pip
	$(TORCHREC_VENV)/bin/python -m pip install --quiet torch==2.14.1 fbgemm-gpu-cpu==1.9.0 torchmetrics==1.0.3 tensordict pyre-extensions tqdm numpy safetensors
	$(TORCHREC_VENV)/bin/python -m pip install --quiet --no-deps torchrec==1.9.2
	$(TORCHREC_VENV)/bin/python -c 'import torch, torchrec.models.dlrm; print("torchrec venv: torch", torch.__version__)'
	touch $@

clean:
	rm -rf model_store/*.mar logs key_file.json .pytest_cache
