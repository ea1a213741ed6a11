# speft service image: the API (`speft serve`) or a worker (`speft worker`) from one image.
# CPU by default; for GPU workers build with a CUDA base and the matching torch wheel index:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t speft:cuda .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SPEFT_KERNEL_CACHE_DIR=/home/speft/.cache/speft/kernels

# A compiler for the CPU kernel (built on first use into SPEFT_KERNEL_CACHE_DIR, a volume the
# services share), curl for health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ curl python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 speft

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first (pinned, from the CPU or CUDA index), then the project.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY speft_core ./speft_core
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install . ninja

USER speft
# made as speft, so the kernel volume mounted there belongs to speft
RUN mkdir -p /home/speft/var /home/speft/.cache/speft/kernels
WORKDIR /home/speft
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=5 CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["speft", "serve", "--host", "0.0.0.0", "--port", "8000"]
