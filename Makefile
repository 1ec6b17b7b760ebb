# Two entry points: `make run` serves with the embedded defaults,
# `make test` runs the whole test suite. Both build .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test clean system-packages


$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Test-only extras: the demo tool plug-in (an entry point the tests load)
# and the MCP conformance suite with the Node.js 22 it runs on.
$(VENV)/.test-extras: $(STAMP) tests/plugins/demo_tools/setup.cfg tests/conformance/package-lock.json
	$(BIN)/pip install --quiet -e tests/plugins/demo_tools
	npm ci --prefix tests/conformance --no-audit --no-fund --loglevel=error
	touch $(VENV)/.test-extras

run: $(STAMP)
	$(BIN)/executor-tornado serve

test: $(VENV)/.test-extras
	$(BIN)/python -m pytest

# nginx and systemd-analyze for the operations tests (Debian or Ubuntu,
# as root); does nothing when both are installed.
system-packages:
	@if [ -x /usr/sbin/nginx ] && command -v systemd-analyze >/dev/null; then \
		echo "nginx and systemd-analyze are installed"; \
	else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx systemd; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
