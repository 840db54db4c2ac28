#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels in .whl/ (git-ignored), for the device
# tool to carry (`carry: [".whl"]`); bench/device_env.sh installs them there into /tmp/site.
# Python 3.12, x86-64. nixl-cu13 is repacked without its expert-parallel extensions and the
# UCX perftest library (unused here, 90 MB) so the carried tree stays under the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl \
    nixl-cu13==1.5.1 nixl==1.5.1 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    protobuf==7.36.2 redis==8.1.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.3 \
    pydantic-core==2.50.4 annotated-types==0.7.0 typing-inspection==0.4.5 annotated-doc==0.0.7 \
    opentelemetry-api==1.45.2 py-spy httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
    aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna \
    openai httpx httpcore anyio sniffio distro jiter h11 certifi \
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
# (the last three lines: bench serve's HTTP backends, the openai client of bench/openai_sdk_client.py,
# and grammar-constrained decoding, splitserve/engine/grammar.py)
wheel=$(ls .whl/nixl_cu13-*.whl)
# grep -q exits at the first match and unzip then dies of SIGPIPE, which pipefail turns into a
# failed pipeline: read the listing whole first, then match it.
listing=$(unzip -l "$wheel")
if grep -q "nixl_ep_cu13/.*\.so" <<<"$listing"; then
    tmp=$(mktemp -d)
    (cd "$tmp" && unzip -q "$OLDPWD/$wheel" && rm -f nixl_ep_cu13/*.so nixl_cu13.libs/ucx/libucx_perftest_cuda* \
        && record=$(ls -d nixl_cu13-*.dist-info)/RECORD \
        && grep -v "nixl_ep_cu13/.*\.so\|libucx_perftest_cuda" "$record" > "$record.new" && mv "$record.new" "$record" \
        && rm "$OLDPWD/$wheel" && zip -q -r -9 "$OLDPWD/$wheel" .)
    rm -rf "$tmp"
fi
du -sh .whl
