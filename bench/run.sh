#!/usr/bin/env bash
# The one benchmark command: build the benchmark venvs (once), then start
# every server under test on 127.0.0.1 and print the results table.
# Extra arguments go to bench/run.py (see --help); results land in
# bench/results.json.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"

build_venv() {
    local venv="$1" stamp="$1/.installed"; shift
    if [[ ! -f "$stamp" || "$BENCH_DIR/$(basename "$venv" | sed 's/^\.venv/requirements/').txt" -nt "$stamp" ]]; then
        "$PYTHON" -m venv "$venv"
        "$venv/bin/pip" install --quiet --upgrade pip
        "$venv/bin/pip" install --quiet "$@"
        touch "$stamp"
    fi
}

# The service (editable, from this checkout) and the SDK peer share one venv;
# FastMCP pins its own mcp release, so it gets a venv of its own.
build_venv "$BENCH_DIR/.venv" -e "$BENCH_DIR/.." -r "$BENCH_DIR/requirements.txt"
build_venv "$BENCH_DIR/.venv-fastmcp" -r "$BENCH_DIR/requirements-fastmcp.txt"

# 5,000 idle streams need about 10,000 descriptors in the load generator.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

exec "$BENCH_DIR/.venv/bin/python" "$BENCH_DIR/run.py" "$@"
