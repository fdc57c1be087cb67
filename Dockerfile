# stepimage on an NVIDIA GPU host. Build: docker build -t stepimage .
# Weights are not baked in: mount a directory holding them (see docker-compose.yml and `stepimage weights`).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    STEPIMAGE_HOST=0.0.0.0 \
    STEPIMAGE_PORT=8000 \
    STEPIMAGE_WEIGHTS_DIR=/weights \
    STEPIMAGE_STORAGE_DIR=/data/files

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p server pipelines weights && touch server/__init__.py pipelines/__init__.py weights/__init__.py \
    && pip install --upgrade pip && pip install . && pip uninstall -y stepimage
COPY server ./server
COPY pipelines ./pipelines
COPY weights ./weights
RUN pip install --no-deps . && useradd --create-home stepimage && mkdir -p /data/files /weights \
    && chown -R stepimage /data
USER stepimage
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
ENTRYPOINT ["stepimage"]
CMD ["serve", "--backend", "flux2-klein"]
