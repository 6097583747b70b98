# CUDA grading image for the GPU runners: grader.Dockerfile on an NVIDIA CUDA runtime base, with
# PyPI's torch build (CUDA 13.0 for torch 2.13.0, which needs an NVIDIA driver >= 580 on the
# host). Build from the repository root:
#     docker build -f docker/grader-cuda.Dockerfile -t ai-systems-grader:cuda .
# and run with `docker run --gpus all ...` (see docker/README.md).
#
# It is also a valid base for `otter grade --image`, for the reasons given in
# grader.Dockerfile (Ubuntu, root, nothing in /root/miniforge3, a `python3` kernel found first
# through JUPYTER_PATH, no ENTRYPOINT); but otter starts its containers without GPU flags, so
# under `otter grade` the notebooks see no GPU and run on the CPU.
FROM nvidia/cuda:13.0.0-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_VERSION=2.13.0

# Python 3.11, the version requirements/constraints.txt is locked for (Ubuntu 22.04 ships 3.10).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent \
        software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/course/venv/bin:$PATH \
    JUPYTER_PATH=/opt/course/share/jupyter \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/course/src
COPY pyproject.toml ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY course_runtime course_runtime
COPY course_reference course_reference
COPY grader grader

# PyPI's torch for Linux is the CUDA build; its CUDA libraries come as pip wheels (cuda-toolkit,
# nvidia-cudnn-cu13, ...), pinned exactly by torch itself. No GPU is visible while building, so
# the check is only that the wheel is a CUDA one.
RUN python3.11 -m venv /opt/course/venv \
    && pip install -c requirements/constraints.txt "torch==${TORCH_VERSION}" \
    && pip install -c requirements/constraints.txt . "otter-grader[grading]" ipykernel \
    && pip check \
    && python -m ipykernel install --prefix /opt/course --name python3 \
        --display-name "Python 3 (AI Systems course)" \
    && python -c "import torch, otter, grader.checks.lab01_autograd; \
assert torch.__version__.startswith('${TORCH_VERSION}') and torch.version.cuda, torch.__version__" \
    && python -c "from jupyter_client.kernelspec import KernelSpecManager; \
spec = KernelSpecManager().get_kernel_spec('python3'); \
assert spec.resource_dir == '/opt/course/share/jupyter/kernels/python3', spec.resource_dir; \
assert spec.argv[0] == '/opt/course/venv/bin/python', spec.argv"

WORKDIR /
