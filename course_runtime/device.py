"""The one place the course picks a device.

Tests, benchmarks and labs ask `device()` instead of testing for CUDA themselves, so that one
environment variable moves everything: ``COURSE_DEVICE=cpu make test`` on a GPU machine runs the
CPU path, ``COURSE_DEVICE=cuda`` insists on a GPU and fails loudly where there is none.
"""

from __future__ import annotations

import os
from functools import cache

import torch

ENV = "COURSE_DEVICE"


@cache
def device() -> torch.device:
    """``$COURSE_DEVICE`` if set (``cpu``, ``cuda``, ``cuda:1``), else CUDA if present, else CPU."""
    wanted = os.environ.get(ENV, "").strip()
    if not wanted:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(wanted)
    except RuntimeError as e:
        raise ValueError(f"{ENV}={wanted!r} is not a device torch knows (try cpu or cuda)") from e
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{ENV}={wanted!r} asks for a GPU, and torch sees none on this machine "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    return chosen


def describe() -> str:
    """One line for logs and benchmark records: which device, and why it was chosen."""
    d = device()
    why = f"from ${ENV}" if os.environ.get(ENV) else "detected"
    name = torch.cuda.get_device_name(d) if d.type == "cuda" else f"{os.cpu_count()} cores"
    return f"{d} ({name}, {why})"
