# One venv, torch first (CPU wheel 2.13.0 on these machines; a CUDA build elsewhere is fine too).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-all clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
