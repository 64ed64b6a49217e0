# Quick start:  make demo   (set up .venv, train stages 1-2 on the committed prior, test on held-out photos)
#               make test   (set up .venv, run the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo/demo.py

clean-demo:
	rm -rf experiments/demo_* results/demo* datasets/demo tb_logger/demo_*
