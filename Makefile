# One entry point for people and CI. `make run` and `make test` each build the
# virtualenv on first use (pinned by requirements.lock), then do their job.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# dvc.yaml's `python -m flows.stage ...` must find the virtualenv's interpreter.
export PATH := $(BIN):$(PATH)
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
MODEL_PORT ?= 5002
OVERRIDES ?=

.PHONY: help venv run smoke test bench lint format ui serve serve-pg serve-team serve-model reproduce predict

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with pinned dependencies (and the DALI TF plugin)

# One line per step with its time (pip's own output is thousands of lines); a failing
# step shows pip's full error.
STEP = @start=$$(date +%s); printf '%s ... ' $(1); $(2) && echo "done in $$(( $$(date +%s) - start )) s"

$(STAMP): pyproject.toml requirements.lock
	$(call STEP,"[1/4] virtualenv $(VENV)",test -x $(BIN)/python || $(PYTHON) -m venv $(VENV))
	$(call STEP,"[2/4] pip and build tools",$(BIN)/python -m pip install --quiet pip==26.3 setuptools==84.2.1 wheel==0.48.0)
	@# setuptools warns that any editable install may import same-named folders of the
	@# working directory: here that folder is the package itself.
	$(call STEP,"[3/4] pinned dependencies (about 1 GB: TensorFlow; DALI; MLflow; Prefect; DVC)",PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]')
	@# Source-only plugin, compiled against the TensorFlow just installed (about 40 s).
	$(call STEP,"[4/4] DALI TensorFlow plugin (compiled; about 40 s)",$(BIN)/python -m pip install --quiet --no-build-isolation --no-cache-dir nvidia-dali-tf-plugin-cuda120==2.4.0)
	@touch $(STAMP)

run: venv ## run the pipeline with DVC: data -> preprocess -> train -> evaluate -> register -> export
	dvc repro

smoke: venv ## offline run of the whole pipeline as a Prefect flow on synthetic data (OVERRIDES='key=value ...')
	python -m flows.pipeline data.source=synthetic train.epochs=2 $(OVERRIDES)

test: venv ## run the test suite (CPU; GPU tests skip themselves)
	python -m pytest

bench: venv ## CPU benchmarks -> BENCHMARKS.md (~75 min; BENCH_QUICK=1: tiny sizes, a few min)
	python -m benchmarks $(if $(filter-out 0,$(BENCH_QUICK)),--quick)

lint: venv ## ruff lint and format check
	ruff check . && ruff format --check .

format: venv ## apply ruff fixes and formatting
	ruff check --fix . && ruff format .

ui: venv ## MLflow UI on http://127.0.0.1:5000 over the mlruns/ store (MLFLOW_PORT=...; asks for the credential)
	python -m flows.serve --mlflow-only --mlflow-port $(MLFLOW_PORT)

serve: venv ## Prefect server + worker + MLflow server on 127.0.0.1 (PREFECT_PORT, MLFLOW_PORT)
	python -m flows.serve --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

serve-pg: venv ## `make serve` on a throwaway local PostgreSQL (.pipeline/postgres, 127.0.0.1:5433)
	python -m flows.serve --local-postgres --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

serve-team: venv ## serve-pg plus an S3 emulator (moto, 127.0.0.1:9000) for artifacts and DVC
	python -m flows.serve --local-postgres --local-s3 --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

serve-model: venv ## serve a model on 127.0.0.1:5002 with the stack's credential (MODEL=models:/... default: champion)
	python -m flows.serve_model $(MODEL) --port $(MODEL_PORT)

reproduce: venv ## rebuild a registered version, compare its metrics: make reproduce MODEL=models:/cifar10-seed_cnn/3
	python -m flows.reproduce "$(MODEL)"

predict: venv ## predict image files with a registered model: make predict IMAGES=<dir or file> [MODEL=models:/<name>@champion]
	python -m flows.predict "$(IMAGES)" $(if $(MODEL),--model "$(MODEL)") $(if $(TOP_K),--top-k $(TOP_K))
