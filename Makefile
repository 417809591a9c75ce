# FedPortal developer commands. `make` alone lists them.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
# Touched after a successful install; pip runs again only when pyproject.toml is newer.
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make's targets run on a developer's machine: development mode (the built-in development
# secrets, DEBUG on, static files served by the portal). A deployment never uses make; see
# README.md, "Security settings".
export FEDPORTAL_DEV ?= 1
.DEFAULT_GOAL := help
.PHONY: help venv install assets test chaos lint format demo sim lightning bench portal worker clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z]+:.*## / {printf "  make %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(PYTHON) ## Create .venv with PY (default python3.11) if it is missing

$(PYTHON):
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install -e '.[agent,portal,tracking,lightning,dev]'
	touch $@

install: $(STAMP) assets ## Install the project with the agent, portal, tracking, lightning and dev extras

# The dashboard's front-end libraries (Chart.js), pinned by dashboard/static_build's
# package-lock.json and served through STATICFILES_DIRS; npm runs again only when the lock
# file is newer than the last install.
ASSETS := dashboard/static_build
ASSETS_STAMP := $(ASSETS)/node_modules/.installed

$(ASSETS_STAMP): $(ASSETS)/package.json $(ASSETS)/package-lock.json
	npm ci --prefix $(ASSETS) --no-audit --no-fund
	touch $@

assets: $(ASSETS_STAMP) ## Install the dashboard's front-end libraries with npm (Chart.js)

test: install ## Run the test suite (PYTEST_ARGS=... to pass more)
	DATABASE_URL="$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" $(BIN)/pytest $(PYTEST_ARGS)

chaos: install ## Only the chaos suite: Redis, PostgreSQL, disk, network and workers broken mid-round
	$(BIN)/pytest tests/chaos $(PYTEST_ARGS)

lint: install ## ruff, ruff format --check, mypy on the whole project, import contracts, missing migrations
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy  # the whole project, with the Django and DRF plugins: see pyproject.toml
	$(BIN)/lint-imports --no-logo  # the layers: [tool.importlinter] in pyproject.toml
	$(PYTHON) manage.py makemigrations --check --dry-run

format: install ## Fix imports and lint autofixes, then format with ruff
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: install ## Run hello-pt in PocEnv (portal, worker, 3 agents here); the portal stays up
	cd examples/hello-pt && ../../$(PYTHON) job.py --env poc

sim: install ## Run hello-pt in SimEnv (simulation, no portal)
	cd examples/hello-pt && ../../$(PYTHON) job.py

lightning: install ## Run the hello-lightning example in SimEnv
	cd examples/hello-lightning && ../../$(PYTHON) job.py

bench: install ## Run every bench/*.py and print its figures
	@set -e; for f in bench/*.py; do \
		[ -e "$$f" ] || { echo "no bench/*.py yet"; break; }; \
		echo "== $$f"; $(PYTHON) "$$f"; \
	done

portal: install ## Migrate, then serve the portal (Daphne, ASGI) on 127.0.0.1:8000
	$(PYTHON) manage.py migrate
	$(PYTHON) -m fedportal.serve -b 127.0.0.1 -p 8000

worker: install ## Run a Celery worker
	$(BIN)/celery -A fedportal worker --loglevel=INFO

clean: ## Remove caches and build output (keeps .venv and data/)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
