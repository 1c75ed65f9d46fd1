# The README's two commands, `make demo` and `make test`, run the whole setup
# themselves (scripts/install.sh is idempotent: seconds when nothing changed).
SHELL := /bin/bash
VENV := .venv
QGIS_PROFILE ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default
# Plugin tests run in QGIS's own Python: offscreen, with a private runtime dir.
QGIS_TEST_ENV := QT_QPA_PLATFORM=offscreen XDG_RUNTIME_DIR=$$(mktemp -d) QGIS_CUSTOM_CONFIG_PATH=$$(mktemp -d)

.PHONY: install test test-engine test-plugin demo zip dev-install bench clean

install:
	@bash scripts/install.sh

test: install
	$(VENV)/bin/pytest -q tests/contract tests/engine tests/e2e
	$(QGIS_TEST_ENV) .venv-test/bin/pytest -q -p pytest_qgis tests/plugin tests/desktop

test-engine: install
	$(VENV)/bin/pytest -q tests/contract tests/engine tests/e2e

test-plugin: install
	$(QGIS_TEST_ENV) .venv-test/bin/pytest -q -p pytest_qgis tests/plugin tests/desktop

demo: install
	$(VENV)/bin/python scripts/demo.py

zip:
	@python3 scripts/make_zip.py dist/landcover_plugin.zip

dev-install: install
	mkdir -p "$(QGIS_PROFILE)/python/plugins"
	ln -sfn "$(CURDIR)/landcover_plugin" "$(QGIS_PROFILE)/python/plugins/landcover_plugin"
	@echo "Linked into $(QGIS_PROFILE); enable 'Landcover' in Plugins > Manage and Install Plugins."

bench: install
	$(VENV)/bin/python bench/run.py $(BENCH)

clean:
	rm -rf dist demo-output tests/artifacts .pytest_cache
