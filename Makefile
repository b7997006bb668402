VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test docs lock clean-demo

# Create the virtualenv on first use, with the exact versions CI tested (constraints.txt). torch is installed
# first and pinned to the CPU wheel that ships with the machine; a looser spec would pull a CUDA build.
# Every extra that works on CPU: dev and classic (quantization and deepspeed need a GPU).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev,classic]"
	touch $@

# Move constraints.txt forward: the newest release of every dependency that pyproject.toml's ranges allow, resolved
# in a fresh virtualenv (raise a range there first to move past it). Then run `make test` before committing.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q --upgrade-strategy eager -e ".[dev,classic]"
	{ echo "# Exact versions CI tested; written by \`make lock\` from pyproject.toml's ranges. Do not edit by hand."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > constraints.txt
	rm -rf .lock-venv

# Standard PPO, IIF and size-matched random filtering side by side on the offline tiny recipe, 3 seeds.
# A second `make demo` replaces the first one's runs/demo.
demo: $(VENV)/.installed
	$(VENV)/bin/llm-iif compare recipes/tiny-sentiment.yaml --methods standard,iif,random --seeds 0,1,2 \
		--output-dir runs/demo --overwrite

# The built-in models the tests load are built first, once, outside pytest's time (a cold $$LLM_IIF_CACHE
# takes a few minutes; a warm one, none). Two pytest workers share the 2 cores (tests/conftest.py gives each one
# thread).
test: $(VENV)/.installed
	$(PY) -m llm_iif.models.builtins tiny-sentiment tiny-biased-reward-model tiny-biased-reward-model-seed1 \
		tiny-biased-reward-model-seed2
	$(PY) -m pytest -n 2 tests

# docs/recipes.md from the recipe dataclasses in llm_iif/recipes/ (a test fails when it is stale).
docs: $(VENV)/.installed
	$(VENV)/bin/python -m llm_iif.recipes.docs

clean-demo:
	rm -rf runs/demo
