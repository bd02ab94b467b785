# CoVT trainer. `make install`, then `make test`; `make precompute && make train`
# runs the embedded default (configs/tiny.yaml) end to end on a CPU.
PYTHON_BOOT ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
CONFIG ?= configs/tiny.yaml
ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test precompute train demo inspect bench clean

$(PYTHON):
	$(PYTHON_BOOT) -m venv $(VENV)

install: $(PYTHON)
	# torch and torchvision come from this machine's local wheel files
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[test]'
	# DeepSpeed from its source package, no CUDA ops compiled at install time
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation deepspeed==0.19.8

# the linter first (ruff, configured in pyproject.toml), so CI fails on what it flags
test:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q $(ARGS)

# the suite without the end-to-end tests that run a whole phase (@pytest.mark.slow)
.PHONY: test-fast
test-fast:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)

precompute:
	$(PYTHON) -m precompute --config $(CONFIG) $(ARGS)

train:
	$(PYTHON) -m trainer --config $(CONFIG) $(ARGS)

# after `make train`: answer a question about a sample photo and draw its visual thoughts (runs/tiny/thoughts.png)
demo:
	$(PYTHON) -m trainer generate --model runs/tiny/train/final --image data/sample/images/chelsea.jpg \
		--question "What animal is in the image?" --image-size 112 --max-new-tokens 24 \
		--config $(CONFIG) --thoughts runs/tiny/thoughts.png $(ARGS)

# show that it learns (bench/learn): a synthetic world, a base model trained on it, CoVT / the control / the
# ablation through precompute, trainer and evaluate, then runs/learn/report.md; learn-quick is the CPU variant
.PHONY: learn learn-quick
learn:
	$(PYTHON) bench/learn/run.py $(ARGS)

learn-quick:
	$(PYTHON) bench/learn/run.py --quick $(ARGS)

inspect:
	$(PYTHON) -m shards inspect --config $(CONFIG) --verify $(ARGS)

clean:
	rm -rf runs/tiny
