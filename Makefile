VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test clean-demo

# Create the virtualenv on first use. torch is installed first and pinned to the
# CPU wheel that ships with the machine; a looser spec would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/llm-iif train recipes/tiny-sentiment.yaml --output-dir runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests

clean-demo:
	rm -rf runs/demo
