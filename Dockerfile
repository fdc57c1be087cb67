# stepimage image.
#   GPU (default):  docker build -t stepimage:cuda .
#   CPU, tiny model for trying the API on a laptop:  docker build --build-arg VARIANT=cpu -t stepimage:cpu .
# Weights are never baked in: mount them at /weights (see docker-compose.yml and `stepimage weights`).
#
# The CUDA stack, pinned in one line of constraints.txt: torch 2.13.0 from PyPI, which is built for CUDA 13.0 and
# brings its own CUDA runtime, cuBLAS and cuDNN as pip packages. The base image is the same CUDA line (13.0), so the
# NVIDIA container toolkit checks the host driver before the container starts (NVIDIA driver 580 or newer; GPUs of
# compute capability 7.5, Turing, or newer). scripts/install_torch.py installs torch here exactly as `make` does.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# GPU base: Ubuntu 24.04's Python 3.12 and the CUDA build of torch.
FROM ${CUDA_IMAGE} AS cuda-base
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# Extras: fp8 (torchao, for --quantize fp8 on Hopper and Ada GPUs) and s3 (boto3, for --storage s3).
ENV PATH=/opt/venv/bin:$PATH STEPIMAGE_BACKEND=flux2-klein PIP_NO_CACHE_DIR=1 EXTRAS=fp8,s3
COPY constraints.txt /build/
COPY scripts/install_torch.py /build/scripts/
RUN pip install --upgrade pip && python /build/scripts/install_torch.py --build cuda

# CPU base: plain Python and the CPU build of torch from PyTorch's CPU index, a fraction of the CUDA build's size.
FROM ${PYTHON_IMAGE} AS cpu-base
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# fp8 is refused on a CPU, so only the s3 extra (boto3, for --storage s3).
ENV PATH=/opt/venv/bin:$PATH STEPIMAGE_BACKEND=tiny PIP_NO_CACHE_DIR=1 EXTRAS=s3
COPY constraints.txt /build/
COPY scripts/install_torch.py /build/scripts/
RUN pip install --upgrade pip && python /build/scripts/install_torch.py --build cpu

FROM ${VARIANT}-base AS app
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    STEPIMAGE_HOST=0.0.0.0 \
    STEPIMAGE_PORT=8000 \
    STEPIMAGE_WEIGHTS_DIR=/weights \
    STEPIMAGE_STORAGE_DIR=/data/files
WORKDIR /app
# Dependencies in their own layer, rebuilt only when pyproject.toml changes: install the project from
# stub packages, then remove it and keep its dependencies. The constraints keep the torch installed above.
COPY pyproject.toml README.md ./
RUN mkdir -p server pipelines weights benchmarks \
    && touch server/__init__.py pipelines/__init__.py weights/__init__.py benchmarks/__init__.py \
    && pip install -c /build/constraints.txt ".[${EXTRAS}]" && pip uninstall -y stepimage \
    && rm -rf server pipelines weights benchmarks
COPY server ./server
COPY pipelines ./pipelines
COPY weights ./weights
COPY benchmarks ./benchmarks
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 stepimage \
    && mkdir -p /data/files /weights \
    && chown -R stepimage /data
USER stepimage
EXPOSE 8000
# Loading 16 GB of weights and compiling every size takes minutes on a GPU: a long start period.
HEALTHCHECK --interval=10s --timeout=3s --start-period=900s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
ENTRYPOINT ["stepimage"]
CMD ["serve"]
