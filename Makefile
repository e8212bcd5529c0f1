# Two entry points: `make run` (default job on embedded digits) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: run test docs lint format bench clean

# `make run` needs only the package; `make test` (and docs, lint) add the dev extras.
$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(BASE)
	$(BIN)/eigendamage demo --out runs/demo --force

# pytest exits 5 when it collects no tests: that is not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q; status=$$?; [ $$status -eq 5 ] && exit 0; exit $$status

# The docs site (mkdocs.yml): API reference from the docstrings; warnings are errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/kfac_overhead.py

clean:
	rm -rf $(VENV) runs build site *.egg-info
