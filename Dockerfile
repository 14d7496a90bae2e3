# syntax=docker/dockerfile:1
#
# Images for the SDXL service. Build with BuildKit (the default since Docker 23):
#
#   docker build --target api    -t sdxl-api:local .
#   docker build --target worker -t sdxl-worker:local .
#
# Targets:
#   api        FastAPI app (uvicorn). Also runs `python -m dispatcher` and
#              `python -m cleanup`, which need no torch. No torch, no CUDA.
#   worker     GPU worker (`python -m worker`): CUDA build of torch + the SDXL deps.
#   dashboard  rq-dashboard on top of the api image (compose profile `dashboard`).
#
# Model weights are never part of an image: the worker downloads them on first start
# into HF_HOME=/models, which docker-compose.yml mounts as a named volume.
#
# The source tree is bind-mounted into the RUN step that installs it (RUN --mount), so
# no copy of the source stays in a layer; .dockerignore limits what the build sees.

###############################################################################
# api: slim CPython 3.11, no torch, no CUDA
###############################################################################
FROM python:3.11.14-slim-bookworm AS api

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Fixed numeric uid/gid so volume ownership is predictable across images and hosts.
RUN groupadd --system --gid 10001 sdxl \
    && useradd --system --uid 10001 --gid sdxl --home-dir /home/sdxl --create-home \
       --shell /usr/sbin/nologin sdxl

# The `api` extra must not pull in torch (tests/unit/test_deploy_files.py checks this file;
# pyproject.toml is the lead's to keep that way).
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir "/src[api]"

WORKDIR /home/sdxl
USER 10001:10001
# all interfaces in a container: the open-without-keys rule then needs keys or SDXL_ALLOW_OPEN=true
ENV SDXL_HOST=0.0.0.0 SDXL_PORT=8000
EXPOSE 8000

# Liveness only (/healthz); readiness (/readyz) is what the gateway's health check uses.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3).status == 200 else 1)"]

# One uvicorn process per container: Prometheus metrics are per process, and the
# replicas are scaled by compose, not by --workers.
CMD ["python", "-m", "app"]

###############################################################################
# dashboard: rq-dashboard, same rq version as the app (profile `dashboard`)
###############################################################################
FROM api AS dashboard

USER 0:0
# rq-dashboard 0.9.0 imports `six` without declaring it (seen: ModuleNotFoundError).
ARG RQ_DASHBOARD_VERSION=0.9.0
RUN pip install --no-cache-dir "rq-dashboard==${RQ_DASHBOARD_VERSION}" "six==1.17.0"
USER 10001:10001
EXPOSE 9181

# The web UI may sit behind basic auth, so probe the listening socket, not a page.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 9181), timeout=3).close()"]

# --json: jobs are serialized with rq's JSONSerializer (drop it if the app uses pickle).
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181", "--json"]

###############################################################################
# worker: CUDA userspace + CPython 3.11 + CUDA build of torch
###############################################################################
# The `base` flavour (not `runtime`/`cudnn-runtime`) on purpose: the CUDA wheels of
# torch bring their own cuBLAS/cuDNN/NCCL as nvidia-* wheels, so the runtime image's
# copies would only add ~3 GB. The base image still sets NVIDIA_REQUIRE_CUDA and the
# NVIDIA_* variables that the NVIDIA container toolkit reads. Keep its CUDA minor in
# step with TORCH_INDEX_URL below (cu126 <-> 12.6).
FROM nvidia/cuda:12.6.3-base-ubuntu22.04 AS worker

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 22.04 ships CPython 3.11 as python3.11 (universe). Versions are not pinned:
# the base image tag fixes the release, and pinning a .deb version breaks the build as
# soon as Ubuntu publishes a security update (the archive drops superseded versions).
# libgl1 + libglib2.0-0: opencv, pulled in by invisible-watermark (SDXL's watermark).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 sdxl \
    && useradd --system --uid 10001 --gid sdxl --home-dir /home/sdxl --create-home \
       --shell /usr/sbin/nologin sdxl \
    && mkdir -p /models \
    && chown sdxl:sdxl /models

# A venv, so that `python` and `pip` are 3.11 and the distro's python3 is untouched.
ARG PIP_VERSION=26.3
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch alone, from the PyTorch index, in its own layer: it is ~3 GB with its nvidia-*
# wheels and changes far less often than the source. PyTorch 2.13 is built for CUDA 12.6
# (cu126) and 13.0 (cu130); use cu130 with nvidia/cuda:13.0.x for Blackwell GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project and the rest of the SDXL deps (diffusers, transformers, ...) from PyPI.
# Naming torch again keeps pip from replacing the CUDA build: 2.13.0+cu126 satisfies
# torch==2.13.0, so nothing is downloaded for it.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir "/src[worker]" "torch==${TORCH_VERSION}"

ENV HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1
VOLUME ["/models"]

WORKDIR /home/sdxl
USER 10001:10001

# `python -m worker.health` exits 0 only while this container's worker heartbeat is
# fresh (contract in docs/deploy.md). The long start period covers the first start,
# which downloads ~13 GB of SDXL base + refiner weights into /models.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python", "-m", "worker.health"]

# SIGTERM: the worker finishes its current job, then exits. Compose gives it 120 s.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker"]
