# Two commands for a new machine: `make demo` (the main job end to end) and `make test`.
# Both set up the virtual environment first; a second run skips what is already installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sslpipe-installed

.PHONY: setup demo test test-cluster test-all bench-quality clean-runs

setup: $(STAMP)

# Reinstalls when pyproject.toml changes. torch is left for pip to pair with the registry's
# torchvision (a CUDA build that also runs on CPU); see README "Set-up".
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# lightly: the tests' reference for the joint-embedding losses (lightly.loss is plain torch).
	# Without --no-deps its pytorch_lightning and hydra-core requirements sent pip's resolver
	# backtracking for over 10 minutes (s3fs / aiobotocore / fsspec[http]); nothing else needs them.
	$(BIN)/python -m pip install --quiet --no-deps 'lightly==1.6.0'
	$(BIN)/python -c "import torch, torchvision, timm, ray, webdataset, sklearn, lightly.loss; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| ray', ray.__version__, '| webdataset', webdataset.__version__)"
	touch $@

demo: setup
	$(BIN)/sslpipe demo --config configs/demo_fmnist.yaml

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

# The cluster runs marked slow: elastic training on a multi-node ray.cluster_utils.Cluster and a run
# on S3 (moto), 2-4 min each; CI runs them after `make test`.
test-cluster: setup
	$(BIN)/python -m pytest -q -m slow tests/test_elastic.py tests/test_run_storage.py

test-all: setup
	$(BIN)/python -m pytest -q

# Every pretext task under one compute budget, then kNN + linear probe (about 35 min on 2 cores).
bench-quality: setup
	$(BIN)/python -m bench.quality --budget-s 120

clean-runs:
	rm -rf runs exports
