# Sourced by the device-machine scripts: the carried wheels (.whl/, see bench/README.md) into
# /tmp/site, this checkout installed editable, and the environment the services need there.
# Idempotent, so a second call on a warm machine costs a second.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ ! -f /tmp/site/.splitserve-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
    touch /tmp/site/.splitserve-wheels
fi
export PYTHONPATH=/tmp/site NIXL_LOG_LEVEL=WARN PYTHONUNBUFFERED=1
export NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo
if ! python3 -c "import splitserve.kernels.backend, splitserve.kvtransfer" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; return 1; }
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader > "$OUT/gpus.txt"
