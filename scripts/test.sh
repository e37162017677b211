#!/usr/bin/env bash
# Set up .venv (if needed) with difflab and its test tools, then lint and run the whole test suite.
EXTRAS=dev,metrics source "$(dirname "$0")/venv.sh"
"$VENV/bin/ruff" check src tests bench
"$VENV/bin/ruff" format --check src tests bench
"$VENV/bin/python" -m pytest "$@"
