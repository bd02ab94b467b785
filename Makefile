# CoVT trainer. On a fresh clone `make test` and `make train` are enough: each creates what it needs
# and is missing, through Make's own dependencies (the venv's python, the default cache's manifest):
# `make test` = install + test; `make train` = install + precompute (embedded default) + train, on a CPU.
# `make install`, `make precompute` do the steps apart.
PYTHON_BOOT ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
CONFIG ?= configs/tiny.yaml
ARGS ?=
CONSTRAINTS := constraints.txt
# the embedded default's cache, made by `make train` when missing (other configs: `make precompute` first)
DEFAULT_CONFIG := configs/tiny.yaml
DEFAULT_CACHE_MANIFEST := runs/tiny/cache/manifest.json

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test precompute train demo inspect bench clean

# the environment, when it is missing: created and installed (removed again if the install fails)
$(PYTHON):
	$(MAKE) install || { rm -rf $(VENV); exit 1; }

# the exact versions of constraints.txt (pyproject.toml holds the compatible ranges)
install:
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	# torch and torchvision come from this machine's local wheel files
	$(PIP) install -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c $(CONSTRAINTS) -e '.[test,wandb,mlflow]'
	# DeepSpeed from its source package, no CUDA ops compiled at install time
	DS_BUILD_OPS=0 $(PIP) install -c $(CONSTRAINTS) --no-build-isolation deepspeed==0.19.8

$(DEFAULT_CACHE_MANIFEST): | $(PYTHON)
	$(PYTHON) -m precompute --config $(DEFAULT_CONFIG)

# the linter first (ruff, configured in pyproject.toml), so CI fails on what it flags
test: | $(PYTHON)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q $(ARGS)

# the suite without the end-to-end tests that run a whole phase (@pytest.mark.slow)
.PHONY: test-fast
test-fast: | $(PYTHON)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)

precompute: | $(PYTHON)
	$(PYTHON) -m precompute --config $(CONFIG) $(ARGS)

train: | $(PYTHON) $(if $(filter $(DEFAULT_CONFIG),$(CONFIG)),$(DEFAULT_CACHE_MANIFEST))
	$(PYTHON) -m trainer --config $(CONFIG) $(ARGS)

# after `make train`: answer a question about a sample photo and draw its visual thoughts (runs/tiny/thoughts.png)
demo:
	$(PYTHON) -m trainer generate --model runs/tiny/train/final --image data/sample/images/chelsea.jpg \
		--question "What animal is in the image?" --image-size 112 --max-new-tokens 24 \
		--config $(CONFIG) --thoughts runs/tiny/thoughts.png $(ARGS)

# show that it learns (bench/learn): a synthetic world, a base model trained on it, CoVT / the control / the
# ablation through precompute, trainer and evaluate, then runs/learn/report.md; learn-quick is the CPU variant,
# one thread per process so that its numbers (README) do not depend on the machine's core count
.PHONY: learn learn-quick
learn:
	$(PYTHON) bench/learn/run.py $(ARGS)

learn-quick:
	OMP_NUM_THREADS=1 $(PYTHON) bench/learn/run.py --quick $(ARGS)

inspect:
	$(PYTHON) -m shards inspect --config $(CONFIG) --verify $(ARGS)

clean:
	rm -rf runs/tiny
