# One-command set-up for a fresh Linux machine (Python 3.10+ with venv, a C/C++ compiler and cmake).
# llama-cpp-python is built from source: 8 to 12 minutes the first time, then pip's wheel cache reuses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Portable CPU build (AVX2, no -march=native) so the cached wheel runs on any x86-64 worker of the pool.
# For a GPU worker see docs/gpu-workers.md.
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF

# The Airflow provider's environment: Airflow 3 and the core, no Prefect (the two cannot share one).
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_BIN := $(AIRFLOW_VENV)/bin

.PHONY: setup demo test test-airflow docs clean

# PYTHONWARNINGS=ignore: setuptools prints an informational "Editable installation" banner on every editable
# install (a meta path finder serves the three top-level packages); nothing is wrong, so the demo stays quiet.
$(BIN)/medvlm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(CMAKE_ARGS)" PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/medvlm

demo: setup
	$(BIN)/medvlm demo

# The docs site first (seconds; a broken link or page fails it), then the suite on two pytest-xdist workers, a
# test file each at a time: most tests wait on subprocesses, servers and workers, so two files at once keep both
# cores busy (a module's fixtures, such as a Prefect stack, stay in one worker).
test: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

$(AIRFLOW_BIN)/airflow: pyproject.toml
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(CMAKE_ARGS)" PYTHONWARNINGS=ignore $(AIRFLOW_BIN)/pip install --quiet -e '.[airflow-test]'
	touch $@

# The provider's suite in its own environment: airflow dags test on the example DAGs (a few minutes).
test-airflow: $(AIRFLOW_BIN)/airflow
	$(AIRFLOW_BIN)/python -m pytest -q -p no:cacheprovider --confcutdir=tests/airflow tests/airflow

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) medvlm-demo .pytest_cache
