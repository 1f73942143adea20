# moola-pipeline: the image every RunPod pod / Instant Cluster node runs.
#
# CUDA 12.8 runtime on Ubuntu 24.04 (Python 3.12): RunPod's current GPU hosts run drivers for
# CUDA >= 12.8 (pass allowed_cuda_versions in runpod/pod.json if a host is older). torch comes as
# the matching CUDA wheel, Ray is the pinned ray[default,train]==2.60.0 from pyproject.toml, and
# the package is installed from this repo, so a pod starts with no pip install at all.
#
# /dev/shm: Ray keeps its object store there and wants several GB. Docker's default is 64 MB
# (Ray then falls back to /tmp, slowly): run locally with `docker run --shm-size=8g ...`. RunPod
# sizes /dev/shm from the pod's RAM; infra/bootstrap.sh reports the size and warns below
# MOOLA_MIN_SHM_MB (8192).
#
# No secrets are baked in: RAY_AUTH_TOKEN, AWS_* and RUNPOD_API_KEY arrive as pod environment.
#
#   docker build -t moola-pipeline:0.1.0 .
#   docker run --gpus all --shm-size=8g -e RAY_AUTH_TOKEN moola-pipeline:0.1.0 \
#       moola-pipeline train --data s3://... --out s3://... --workers 1 --gpus-per-worker 1
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MALLOC_ARENA_MAX=1

# python3.12 and venv from Ubuntu 24.04; iproute2 to inspect the inter-node NIC (ens1); tini
# reaps Ray's many child processes and forwards signals to bootstrap.sh.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
       iproute2 tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# torch first, from the CUDA index: a plain `pip install .` would pick whatever torch PyPI has.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/moola
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY infra ./infra
COPY runpod ./runpod
RUN pip install --no-cache-dir . \
    && python -c "import ray, torch, pipeline.cli; assert ray.__version__ == '2.60.0', ray.__version__"

# Non-root: Ray and training need no privileges. /workspace is where RunPod users expect files;
# runs themselves go to S3 (multi-node needs it), so a root-owned network volume is optional.
RUN useradd --create-home --uid 1000 --shell /bin/bash moola \
    && mkdir -p /workspace \
    && chown moola:moola /workspace
USER 1000:1000
WORKDIR /workspace

# Ray GCS, the dashboard / job server, the Ray client server.
EXPOSE 6379 8265 10001

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/moola/infra/bootstrap.sh"]
CMD []
