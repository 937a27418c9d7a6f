#!/usr/bin/env bash
# Idempotent install of what the headless-Chromium dashboard tests need:
# Debian chromium + chromium-driver (apt) and selenium (pip, into the project venv).
set -euo pipefail

VENV="${VENV:-.venv}"

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi

if [ -x "$VENV/bin/python" ]; then
    "$VENV/bin/python" -c "import selenium" 2>/dev/null || "$VENV/bin/pip" install -q "selenium>=4.20"
fi

chromium --version
chromedriver --version
