# The two commands of the README: `make serve` (install, prepare the embedded model, serve) and
# `make test` (install, run the test suite).
VENV := .venv
STAMP := $(VENV)/.loraplex-installed

.PHONY: install serve test lint bench

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loraplex serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/python bench/serving.py $(ARGS)
