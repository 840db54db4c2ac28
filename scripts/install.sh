#!/usr/bin/env bash
# Installs splitserve and everything its tests need into a virtual environment, .venv/ in the
# checkout, made with Debian's own Python (/usr/bin/python3, 3.11 or newer) where there is one.
# Debian's Python refuses `pip install` outside a virtual environment (PEP 668), and the
# environment keeps this install apart from the system's packages. Run it again at any time:
# it reuses .venv and installs only what is missing.
#
# Debian packages (with apt-get, as root or through sudo), only when missing:
# python3-venv (venv and the pip it bootstraps) and redis-server (the tests' control plane).
# PyTorch: the CPU build from PyTorch's CPU wheel index on a machine without an NVIDIA GPU
# (the default index where that one cannot be reached). NIXL: nixl-cu13, whose UCX backend
# moves host memory between processes without a GPU, plus the `nixl` import shim.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
VENV=.venv

say() { printf '\n==> %s\n' "$*"; }

apt_install() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    say "installing Debian packages: $*"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y "$@"
}

system_python() { if [ -x /usr/bin/python3 ]; then echo /usr/bin/python3; else command -v python3 || true; fi; }
# A venv made without ensurepip has a python but no pip: made again below.
venv_ok() { "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
if ! venv_ok; then
    PYTHON=$(system_python)
    # Debian ships venv without ensurepip (so without pip) until python3-venv is installed.
    if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3 python3-venv python3-pip)
    fi
fi
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if ! venv_ok; then
    PYTHON=$(system_python)
    rm -rf "$VENV"
    say "creating the virtual environment $VENV with $PYTHON ($("$PYTHON" --version))"
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install)
# Debian 12's venv bundles pip 23.0, whose resolver backtracks for many minutes over the test
# extras (checkov's pins) and then fails building an old matplotlib; a current pip resolves them.
"${pip[@]}" --upgrade pip || say "could not upgrade pip: going on with $("$VENV/bin/python" -m pip --version)"

if "$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH#torch==}'" 2>/dev/null; then
    say "$TORCH is installed"
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    say "installing $TORCH with CUDA (an NVIDIA GPU is present): about 3 GB to download with its nvidia-* libraries"
    "${pip[@]}" "$TORCH"
elif "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=15)" 2>/dev/null; then
    say "installing $TORCH, CPU build, from $CPU_INDEX: about 190 MB to download"
    "${pip[@]}" --index-url "$CPU_INDEX" "$TORCH"  # the index serves torch's dependencies too
else
    say "$CPU_INDEX cannot be reached: installing $TORCH from the default index (about 190 MB for the CPU build, about 3 GB where that index serves the CUDA build)"
    "${pip[@]}" "$TORCH"
fi

say "installing splitserve (editable) with its test extras"
"${pip[@]}" -e '.[test]'
say "installing NIXL (nixl-cu13 and the nixl import shim)"
"${pip[@]}" nixl-cu13
"${pip[@]}" --no-deps nixl
say "installing checkov (the chart tests' policy check) into .venv-tools, apart: its pins would downgrade packages splitserve uses"
[ -x .venv-tools/bin/python ] || "$VENV/bin/python" -m venv .venv-tools
.venv-tools/bin/python -m pip install --upgrade pip
.venv-tools/bin/python -m pip install checkov
say "done: $VENV/bin/splitserve, $VENV/bin/python -m pytest (or: source $VENV/bin/activate)"
