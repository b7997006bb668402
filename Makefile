VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test docs clean-demo

# Create the virtualenv on first use. torch is installed first and pinned to the
# CPU wheel that ships with the machine; a looser spec would pull a CUDA build.
# Every extra that works on CPU: dev and classic (quantization and deepspeed need a GPU).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,classic]"
	touch $@

# Standard PPO, IIF and size-matched random filtering side by side on the offline tiny recipe, 3 seeds.
# A second `make demo` replaces the first one's runs/demo.
demo: $(VENV)/.installed
	$(VENV)/bin/llm-iif compare recipes/tiny-sentiment.yaml --methods standard,iif,random --seeds 0,1,2 \
		--output-dir runs/demo --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests

# docs/recipes.md from the recipe dataclasses in llm_iif/core/config.py (a test fails when it is stale).
docs: $(VENV)/.installed
	$(VENV)/bin/python -m llm_iif.core.recipe_docs

clean-demo:
	rm -rf runs/demo
