# syntax=docker/dockerfile:1
# ADORE cluster image: CUDA + Python 3.12 + torch (CUDA build) + `pip install .[gpu]` (Ray Serve,
# DeepSpeed, eval and train extras). Follows the rayproject/ray image conventions that KubeRay
# relies on: user `ray` (uid 1000, gid 100), HOME=/home/ray, `ray`/`python` on PATH for login
# shells, bash and wget present (KubeRay's probes), no ENTRYPOINT (KubeRay sets the command).
# Model weights are NOT in the image: they are mounted at /models (see k8s/).
#
#   docker build -t <registry>/adore-cluster:0.1.0 .
#   # another CUDA flavour of torch: --build-arg TORCH_INDEX_URL=<PyTorch wheel index for it>
#
# hadolint global ignore=DL3008,DL3013,SC2016
#   (apt packages follow the pinned base image; Python packages are pinned by pyproject.toml/ARGs;
#   the profile.d line writes a literal ${PATH} on purpose)

ARG CUDA_IMAGE_TAG=12.8.1
ARG UBUNTU=ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Builder: CUDA devel (nvcc) so that packages building CUDA extensions (DeepSpeed) can; the
# result is a self-contained virtualenv in /opt/venv.
FROM nvidia/cuda:${CUDA_IMAGE_TAG}-devel-${UBUNTU} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ARG RAY_VERSION=2.60.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DS_BUILD_OPS=0

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev \
        build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

# 1) torch first (the big layer, cached across source changes). On linux/x86_64 the default
#    index serves CUDA builds; TORCH_INDEX_URL selects another CUDA flavour.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"

# 2) the project with its GPU extras; ray pinned to the version the KubeRay manifests declare
#    (k8s/base/*.yaml rayVersion), torch kept at the build above.
WORKDIR /src
COPY . /src
RUN pip install ".[gpu]" "ray[serve]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
 && python -P -c "import torch, ray, adore; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" \
 && rm -rf /src/build /src/*.egg-info

# ---------------------------------------------------------------------------------------------
# Runtime: CUDA runtime libraries + the virtualenv + the project checkout as working directory
# (the RayJob entrypoint `python jobs/eval_all.py ...` is relative to it).
FROM nvidia/cuda:${CUDA_IMAGE_TAG}-runtime-${UBUNTU}

ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/ray \
    HF_HOME=/home/ray/.cache/huggingface \
    RAY_USAGE_STATS_ENABLED=0 \
    NCCL_NVLS_ENABLE=0

# build-essential + python3.12-dev: Triton compiles its small C launchers at run time.
# wget: KubeRay's default readiness/liveness probes. (torch brings its own CUDA/cuDNN/NCCL wheels;
# the base image supplies the CUDA runtime conventions and the driver hooks.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-dev build-essential \
        bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel -r ubuntu 2>/dev/null || true) \
 && useradd --create-home --home-dir /home/ray --uid 1000 --gid 100 --shell /bin/bash ray \
 && echo 'export PATH=/opt/venv/bin:${PATH}' > /etc/profile.d/10-adore-venv.sh \
 && mkdir -p /models /results && chown 1000:100 /models /results

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=1000:100 /src /home/ray/adore-cluster

USER 1000:100
WORKDIR /home/ray/adore-cluster

EXPOSE 6379 8000 8080 8265 10001
CMD ["/bin/bash"]
