# CPU grading image: the base image of `otter grade --image`, and a ready environment for the
# course's container-free batch grader (`python -m grader grade`). Build from the repository root:
#     docker build -f docker/grader.Dockerfile -t ai-systems-grader:cpu .
#
# What otter-grader 7.0.0 adds on top of this image (otter/grade/Dockerfile and the setup.sh and
# run_autograder inside every autograder zip), and what that asks of it:
#   * `apt-get install curl unzip dos2unix wget`, then setup.sh `apt-get install build-essential
#     jq ...`: the base must be Debian or Ubuntu, and the image must stay root (no USER here).
#   * setup.sh picks Miniforge's installer from `uname -p`, which prints x86_64/aarch64 on Ubuntu
#     but "unknown" on Debian: hence Ubuntu, otter's own default base (ubuntu:22.04).
#   * setup.sh runs the Miniforge installer with `-b` into /root/miniforge3, which fails if that
#     folder exists: nothing of the course lives there (it lives in /opt/course).
#   * setup.sh creates the conda env `otter-env` (Python 3.11 and otter-grader only) and
#     run_autograder grades from it; otter runs the notebook in the kernel named `python3`.
#     otter-env knows nothing of torch or the course, so this image registers its own
#     `python3` kernel, found first through JUPYTER_PATH: the notebook and its tests run in the
#     course's pinned environment (the one CI grades in) and otter-env only drives the run.
#   * otter starts containers with the command /autograder/run_autograder: no ENTRYPOINT here.
FROM ubuntu:22.04

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

# As `make setup` does: torch's CPU build first (about 200 MB instead of several GB of CUDA
# wheels), then the course and otter (whose cells the grading kernel runs) at the pinned versions.
RUN python3.11 -m venv /opt/course/venv \
    && pip install --no-deps "torch==${TORCH_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu \
    && pip install -c requirements/constraints.txt . "otter-grader[grading]" ipykernel \
    && pip check \
    && python -m ipykernel install --prefix /opt/course --name python3 \
        --display-name "Python 3 (AI Systems course)" \
    && python -c "import torch, otter, grader.checks.lab01_autograd; \
assert torch.__version__.startswith('${TORCH_VERSION}') and torch.version.cuda is None, torch.__version__" \
    && python -c "from jupyter_client.kernelspec import KernelSpecManager; \
spec = KernelSpecManager().get_kernel_spec('python3'); \
assert spec.resource_dir == '/opt/course/share/jupyter/kernels/python3', spec.resource_dir; \
assert spec.argv[0] == '/opt/course/venv/bin/python', spec.argv"

WORKDIR /
