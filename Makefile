# Two commands for a fresh machine: `make demo` and `make test`. Everything installs into ./.venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := container/constraints.txt

.PHONY: install demo test test-unit bench slurm-up slurm-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard $(CONSTRAINTS))
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS)) -e ".[test,slurm]"
	touch $@

demo: install
	$(BIN)/hpc-retrain demo --out demo-output

test: install
	$(BIN)/pytest -n 2 --dist loadgroup

test-unit: install
	$(BIN)/pytest tests/unit

bench: install
	$(BIN)/python -m benchmarks all --quick

# A real one-node Slurm cluster on loopback (needs root: installs Debian's slurm-wlm and munge)
slurm-up:
	bash slurm/local-cluster/start.sh

slurm-down:
	bash slurm/local-cluster/stop.sh

clean:
	rm -rf $(VENV) demo-output benchmarks/out .pytest_cache
