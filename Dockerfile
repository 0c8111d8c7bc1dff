# syntax=docker/dockerfile:1
# dreamd in a container.
#
# GPU image (default): CUDA 13 runtime, Python 3.12, torch 2.11 (cu130) and vLLM 0.26.0 through
# the [vllm] extra. vLLM 0.26.0 is the newest release pinned to torch==2.11.0 and linked to
# CUDA 13 (docs/benchmarks.md, "GPU host"); later releases pin torch 2.13+, so the pin is exact.
#     docker build -t dreamd:gpu .
#     docker run --gpus all --stop-timeout 120 -v dreamd-state:/var/lib/dreamd dreamd:gpu
#
# CPU image: python:3.11-slim with the CPU torch wheel; generation uses the transformers engine.
#     docker build --build-arg VARIANT=cpu -t dreamd:cpu .
#
# The volume /var/lib/dreamd holds dreamd.toml, the model directory, the SQLite store and the
# checkpoints; relative paths in dreamd.toml are read from its directory. To make a tiny CPU
# setup in it:  docker run --rm -v dreamd-state:/var/lib/dreamd dreamd:cpu init /var/lib/dreamd --force
# Nothing is downloaded at run time (HF_HUB_OFFLINE=1): copy a local model directory into the
# volume and point model.path at it.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim
ARG TORCH_VERSION=2.11.0
ARG VLLM_VERSION=0.26.0

# ---- GPU base: Python 3.12 (Ubuntu 24.04's) and torch built for CUDA 13.0 ----------------------
FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive
# gcc and the Python headers: Triton compiles a small C launcher per kernel at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu130 \
    DREAMD_EXTRA=vllm
RUN pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu130

# ---- CPU base: the CPU wheel of torch (the default PyPI wheel pulls GBs of CUDA libraries) -------
FROM ${CPU_IMAGE} AS base-cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    DREAMD_EXTRA=
RUN pip install --upgrade pip \
 && pip install torch --index-url https://download.pytorch.org/whl/cpu

# ---- dreamd ---------------------------------------------------------------------------------
FROM base-${VARIANT}
ARG VLLM_VERSION
WORKDIR /opt/dreamd
COPY pyproject.toml README.md alembic.ini ./
COPY dreamd ./dreamd
COPY migrations ./migrations
COPY docs ./docs
# Editable install: the Alembic migrations live at the repository root, next to the package,
# and are found relative to it.
RUN if [ "$DREAMD_EXTRA" = "vllm" ]; then \
      pip install -e ".[vllm]" "vllm==${VLLM_VERSION}"; \
    else \
      pip install -e .; \
    fi \
 && dreamd --help >/dev/null

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dreamd --shell /usr/sbin/nologin dreamd \
 && mkdir -p /var/lib/dreamd \
 && chown dreamd:dreamd /var/lib/dreamd

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    HF_HOME=/var/lib/dreamd/.cache/huggingface \
    TRITON_CACHE_DIR=/var/lib/dreamd/.cache/triton \
    VLLM_CACHE_ROOT=/var/lib/dreamd/.cache/vllm \
    NUMBA_CACHE_DIR=/var/lib/dreamd/.cache/numba \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DREAMD_LOG_FORMAT=json

VOLUME ["/var/lib/dreamd"]
USER dreamd
WORKDIR /var/lib/dreamd
# TERM stops the loop at the next step boundary; give it time (docker run --stop-timeout 120).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dreamd"]
CMD ["run", "--config", "/var/lib/dreamd/dreamd.toml"]
