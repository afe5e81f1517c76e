# syntax=docker/dockerfile:1.7
# dare-serve: the ranker service image.
#   docker build -t dare-serve .                  # default target: gpu (CUDA runtime, gpu extra)
#   docker build -t dare-serve:cpu --target cpu . # CPU only (cpu extra)
# Bundles: mount them at /bundles (docker run -v $PWD/bundles:/bundles:ro ...), or bake them in
# with --build-arg BUNDLES_DIR=<a folder inside the build context>.

# Python 3.11 in both images: the lock files (requirements/serve-*.txt) are resolved for it.
ARG PYTHON_VERSION=3.11
ARG BUNDLES_DIR=deploy/bundles

# ---- build: a virtual environment with the project and one runtime extra -----------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY requirements /src/requirements
COPY service /src/service
COPY exporters /src/exporters
COPY feature_store /src/feature_store
COPY loadtest /src/loadtest

FROM python:${PYTHON_VERSION}-slim AS build-cpu
COPY --from=source /src /src
WORKDIR /src
# The exact, hash-checked set from the lock, then the project itself without re-resolving.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes -r requirements/serve-cpu.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps . && /opt/venv/bin/pip check

FROM python:${PYTHON_VERSION}-slim AS build-gpu
COPY --from=source /src /src
WORKDIR /src
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --require-hashes -r requirements/serve-gpu.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps . && /opt/venv/bin/pip check

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

# The gpu extra's wheels carry their CUDA libraries (onnxruntime-gpu: CUDA 13 and cuDNN 9; faiss-gpu:
# CUDA 12), so no CUDA base image is needed: the NVIDIA container runtime mounts the driver's
# user-space libraries into the container (host driver 580 or newer).
FROM python:${PYTHON_VERSION}-slim AS gpu
ARG BUNDLES_DIR
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin dare
COPY --from=build-gpu /opt/venv /opt/venv
COPY --chown=dare:dare ${BUNDLES_DIR} /bundles
ENV PATH=/opt/venv/bin:$PATH DARE_BUNDLES=/bundles DARE_HOST=0.0.0.0 DARE_PORT=8000 PYTHONUNBUFFERED=1 \
    DARE_DEVICE=auto NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER dare
# compile the stage-1 selection kernel once at build time (numba caches it under ~/.cache)
RUN python -c "import service.core.topk"
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
ENTRYPOINT ["dare-serve", "serve"]
