# cellseg: `make demo` (the whole workflow on synthetic data, CPU) and `make test` (the suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must come as a matched pair from the registry (pinned in tools/torch_setup.py): a lone CPU
# torch wheel offered locally cannot load torchvision's operators (timm needs torchvision).
# The torch build: auto (nvidia-smi present: the newest CUDA line its driver runs; absent: CPU only), cpu, cu126,
# cu128, cu130 or pypi. tools/torch_setup.py picks it, installs it (PyTorch index as an *extra* index) and writes
# $(VENV)/cellseg-torch.json, which tests/test_install.py compares with the installed torch.
TORCH ?= auto
KERNEL ?= cellseg
# sys-prefix: the kernelspec lives in the venv; user: ~/.local/share/jupyter/kernels, which site-wide Jupyter servers
# (JupyterHub, Open OnDemand) list.
KERNEL_SCOPE ?= sys-prefix
LAB_PORT ?= 8888
DEMO_DIR ?= runs/demo
DEMO_CONFIG ?= configs/demo_cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint lab torch-plan clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/torch_setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) tools/torch_setup.py install --torch $(TORCH) --python $(PY) --report $(VENV)/cellseg-torch.json
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) tools/torch_setup.py check --python $(PY) --report $(VENV)/cellseg-torch.json
	$(PY) -c "import torch, torchvision, timm; torchvision.ops.nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	$(PY) -m ipykernel install --$(KERNEL_SCOPE) --name $(KERNEL) --display-name "Python (cellseg)" >/dev/null
	@touch $@

# What `make setup` would install on this machine, and why (no changes).
torch-plan:
	@$(PYTHON) tools/torch_setup.py plan --torch $(TORCH)

# JupyterLab on the project, with the cellseg kernel (on a cluster: inside an interactive job, then an SSH tunnel).
lab: setup
	$(VENV)/bin/jupyter lab --no-browser --port $(LAB_PORT) --notebook-dir $(CURDIR)

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
