# cellseg: `make demo` (the whole workflow on synthetic data, CPU) and `make test` (the suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must come as a matched pair from the registry: a lone CPU torch wheel
# offered locally cannot load torchvision's operators (timm needs torchvision).
TORCH_SPEC ?= torch==2.14.*
TORCHVISION_SPEC ?= torchvision==0.29.*
KERNEL ?= cellseg
DEMO_DIR ?= runs/demo
DEMO_CONFIG ?= configs/demo_cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PY) -c "import torch, torchvision, timm; torchvision.ops.nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cellseg)" >/dev/null
	@touch $@

demo: setup
	$(PY) -m cellseg.workflow --run-dir $(DEMO_DIR) --config $(DEMO_CONFIG) --kernel $(KERNEL)

# Real-data tests read these; default to ../shared/data when it exists (CI sets them explicitly in .ci/run).
SHARED_DATA := $(abspath ../shared/data)
export CELLSEG_BCCD_ROOT ?= $(if $(wildcard $(SHARED_DATA)/BCCD),$(SHARED_DATA)/BCCD,)
export CELLSEG_DSB2018_ROOT ?= $(if $(wildcard $(SHARED_DATA)/dsb2018_nuclei),$(SHARED_DATA)/dsb2018_nuclei,)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check lib tests benchmarks notebooks

clean-demo:
	rm -rf $(DEMO_DIR)
