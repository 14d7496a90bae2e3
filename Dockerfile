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
# Both start from debian:bookworm-slim with Debian's CPython 3.11 in a venv: an official image
# that can also be rebuilt without a registry (debootstrap --variant=minbase bookworm, imported
# under that name), which is how CI gets it (scripts/containers/test.sh). No `# syntax=` line:
# its frontend image would be pulled, and the built-in frontend already knows RUN --mount.
#
# Model weights are never part of an image: the worker downloads them on first start
# into HF_HOME=/models, which docker-compose.yml mounts as a named volume.
#
# The source tree is bind-mounted into the RUN step that installs it (RUN --mount), so
# no copy of the source stays in a layer; .dockerignore limits what the build sees.
#
# Optional, for builds behind a TLS-inspecting proxy (CI): a CA bundle as the BuildKit secret
# `ca` (`--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt`), which pip then trusts.
# Without it the steps run exactly as they would anyway.

###############################################################################
# base: Debian's CPython 3.11 in a venv, the sdxl user (shared by every target)
###############################################################################
FROM debian:bookworm-slim AS base

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# One layer (every layer is a full copy of the tree on Docker's vfs driver, as in CI).
# Versions are not pinned: the base image tag fixes the release, and a pinned .deb version
# breaks the build as soon as Debian publishes a security update (the archive drops it).
# A venv, so that `python` and `pip` are the venv's and Debian's python3 stays untouched.
# Fixed numeric uid/gid so volume ownership is predictable across images and hosts.
ARG PIP_VERSION=26.3
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca,required=false \
    apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.11 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sdxl \
    && useradd --system --uid 10001 --gid sdxl --home-dir /home/sdxl --create-home \
       --shell /usr/sbin/nologin sdxl \
    && python3.11 -m venv /opt/venv \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

###############################################################################
# api: no torch, no CUDA
###############################################################################
FROM base AS api

# The `api` extra must not pull in torch (tests/unit/test_deploy_files.py checks this file;
# pyproject.toml is the lead's to keep that way).
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-cache-dir "/src[api]"

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
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-cache-dir "rq-dashboard==${RQ_DASHBOARD_VERSION}" "six==1.17.0"
USER 10001:10001
EXPOSE 9181

# The web UI may sit behind basic auth, so probe the listening socket, not a page.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 9181), timeout=3).close()"]

# --json: jobs are serialized with rq's JSONSerializer (drop it if the app uses pickle).
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181", "--json"]

###############################################################################
# worker: CPython 3.11 + the CUDA build of torch (or the CPU one: TORCH_INDEX_URL)
###############################################################################
# No CUDA base image: the CUDA wheels of torch bring their own CUDA runtime, cuBLAS, cuDNN
# and NCCL as nvidia-* wheels, and the NVIDIA container toolkit mounts the driver. The toolkit
# acts on the two variables below, which is all that nvidia/cuda's base images add for it.
FROM base AS worker

ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch alone, in its own layer with the system libraries: it is ~3 GB with its nvidia-*
# wheels and changes far less often than the source. PyTorch 2.13 is built for CUDA 12.6
# (cu126) and 13.0 (cu130, for Blackwell GPUs); TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# gives the CPU build (CI builds that, from a local copy of the index). --no-deps: torch's own
# requirements (the nvidia-* wheels among them) come from PyPI with the project below.
# libgl1 + libglib2.0-0: opencv, pulled in by invisible-watermark (SDXL's watermark).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca,required=false \
    apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /models && chown sdxl:sdxl /models \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project and the rest of the SDXL deps (diffusers, transformers, ...) from PyPI.
# Naming torch again keeps pip from replacing the CUDA build: 2.13.0+cu126 satisfies
# torch==2.13.0, so nothing is downloaded for it.
RUN --mount=type=bind,source=.,target=/src,rw \
    --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-cache-dir "/src[worker]" "torch==${TORCH_VERSION}"

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
