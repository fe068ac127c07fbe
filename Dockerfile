# syntax=docker/dockerfile:1
# dhow's CPU image:  make image  (or: docker build -t dhow:0.1.0 .)
# Two stages: the build stage makes a virtualenv of dhow and its runtimes; the final stage is python-slim with that
# virtualenv and nothing else: no compiler, no pip cache, a non-root user. EXTRAS picks the runtimes
# (add "torch" for PyTorch models; with PIP_EXTRA_INDEX_URL set to PyTorch's CPU wheel index it stays CPU-only).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# compilers for a dependency that has no wheel for this platform; they never leave this stage
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dhow
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
ARG EXTRAS=sklearn,xgboost,lightgbm,s3
ARG PIP_EXTRA_INDEX_URL=""
RUN /opt/dhow/bin/pip install ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE}
# libgomp1: the OpenMP runtime LightGBM and XGBoost load (the base image's release pins its version)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 dhow \
 && useradd --system --uid 10001 --gid dhow --home-dir /var/lib/dhow --shell /usr/sbin/nologin dhow \
 && mkdir -p /var/lib/dhow /models \
 && chown dhow:dhow /var/lib/dhow
COPY --from=build /opt/dhow /opt/dhow
ENV PATH=/opt/dhow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/dhow
EXPOSE 8080 8081
# healthy = ready: the models are loaded and warmed (dhow's /v2/health/ready)
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('DHOW_HTTP_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/v2/health/ready', timeout=2).status != 200)"]
ENTRYPOINT ["dhow"]
# options, not DHOW_* variables, so that a settings file (the Helm chart's) can say otherwise
CMD ["serve", "--host", "0.0.0.0", "--repository", "/models", "--data-dir", "/var/lib/dhow"]
