#!/usr/bin/env bash
# Installs everything splitserve and its tests need on a fresh Debian machine with Python 3.11.
# CPU-only: torch is pinned to the CPU build; NIXL comes as nixl-cu13 (its UCX backend
# moves host memory between processes without a GPU) plus the `nixl` import shim.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v redis-server >/dev/null; then
    apt-get update -q && apt-get install -y -q redis-server >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
python3 -m pip install -q nixl-cu13
python3 -m pip install -q --no-deps nixl
