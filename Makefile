# The two commands a new user runs (see README): `make demo` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := demo_data/shapes
DEMO_PACK := demo_data/shapes.h5
DEMO_RUN := runs/demo

.PHONY: demo test venv clean

venv: $(STAMP)

# Reinstall when the package metadata changes. torch is pinned no tighter than >= in
# setup.cfg; pip takes the newest allowed release its index offers.
$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dali,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/make_demo_dataset.py $(DEMO_DATA) --force
	$(BIN)/python tools/pack_dataset.py $(DEMO_DATA) $(DEMO_PACK) --force
	$(BIN)/trainer info $(DEMO_PACK)

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_data runs .pytest_cache
