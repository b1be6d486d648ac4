# adareg — the README's commands. Everything the project needs is installed here.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MPLBACKEND := Agg

.PHONY: install test test-slow demo lint bench clean fashion-files

install: $(BIN)/adareg

$(BIN)/adareg: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	@touch $(BIN)/adareg

test: install  # unit and integration tests (< 10 minutes on 2 cores)
	$(BIN)/python -m pytest -q -x --timeout 600 -m "not slow" tests

test-slow: install  # end to end: real orchestrators killed at random, mlflow server + PostgreSQL, Ray cluster, PID 1
	$(BIN)/python -m pytest -q -x --timeout 900 --durations 25 -m slow tests

demo: install
	$(BIN)/adareg sweep run sweeps/demo.yaml --gpus none --max-parallel 2
	$(BIN)/adareg report sweeps/demo.yaml --out demo-report
	@echo "real data next: apt-get install dataset-fashion-mnist, then $(BIN)/adareg sweep run sweeps/fashion-anchor.yaml (32 epochs; a GPU runs the published 300 with --epochs-scale 1)"

lint: install
	$(BIN)/ruff check training orchestrator tests benchmarks

fashion-files:  # the four Fashion-MNIST files, to carry to a GPU machine for benchmarks/gpu_check.sh
	mkdir -p .fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .fashion-mnist/

bench: install
	$(BIN)/python benchmarks/trainer_throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
