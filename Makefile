# The two commands a new user runs (see README): `make demo` and `make test`.
# Each creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := demo_data/shapes
DEMO_PACK := demo_data/shapes.h5
DEMO_NEW := demo_data/new_images
DEMO_RUN := runs/demo
# Small enough for a 2-core CPU in a few minutes; from scratch, since nothing is downloaded.
DEMO_TRAIN := --arch mobilenet_v2 --weights none --image-size 112 --batch-size 32 --optimizer adamw --lr 0.002 \
              --scheduler cosine --epochs 20 --patience 5

.PHONY: demo test venv clean

venv: $(STAMP)

# Reinstall when the package metadata changes. torch is pinned no tighter than >= in
# setup.cfg; pip takes the newest allowed release its index offers.
$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dali,dev,export,tb]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/make_demo_dataset.py $(DEMO_DATA) --per-class 60 --force
	$(BIN)/python tools/make_demo_dataset.py $(DEMO_NEW) --per-class 1 --seed 7 --force
	$(BIN)/python tools/pack_dataset.py $(DEMO_DATA) $(DEMO_PACK) --force
	$(BIN)/trainer info $(DEMO_PACK)
	rm -rf $(DEMO_RUN)
	$(BIN)/trainer run --pack $(DEMO_PACK) $(DEMO_TRAIN) --out $(DEMO_RUN)
	$(BIN)/trainer eval --checkpoint $(DEMO_RUN)/best.pt --pack $(DEMO_PACK) --topk 5 --out $(DEMO_RUN)
	$(BIN)/trainer predict --checkpoint $(DEMO_RUN)/best.pt $(DEMO_NEW) --topk 3

# The linter first (seconds), then the suite; the 25 slowest tests are listed, so a slow one shows in CI.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --durations=25

clean:
	rm -rf $(VENV) demo_data runs .pytest_cache
