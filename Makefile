# Two commands from a fresh clone: `make demo` (install + run the toy world end to end)
# and `make test` (install + run the tests). Everything lives in ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: install demo test dryrun-paper clean

$(BIN)/.installed: pyproject.toml envs/requirements.txt envs/requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r envs/requirements.txt -r envs/requirements-test.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	$(BIN)/stagediff demo-summary results/toy/tables

test: install
	$(BIN)/python -m pytest -q -n $(CORES) tests

clean:
	rm -rf results/toy logs .snakemake
