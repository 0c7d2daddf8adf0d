# syntax=docker/dockerfile:1
# Two images from one file:
#   api    - hawada[service]: FastAPI + store + client; no torch (small, CPU-only, scales out)
#   worker - hawada[service,engine]: the same plus torch/torchvision; runs Celery jobs on a GPU
# The pip torch wheels bundle the CUDA runtime, so a slim base only needs the host's
# NVIDIA driver (nvidia-container-toolkit) at run time.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HAWADA_VAR_DIR=/var/lib/hawada
WORKDIR /app
RUN useradd --create-home --uid 1000 hawada && mkdir -p /var/lib/hawada \
    && chown hawada /var/lib/hawada
COPY pyproject.toml README.md ./
COPY hawada ./hawada
COPY core ./core
COPY adapters ./adapters
COPY worker ./worker
COPY api ./api
COPY store ./store
COPY client ./client
COPY recipes ./recipes

FROM base AS api
RUN pip install '.[service]'
USER hawada
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["hawada", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install '.[service,engine]'
USER hawada
CMD ["hawada", "worker"]
