#!/usr/bin/env bash
# The test command (README): sets up what it needs on a fresh machine, then runs every test.
#   bash scripts/test.sh [pytest args...]
# Unit tests (processors/, pure torch), host tests (a real ComfyUI in-process), e2e tests (a real ComfyUI
# server on loopback, the real frontend in headless Chromium) and the widget's JS logic under Node.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup_env.sh
if ls tests/js/*.test.mjs >/dev/null 2>&1; then
    echo "test: widget logic (node --test)"
    node --test tests/js/
fi
echo "test: pytest"
.venv/bin/python -m pytest "$@"
