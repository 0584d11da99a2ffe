# Tasks for whoever works here. Everything runs in the active virtualenv.
.PHONY: install lint format test-fast test-ray test bench

install:  ## the project and its dev tools
	pip install -e ".[dev]" && pre-commit install

lint:  ## ruff and mypy, as CI and pre-commit run them
	ruff check . && ruff format --check . && mypy raypurify

format:
	ruff check --fix . && ruff format .

test-fast:  ## the inner loop: no Ray, no CIFAR-10, no sweep/cluster/browser (1.7-4 minutes)
	pytest -q -m "not ray and not cifar and not slow"

test-ray:  ## everything but the slow tests (about 20 minutes on 2 cores)
	pytest -q -m "not slow"

test:  ## the whole suite, as CI runs it
	pytest -q tests

bench:  ## speed figures (JSON + markdown under bench/results/); by hand, never in CI
	python bench/data_io.py && python bench/classifier.py && python bench/dvae_throughput.py && python bench/attacks.py
