# The two quick-start commands, `make demo` and `make test`, each set up what they need: a local
# virtual environment in .venv, created or refreshed from pyproject.toml whenever that file changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STORE := demo/isic_cc0.h5
DEMO_RUN := demo/run-linear

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,openvino,clip]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) cli.py extract --data samples/isic_cc0/labels.csv --backbone efficientnet_lite0 --out $(DEMO_STORE)
	$(PY) cli.py fit --features $(DEMO_STORE) --head linear --trials 10 --out $(DEMO_RUN)

clean:
	rm -rf demo .pytest_cache
