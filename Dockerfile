# The image the Helm chart runs (splitserve:<appVersion>): router, workers and planner alike.
# Not built in CI here (no Docker engine on the build machines); `docker build -t splitserve:0.1.0 .`
# On GPU nodes the default PyPI torch wheel brings CUDA; for a CPU-only image pass
# --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
FROM python:3.11-slim
ARG TORCH="torch"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 NIXL_LOG_LEVEL=WARN
WORKDIR /opt/splitserve
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY splitserve ./splitserve
COPY services ./services
COPY kvtransfer ./kvtransfer
COPY kernels ./kernels
RUN pip install $TORCH \
 && pip install ".[k8s]" nixl-cu13 \
 && pip install --no-deps nixl
RUN useradd --system --uid 10001 splitserve
USER 10001
ENTRYPOINT ["splitserve"]
