# JupyterLab for students, CPU only: the course's runtime at the pinned versions and the labs.
# It is built from the student release, which holds no answer (`make release` writes it):
#     make release
#     docker build -f docker/lab.Dockerfile -t ai-systems-lab grader/dist/release
#     docker run --rm -p 8888:8888 ai-systems-lab        (then open the URL it prints)
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

ENV PATH=/opt/course/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/course/src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY course_runtime course_runtime

# torch's CPU build first, as the release's `make lab` does on a machine without a GPU; then the
# runtime with otter (the notebooks' `grader.check` cells) and JupyterLab, at the pinned versions.
RUN python -m venv /opt/course/venv \
    && pip install --no-deps "torch==${TORCH_VERSION}" \
        --index-url https://download.pytorch.org/whl/cpu \
    && pip install -c requirements/constraints.txt ".[lab]" \
    && pip check \
    && python -c "import torch, otter, course_runtime.data; \
assert torch.__version__.startswith('${TORCH_VERSION}') and torch.version.cuda is None, torch.__version__"

# The student owns their labs and nothing else.
RUN useradd --create-home --uid 1000 --shell /bin/bash student
COPY --chown=student:student labs /home/student/labs
COPY --chown=student:student book /home/student/book
USER student
WORKDIR /home/student/labs

EXPOSE 8888
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--notebook-dir=/home/student/labs"]
