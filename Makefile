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

# The chaos tests (tests/chaos) run on a PostgreSQL and a Redis of their own and spend most of
# their time waiting for deadlines and restarts, as the rest of the suite waits for its portals
# and agents: each run alone keeps about two thirds of one core busy. So `make test` runs the two
# side by side (two pytest runs, each with PYTEST_ARGS): 10.4 minutes here instead of 14. The
# chaos run's output is printed when both have ended; either run failing fails the target (a
# PYTEST_ARGS that selects no chaos test, such as -k, leaves that run with nothing to do: fine).
CHAOS_LOG := .pytest_cache/chaos.log

test: install ## Run the whole test suite, the chaos tests beside the rest (PYTEST_ARGS=... to pass more)
	@mkdir -p $(dir $(CHAOS_LOG))
	@export DATABASE_URL="$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"; \
	$(BIN)/pytest tests/chaos $(PYTEST_ARGS) > $(CHAOS_LOG) 2>&1 & chaos=$$!; \
	trap 'kill $$chaos 2>/dev/null' INT TERM; \
	echo "tests/chaos runs beside the rest; its output follows the rest's"; \
	rest=0; $(BIN)/pytest --ignore=tests/chaos $(PYTEST_ARGS) || rest=$$?; \
	chaos_status=0; wait $$chaos || chaos_status=$$?; \
	[ $$chaos_status -eq 5 ] && chaos_status=0; \
	echo; echo "== tests/chaos"; cat $(CHAOS_LOG); \
	echo "== the rest: exit status $$rest; tests/chaos: exit status $$chaos_status"; \
	[ $$rest -eq 0 ] && [ $$chaos_status -eq 0 ]

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
