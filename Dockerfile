# syntax=docker/dockerfile:1.7
# dare-serve: the ranker service image.
#   docker build -t dare-serve .                  # default target: gpu (CUDA runtime, gpu extra)
#   docker build -t dare-serve:cpu --target cpu . # CPU only (cpu extra)
# Bundles: mount them at /bundles (docker run -v $PWD/bundles:/bundles:ro ...), or bake them in
# with --build-arg BUNDLES_DIR=<a folder inside the build context>.

ARG PYTHON_VERSION=3.11
# The gpu extra's wheels carry their CUDA libraries (onnxruntime-gpu: CUDA 13 and cuDNN 9; faiss-gpu:
# CUDA 12), so the base only needs the driver's user-space shims; the host needs driver 580 or newer.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG BUNDLES_DIR=deploy/bundles

# ---- build: a virtual environment with the project and one runtime extra -----------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY exporters /src/exporters
COPY feature_store /src/feature_store
COPY loadtest /src/loadtest

FROM python:${PYTHON_VERSION}-slim AS build-cpu
COPY --from=source /src /src
WORKDIR /src
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir ".[cpu]"

FROM ${CUDA_IMAGE} AS build-gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=source /src /src
WORKDIR /src
RUN python3.12 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir ".[gpu]"

# ---- runtime: non-root, health-checked, `dare-serve serve` ---------------------------------------
FROM python:${PYTHON_VERSION}-slim AS cpu
ARG BUNDLES_DIR
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin dare
COPY --from=build-cpu /opt/venv /opt/venv
COPY --chown=dare:dare ${BUNDLES_DIR} /bundles
ENV PATH=/opt/venv/bin:$PATH DARE_BUNDLES=/bundles DARE_HOST=0.0.0.0 DARE_PORT=8000 PYTHONUNBUFFERED=1
USER dare
# compile the stage-1 selection kernel once at build time (numba caches it under ~/.cache)
RUN python -c "import service.core.topk"
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["dare-serve", "serve"]

FROM ${CUDA_IMAGE} AS gpu
ARG BUNDLES_DIR
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin dare
COPY --from=build-gpu /opt/venv /opt/venv
COPY --chown=dare:dare ${BUNDLES_DIR} /bundles
ENV PATH=/opt/venv/bin:$PATH DARE_BUNDLES=/bundles DARE_HOST=0.0.0.0 DARE_PORT=8000 PYTHONUNBUFFERED=1 \
    DARE_DEVICE=auto
USER dare
# compile the stage-1 selection kernel once at build time (numba caches it under ~/.cache)
RUN python -c "import service.core.topk"
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["dare-serve", "serve"]
