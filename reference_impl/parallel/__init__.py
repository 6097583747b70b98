"""Distributed training on a laptop: a process launcher, counted collectives, ZeRO and pipelines."""

from . import pipeline as pipeline
from .launcher import LaunchTimeout, WorkerError, free_port, launch
from .zero import ZeroAdamW as ZeroAdamW

__all__ = ["LaunchTimeout", "WorkerError", "free_port", "launch"]
